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


@pytest.mark.parametrize("job", ["brats_cyclic", "brats_hyperseg_conv"])
@pytest.mark.parametrize("key", ["min_responses", "round_timeout"])
def test_jobs_with_their_own_controller_refuse_min_responses(job: str, key: str):
    with pytest.raises(ValueError, match=f"runs its own controller; {key} is for the FedAvg-based jobs"):
        build(job, JobParams(**{key: 2}))


@pytest.mark.parametrize("job", ["brats_fedavg", "brats_fedadam", "brats_segviz_fedbn"])
def test_a_round_timeout_reaches_the_controller_as_its_task_timeout(job: str, tmp_path: Path):
    (folder,) = export_jobs(tmp_path, [job], JobParams(round_timeout=90))
    config = json.loads((folder / "app" / "config" / "config_fed_server.json").read_text())
    # one workflow, the training controller, ends its rounds after 90 s
    assert [w["args"]["round_timeout"] for w in config["workflows"] if "round_timeout" in w["args"]] == [90]


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
