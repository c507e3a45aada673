"""Cyclic and single weight transfer, run for real in FLARE's simulator on the tiny phantom cohort."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from brats_fl.jobs.catalogue import JobParams
from brats_fl.jobs.simulate import run_simulation
from brats_fl.protocol import VISITS_FILE
from brats_fl.results.report import summarise_run
from brats_fl.seg.model import fingerprint, state_bytes
from brats_fl.seg.trainer import poly_lr
from conftest import tiny_params

SITES = ["site-1", "site-2", "site-3"]

TINY = tiny_params(visit_epochs=3, seed=5)


def _site_rows(run: Path, site: str) -> list[dict]:
    path = run / site / "simulate_job" / "brats_fl" / "rounds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_cyclic_hands_the_model_on_unchanged(sim_data: Path, tmp_path: Path):
    params = JobParams(**{**vars(TINY), "order": "shuffle"})
    run = run_simulation("brats_cyclic", params, sim_data, tmp_path)
    server = run / "server" / "simulate_job"
    record = json.loads((server / VISITS_FILE).read_text())

    # two passes, each a shuffle of the sites drawn from the job's seed
    rng = random.Random(params.seed)
    expected = []
    for _ in range(2):
        order = list(SITES)
        rng.shuffle(order)
        expected.append(order)
    assert [p["order"] for p in record["passes"]] == expected
    visits = [v for p in record["passes"] for v in p["visits"]]
    assert [v["site"] for v in visits] == [s for order in expected for s in order]
    assert all(v["status"] == "trained" for v in visits)

    # the model a site receives is exactly what the previous site returned: nothing averaged in between
    for before, after in zip(visits, visits[1:], strict=False):
        assert after["received"] == before["returned"]
    # ... as the sites themselves recorded it, visit by visit
    for site in SITES:
        mine = [v for v in visits if v["site"] == site]
        rows = _site_rows(run, site)
        assert [(r["received"], r["sent"]) for r in rows] == [(v["received"], v["returned"]) for v in mine]
    final = torch.load(server / "app_server" / "FL_global_model.pt", weights_only=False)["model"]
    assert fingerprint(final) == visits[-1]["returned"]

    # every site scored the model after each pass on its validation split; the second pass is better
    for entry in record["passes"]:
        assert sorted(entry["validation"]) == SITES
    mean = [sum(p["validation"][s]["dice_WT"] for s in SITES) / 3 for p in record["passes"]]
    first_seen = sum(v["metrics"]["dice_WT"] for v in visits[:3]) / 3  # the untrained model, at the first visits
    assert mean[1] > first_seen + 0.1, (first_seen, mean)

    # each visit moves one model each way; each validation one model to the site
    size = state_bytes(final)
    assert record["bytes"] == {s: {"received": 4 * size, "sent": 2 * size} for s in SITES}
    # the final model is scored on every site's test split; the curves hold one point per pass and site
    summary = summarise_run(tmp_path)
    assert set(summary["test_per_site"]) == set(SITES)
    for site in SITES:
        expected = [p["validation"][site]["dice_mean"] for p in record["passes"]]
        assert summary["curves"][site]["pass_val_dice_mean"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_a_failing_site_is_skipped_and_reported(sim_data: Path, tmp_path: Path):
    lists = Path(json.loads(sim_data.read_text())["datalist_dir"])
    doc = json.loads((lists / "site-2.json").read_text())
    doc["training"][0]["label"] = "nowhere/BraTS20_Training_999_seg.nii.gz"
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    config = json.loads(sim_data.read_text()) | {"sites": {"site-2": {"datalist": str(tmp_path / "bad.json")}}}
    (tmp_path / "config.json").write_text(json.dumps(config))

    params = JobParams(**{**vars(TINY), "visit_epochs": 1, "recipe": "nnunet"})
    run = run_simulation("brats_swt", params, tmp_path / "config.json", tmp_path / "ws")
    server = run / "server" / "simulate_job"
    record = json.loads((server / VISITS_FILE).read_text())
    (only_pass,) = record["passes"]
    site1, site2, site3 = only_pass["visits"]
    assert [v["site"] for v in only_pass["visits"]] == SITES
    assert site2["status"] == "skipped" and site2["reason"]
    assert site3["received"] == site1["returned"]
    assert sorted(only_pass["validation"]) == ["site-1", "site-3"]
    assert f"skipped site-2, which {site2['reason']}" in (run / "server" / "log.txt").read_text()
    final = torch.load(server / "app_server" / "FL_global_model.pt", weights_only=False)["model"]
    assert fingerprint(final) == site3["returned"]
    # the nnU-Net rate decays per visit, visit v of 3 at poly step v; the skipped visit keeps its step
    assert [_site_rows(run, s)[0]["lr"] for s in ("site-1", "site-3")] == [poly_lr(1e-2, v, 3) for v in (0, 2)]


@pytest.mark.slow
def test_a_visit_that_times_out_is_skipped_and_never_becomes_the_model(sim_data: Path, tmp_path: Path):
    """Every site may train for one second only: none can, so the ring must move on without waiting, and a
    result that arrives late must not become the model."""
    params = JobParams(**{**vars(TINY), "visit_epochs": 1, "visit_timeout": 1})
    run = run_simulation("brats_swt", params, sim_data, tmp_path)
    server = run / "server" / "simulate_job"
    visits = json.loads((server / VISITS_FILE).read_text())["passes"][0]["visits"]
    assert [(v["status"], v["reason"]) for v in visits] == [("skipped", "did not return the model within 1 s")] * 3
    assert len({v["received"] for v in visits}) == 1  # every site was offered the untouched initial model
    log = (run / "server" / "log.txt").read_text()
    for visit in visits:
        assert f"skipped {visit['site']}, which {visit['reason']}" in log
    final = torch.load(server / "app_server" / "FL_global_model.pt", weights_only=False)["model"]
    assert fingerprint(final) == visits[0]["received"]
