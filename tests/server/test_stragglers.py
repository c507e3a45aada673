"""Stragglers: a round closes without its slow site, whose late update reaches no round (no mocks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from brats_fl.jobs.catalogue import JobParams, build
from brats_fl.jobs.export import export_jobs
from brats_fl.server.fedavg import shortfall

SITES = ("site-1", "site-2", "site-3")

#: site-3 holds each update DELAY s; a round closes ROUND_WAIT s after site-1 and site-2 have answered. Its round 0
#: update so comes DELAY - ROUND_WAIT s after round 0 has closed, while round 1 or 2 (ROUND_WAIT s and a little
#: training each) is under way
ROUND_WAIT, DELAY = 5, 10


@pytest.mark.parametrize(
    "changes",
    [{"min_responses": 0}, {"min_responses": 4}, {"round_wait": -1}, {"round_timeout": 0}, {"delays": {"site-3": -1}}],
)
def test_straggler_parameters_are_range_checked(changes: dict):
    with pytest.raises(ValueError, match="job parameter out of range"):
        JobParams(**changes)


@pytest.mark.parametrize(
    ("job", "key"),
    [("brats_cyclic", "min_responses"), ("brats_cyclic", "round_timeout"), ("brats_hyperseg_conv", "min_responses")],
)
def test_jobs_with_their_own_controller_refuse_min_responses(job: str, key: str):
    with pytest.raises(ValueError, match=f"runs its own controller; {key} is for the FedAvg-based jobs"):
        build(job, JobParams(**{key: 2}))


def _waits(folder: Path) -> dict[str, int]:
    """Every time limit in an exported job's server configuration, by component class and argument."""
    config = json.loads((folder / "app" / "config" / "config_fed_server.json").read_text())
    parts = config["workflows"] + config["components"]
    return {
        f"{c['path'].rsplit('.', 1)[-1]}.{k}": v for c in parts for k, v in c.get("args", {}).items() if "timeout" in k
    }


@pytest.mark.parametrize(
    ("settings", "training", "evaluation"),
    [({}, 0, 0), ({"round_timeout": 90}, 90, 90), ({"round_timeout": 90, "eval_timeout": 30}, 90, 30)],
)
def test_hyperseg_and_the_evaluation_wait_as_long_as_the_round_timeout_says(tmp_path, settings, training, evaluation):
    """No fixed wait of hours: HyperSeg's rounds and the evaluation after training wait what the user set (0: FLARE's
    no limit, as a FedAvg round without --round-timeout; the export leaves out an argument at our classes' default,
    0, but writes FLARE's CrossSiteModelEval's, whose defaults are 600 and 6000 s)."""
    params = JobParams(cross_site="all", **settings)
    hyperseg, fedavg = export_jobs(tmp_path, ["brats_hyperseg_conv", "brats_fedavg"], params)
    ours = ["HyperSegController.round_timeout", "HyperSegController.eval_timeout", "DeadlineFedAvg.round_timeout"]
    waits = dict.fromkeys([*ours, "PersonalisedEvaluation.timeout"], 0) | _waits(hyperseg) | _waits(fedavg)
    assert waits == {
        "HyperSegController.round_timeout": training,
        "HyperSegController.eval_timeout": evaluation,
        "DeadlineFedAvg.round_timeout": training,
        "PersonalisedEvaluation.timeout": evaluation,
        "CrossSiteModelEval.submit_model_timeout": evaluation,
        "CrossSiteModelEval.validation_timeout": evaluation,
    }


def test_segviz_rounds_take_the_deadline_too(tmp_path: Path):
    (job,) = export_jobs(tmp_path, ["brats_segviz_fedbn"], JobParams(min_responses=2, round_wait=30))
    config = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    (controller,) = [w for w in config["workflows"] if w["path"].endswith("SegVizFedAvg")]
    assert controller["args"]["min_responses"] == 2 and controller["args"]["round_wait"] == 30


def test_a_round_short_of_answers_names_the_missing_sites():
    assert shortfall(list(SITES), {"site-1", "site-2"}, 2) is None
    assert shortfall(list(SITES), {"site-1"}, 2) == (
        "1 of 3 sites answered, fewer than the 2 required; the round is not averaged. "
        "No usable answer from: site-2, site-3"
    )
    # without min_responses every site is required
    assert shortfall(list(SITES), {"site-1", "site-3"}, 3).endswith("No usable answer from: site-2")
