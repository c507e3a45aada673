"""Stragglers: a round closes without its slow site, whose late update reaches no round (no mocks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from brats_fl.jobs.simulate import run_simulation
from brats_fl.protocol import SCREENING_FILE
from brats_fl.results.report import summarise_run
from conftest import tiny_params

SITES = ("site-1", "site-2", "site-3")

#: site-3 holds each update DELAY s; a round closes ROUND_WAIT s after site-1 and site-2 have answered. Its round 0
#: update so comes DELAY - ROUND_WAIT s after round 0 has closed, while round 1 or 2 (ROUND_WAIT s and a little
#: training each) is under way
ROUND_WAIT, DELAY = 5, 10


def _training_cases(record: Path) -> int:
    datalist = json.loads((record / "site.json").read_text())["data"]["datalist"]
    return len(json.loads(Path(datalist).read_text())["training"])


def _state(path: Path) -> dict[str, torch.Tensor]:
    blob = torch.load(path, map_location="cpu", weights_only=False)
    return {k: torch.as_tensor(v) for k, v in blob.get("model", blob).items()}


def _case_weighted_mean(records: dict[str, Path], rnd: int) -> dict[str, torch.Tensor]:
    """What FedAvg makes of the updates these sites sent in round ``rnd``."""
    weights = {s: _training_cases(r) for s, r in records.items()}
    sent = {s: torch.load(r / f"sent_round_{rnd}.pt") for s, r in records.items()}
    total = sum(weights.values())
    return {k: sum(sent[s][k].double() * w for s, w in weights.items()) / total for k in sent[next(iter(sent))]}


@pytest.mark.slow
def test_rounds_close_without_the_slow_site(sim_data: Path, tmp_path: Path):
    """site-3 is slower than round_wait allows: every round is averaged over site-1 and site-2 alone, site-3's late
    update is dropped while a later round is under way, and the job finishes with site-3 in its evaluation."""
    params = tiny_params(
        rounds=3,
        local_epochs=1,
        lr=3e-3,
        min_responses=2,
        round_wait=ROUND_WAIT,
        delays={"site-3": DELAY},
        audit=True,
    )
    run = run_simulation("brats_fedavg", params, sim_data, tmp_path)
    server = run / "server" / "simulate_job"

    rows = [json.loads(line) for line in (server / SCREENING_FILE).read_text().splitlines()]
    assert [(r["round"], sorted(r["averaged"]), r["refused"]) for r in rows] == [
        (rnd, ["site-1", "site-2"], {}) for rnd in range(params.rounds)
    ]
    lines = (run / "server" / "log.txt").read_text().splitlines()
    for rnd in range(params.rounds):
        assert any(f"round {rnd} closed with ['site-1', 'site-2']; left out ['site-3']" in line for line in lines)
    # site-3 trained round 0 and went to send its update while a later round was under way: the server told it
    # the task was gone, and no training result of site-3 ever reached the server
    later = next(i for i, line in enumerate(lines) if "Round 1 started." in line)
    done = next(i for i, line in enumerate(lines) if "Finished FedAvg." in line)
    dropped = [i for i, line in enumerate(lines) if "peer=site-3" in line and "is not found" in line]
    assert any(later < i < done for i in dropped), dropped
    assert not any("got result from client site-3 for task: name=train" in line for line in lines)

    # every global model is the case-weighted mean of site-1's and site-2's updates of its round, never site-3's
    records = {s: run / s / "simulate_job" / "brats_fl" for s in SITES}
    two = {s: records[s] for s in ("site-1", "site-2")}
    final = _state(server / "app_server" / "FL_global_model.pt")
    for rnd in range(params.rounds):
        got = torch.load(records["site-1"] / f"received_round_{rnd + 1}.pt") if rnd + 1 < params.rounds else final
        expected = _case_weighted_mean(two, rnd)
        assert set(got) == set(expected)
        for key, value in got.items():
            torch.testing.assert_close(value.double(), expected[key], rtol=1e-5, atol=1e-6, msg=f"round {rnd} {key}")
    with_site_3 = _case_weighted_mean(records, 0)
    after_0 = torch.load(records["site-1"] / "received_round_1.pt")
    assert any(not torch.allclose(after_0[k].double(), with_site_3[k], rtol=1e-5, atol=1e-6) for k in after_0)

    assert set(summarise_run(tmp_path)["test_per_site"]) == set(SITES)
