"""Broken and hostile updates: refused by the server's aggregator in a real FLARE simulation (no mocks)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from brats_fl.jobs.simulate import run_simulation
from brats_fl.server.screening import RECORD_FILE
from conftest import tiny_params


def _training_cases(record: Path) -> int:
    datalist = json.loads((record / "site.json").read_text())["data"]["datalist"]
    return len(json.loads(Path(datalist).read_text())["training"])


@pytest.mark.slow
def test_broken_updates_are_refused_and_a_poor_round_stops_the_job(sim_data: Path, tmp_path: Path):
    """site-2 sends a NaN, a foreign key, a wrong shape, then a huge update; site-3 a NaN in the last round,
    which leaves one good update where two are required: that round must stop the job, not be averaged."""
    params = tiny_params(
        rounds=4,
        local_epochs=1,
        lr=3e-3,
        min_good=2,
        faults={"site-2": ["nan", "key", "shape", "scale"], "site-3": ["none", "none", "none", "nan"]},
        audit=True,
    )
    with pytest.raises(RuntimeError, match="Simulation failed"):
        run_simulation("brats_fedavg", params, sim_data, tmp_path)
    run = tmp_path / "brats_fedavg"
    server = run / "server" / "simulate_job"

    rows = [json.loads(line) for line in (server / RECORD_FILE).read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    reasons = ["holds NaN", r"unexpected key\(s\) \['smuggled'\]", "has shape", "update norm .* over 10 times"]
    for row, reason in zip(rows, reasons, strict=True):
        assert set(row["refused"]) >= {"site-2"}
        assert re.search(reason, row["refused"]["site-2"]), row
    assert [sorted(r["averaged"]) for r in rows] == [["site-1", "site-3"]] * 3 + [["site-1"]]
    assert "holds NaN" in rows[3]["refused"]["site-3"]

    log = (run / "server" / "log.txt").read_text()
    for rnd in range(4):
        assert f"refused the update of site-2 in round {rnd}" in log
    assert "round 3: 1 good update(s), fewer than min_good=2; the round is not averaged" in log
    assert "Refused: site-2: update norm" in log and "; site-3: net." in log

    # the last global model is round 2's: the case-weighted mean of site-1 and site-3 only
    records = {s: run / s / "simulate_job" / "brats_fl" for s in ("site-1", "site-3")}
    weights = {s: _training_cases(r) for s, r in records.items()}
    sent = {s: torch.load(r / "sent_round_2.pt") for s, r in records.items()}
    blob = torch.load(server / "app_server" / "FL_global_model.pt", map_location="cpu", weights_only=False)
    global_model = {k: torch.as_tensor(v) for k, v in blob["model"].items()}
    assert set(global_model) == set(sent["site-1"])
    total = sum(weights.values())
    for key, value in global_model.items():
        expected = sum(sent[s][key].double() * w for s, w in weights.items()) / total
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6, msg=key)
