"""Broken and hostile updates: refused by the FedAvg, sequential and HyperSeg servers in real FLARE simulations."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from brats_fl.jobs.catalogue import HyperNetParams
from brats_fl.jobs.simulate import run_simulation
from brats_fl.protocol import DONE_FILE, RUN_RECORD, SCREENING_FILE, VISITS_FILE
from brats_fl.seg.model import fingerprint
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

    rows = [json.loads(line) for line in (server / SCREENING_FILE).read_text().splitlines()]
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

    # a job its server stopped says so, though FLARE ended it as it ends a complete one, and so does every site
    record = json.loads((server / RUN_RECORD).read_text())
    assert record["finished"] and record["complete"] is False
    assert "fewer than min_good=2" in record["incomplete_reason"]
    for site in ("site-1", "site-2", "site-3"):
        done = json.loads((run / site / "simulate_job" / "brats_fl" / DONE_FILE).read_text())
        assert done["complete"] is False and done["incomplete_reason"], done


@pytest.mark.slow
def test_a_refused_visit_is_skipped_and_the_model_goes_on_unchanged(sim_data: Path, tmp_path: Path):
    """Single weight transfer (the sequential controller the cyclic job runs too): site-2 returns weights blown
    up 10^4 times, refused against site-1's update, and site-3 a NaN; both visits are skipped and the job ends
    with site-1's model."""
    params = tiny_params(visit_epochs=1, faults={"site-2": ["scale"], "site-3": ["nan"]})
    run = run_simulation("brats_swt", params, sim_data, tmp_path)
    server = run / "server" / "simulate_job"
    (only_pass,) = json.loads((server / VISITS_FILE).read_text())["passes"]
    site1, site2, site3 = only_pass["visits"]
    assert site1["status"] == "trained" and site1["update_norm"] > 0
    assert site2["status"] == site3["status"] == "skipped"
    assert re.fullmatch(r"its update was refused: update norm .* over 10 times the others' median .*", site2["reason"])
    assert re.fullmatch(r"its update was refused: net\..* holds NaN", site3["reason"])
    # the model after a refused visit is the model before it
    assert site3["received"] == site2["received"] == site1["returned"]
    final = torch.load(server / "app_server" / "FL_global_model.pt", weights_only=False)["model"]
    assert fingerprint(final) == site1["returned"]
    assert sorted(only_pass["validation"]) == ["site-1"]
    log = (run / "server" / "log.txt").read_text()
    assert "refused the update of site-2 in pass 0: update norm" in log
    assert "refused the update of site-3 in pass 0: net." in log


def _load(record: Path, name: str) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v).float() for k, v in torch.load(record / name).items()}


@pytest.mark.slow
def test_hyperseg_leaves_a_refused_update_out_of_both_steps(sim_data: Path, tmp_path: Path):
    """site-2 returns weights blown up 10^4 times in round 0 and a foreign key in round 1. With one-hot
    descriptors, a one-layer hypernetwork and SGD the hypernetwork's step is checkable by hand: a site whose
    update is refused moves only by the shared bias term, -lr/n sum_j (theta_j - theta~_j) over the n sites kept."""
    lr = 0.5
    params = tiny_params(
        rounds=2,
        local_epochs=1,
        hypernetwork=HyperNetParams(depth=1, optimizer="sgd", lr=lr),
        faults={"site-2": ["scale", "key"]},
        audit=True,
    )
    run = run_simulation("brats_hyperseg_conv", params, sim_data, tmp_path)
    server = run / "server" / "simulate_job"
    rows = [json.loads(line) for line in (server / SCREENING_FILE).read_text().splitlines()]
    assert [(r["round"], sorted(r["averaged"]), list(r["refused"])) for r in rows] == [
        (0, ["site-1", "site-3"], ["site-2"]),
        (1, ["site-1", "site-3"], ["site-2"]),
    ]
    assert "update norm" in rows[0]["refused"]["site-2"]
    assert "unexpected key(s) ['smuggled']" in rows[1]["refused"]["site-2"]
    log = (run / "server" / "log.txt").read_text()
    assert "refused the update of site-2 in round 0: update norm" in log

    records = {s: run / s / "simulate_job" / "brats_fl" for s in ("site-1", "site-2", "site-3")}
    kept = ("site-1", "site-3")
    received = {s: [_load(r, f"received_round_{k}.pt") for k in (0, 1)] for s, r in records.items()}
    sent = {s: _load(r, "sent_round_0.pt") for s, r in records.items()}
    final = {k: torch.as_tensor(v).float() for k, v in
             torch.load(server / "app_server" / "FL_global_model.pt", weights_only=False)["model"].items()}  # fmt: skip
    last = {s: _load(records[s], "sent_round_1.pt") for s in kept}
    weights = {s: _training_cases(records[s]) for s in kept}
    personal = {"net.model.2.1.conv.unit0.conv.weight", "net.model.2.1.conv.unit0.conv.bias"}
    # the shared weights are the case-weighted mean of site-1 and site-3 alone, in both rounds
    for key, value in final.items():
        if key in personal:
            continue
        for got, models in ((received["site-1"][1][key], sent), (value, last)):
            expected = sum(models[s][key] * w for s, w in weights.items()) / sum(weights.values())
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=key)
    # the hypernetwork moved by site-1's and site-3's changes only
    for key in personal:
        change = {s: received[s][0][key] - sent[s][key] for s in kept}
        total = sum(change.values())
        for site in records:
            expected = received[site][0][key] - lr / 2 * (change.get(site, 0) + total)
            torch.testing.assert_close(received[site][1][key], expected, rtol=1e-4, atol=1e-6, msg=(site, key))
    assert all((r / "personalised_model.pt").is_file() for r in records.values())
