"""The FLARE jobs, run for real in FLARE's simulator on a tiny phantom cohort (no mocks)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from brats_fl.cli.main import main
from brats_fl.jobs.catalogue import JobParams
from brats_fl.jobs.simulate import run_simulation
from brats_fl.protocol import DONE_FILE, RUN_RECORD
from brats_fl.results.benchmark import model_hashes
from brats_fl.results.report import summarise_run
from conftest import tiny_params

REPO = Path(__file__).resolve().parents[2]

TINY = tiny_params(rounds=3, local_epochs=3, lr=3e-3)
SITES = ("site-1", "site-2", "site-3")


def _state(path: Path) -> dict[str, torch.Tensor]:
    blob = torch.load(path, map_location="cpu", weights_only=False)
    return {k: torch.as_tensor(v) for k, v in blob.get("model", blob).items()}


@pytest.mark.slow
def test_fedavg_in_simulator(fedavg_run: tuple[Path, JobParams]):
    workspace, params = fedavg_run
    run = workspace / "brats_fedavg"
    server = run / "server" / "simulate_job"
    assert (server / "app_server" / "FL_global_model.pt").is_file()
    assert (server / "app_server" / "best_FL_global_model.pt").is_file()

    # the last global model is the case-weighted mean of what the sites sent in the last round
    weights, sent = {}, {}
    for site in ("site-1", "site-2", "site-3"):
        record = run / site / "simulate_job" / "brats_fl"
        doc = json.loads((record / "site.json").read_text())
        weights[site] = len(json.loads(Path(doc["data"]["datalist"]).read_text())["training"])
        sent[site] = torch.load(record / f"sent_round_{params.rounds - 1}.pt")
        rows = [json.loads(line) for line in (record / "rounds.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == list(range(params.rounds))
    total = sum(weights.values())
    global_model = _state(server / "app_server" / "FL_global_model.pt")
    assert set(global_model) == set(sent["site-1"])
    for key, value in global_model.items():
        expected = sum(sent[s][key].double() * w for s, w in weights.items()) / total
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6, msg=key)

    summary = summarise_run(workspace)
    curves = summary["curves"]
    for site in ("site-1", "site-2", "site-3"):
        dice = curves[site]["val_dice_WT"]
        assert len(dice) == params.rounds and dice[-1] > dice[0] + 0.05, (site, dice)
    assert set(summary["test_per_site"]) == {"site-1", "site-2", "site-3"}
    assert 0 < summary["bytes_sent_per_round"] == sum(t.numel() * t.element_size() for t in sent["site-1"].values())


@pytest.mark.slow
def test_same_seed_same_global_model(fedavg_run: tuple[Path, JobParams], sim_data: Path, tmp_path: Path):
    """Data loading, augmentation, initialisation and training take their seeds from the job's, and the sites' CPU
    kernels are pinned (brats_fl.settings.numerics): a repeat of the shared run gives the same global model, bit for
    bit.
    (It did not while the server summed the updates in arrival order: one
    ulp in round 1's global model grew to 1e-3 by round 3.)"""
    workspace, params = fedavg_run
    again = run_simulation("brats_fedavg", params, sim_data, tmp_path)
    final = Path("server") / "simulate_job" / "app_server" / "FL_global_model.pt"
    first, second = _state(workspace / "brats_fedavg" / final), _state(again / final)
    assert set(first) == set(second)
    for key in first:
        assert torch.equal(first[key], second[key]), key  # bit for bit
    # as the benchmark records it, to compare runs across machines
    hashes = [model_hashes(w / final)["weights_sha256"] for w in (workspace / "brats_fedavg", again)]
    assert hashes[0] == hashes[1]
    initial = params.model().state_dict()
    assert any(not torch.allclose(first[k], initial[k]) for k in first), "training moved the model"


@pytest.mark.slow
def test_local_only_sends_no_weights(sim_data: Path, tmp_path: Path):
    params = JobParams(**{**vars(TINY), "rounds": 2, "local_epochs": 2, "audit": True})
    run = run_simulation("brats_local", params, sim_data, tmp_path)
    models = {}
    for site in ("site-1", "site-2", "site-3"):
        record = run / site / "simulate_job" / "brats_fl"
        assert torch.load(record / "sent_round_1.pt") == {}
        models[site] = torch.load(record / "local_model.pt", weights_only=False)["state_dict"]
    key = next(iter(models["site-1"]))
    assert not torch.equal(models["site-1"][key], models["site-2"][key])
    summary = summarise_run(tmp_path)
    assert summary["global_test"] is None and summary["bytes_sent_per_round"] == 0
    assert set(summary["test_per_site"]) == {"site-1", "site-2", "site-3"}


@pytest.mark.slow
def test_central_trains_on_the_pooled_datalist(sim_data: Path, tmp_path: Path):
    params = JobParams(**{**vars(TINY), "rounds": 1, "local_epochs": 1})
    run = run_simulation("brats_central", params, sim_data, tmp_path)
    doc = json.loads((run / "site-1" / "simulate_job" / "brats_fl" / "site.json").read_text())
    assert doc["data"]["datalist"].endswith("site-All.json")
    test_cases = json.loads(Path(doc["data"]["datalist"]).read_text())["test"]
    assert summarise_run(tmp_path)["test"]["cases"] == len(test_cases)


@pytest.mark.slow
def test_site_with_bad_data_stops_the_job_and_is_named(sim_data: Path, tmp_path: Path, capsys):
    lists = Path(json.loads(sim_data.read_text())["datalist_dir"])
    doc = json.loads((lists / "site-2.json").read_text())
    doc["training"][0]["image"][1] = "nowhere/BraTS20_Training_999_t1ce.nii.gz"
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    config = json.loads(sim_data.read_text()) | {"sites": {"site-2": {"datalist": str(tmp_path / "bad.json")}}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    params = JobParams(**{**vars(TINY), "rounds": 1, "local_epochs": 1})
    with pytest.raises(RuntimeError, match="Simulation failed"):
        run_simulation("brats_fedavg", params, tmp_path / "config.json", tmp_path / "ws")
    run = tmp_path / "ws" / "brats_fedavg"
    assert "nowhere/BraTS20_Training_999_t1ce.nii.gz: missing t1ce file" in (run / "site-2" / "log.txt").read_text()
    server_log = (run / "server" / "log.txt").read_text()
    assert "Result from site-2 is bad" in server_log
    assert not (run / "server" / "simulate_job" / "app_server" / "FL_global_model.pt").exists()

    # the aborted run says so: its run record and every site's done.json, and the tables refuse it with the reason
    record = json.loads((run / "server" / "simulate_job" / RUN_RECORD).read_text())
    assert record["finished"] and record["complete"] is False
    assert "Result from site-2 is bad" in record["incomplete_reason"]
    done = {s: json.loads((run / s / "simulate_job" / "brats_fl" / DONE_FILE).read_text()) for s in SITES}
    assert not any(d["complete"] for d in done.values())
    assert done["site-2"]["incomplete_reason"].startswith("DataError: 1 data problem(s) found")
    assert main(["table", str(tmp_path / "ws"), "--include-incomplete"]) == 2
    assert "the run did not complete (Result from site-2 is bad" in capsys.readouterr().err


@pytest.mark.slow
def test_nvflare_simulator_runs_the_committed_job(sim_data: Path, tmp_path: Path):
    """`nvflare simulator jobs/brats_fedavg -w WS -n 3 -t 3`, typed in a folder holding site_configs/.

    The committed folder as it is, but for the number of rounds (3 of 20, to keep the suite short)."""
    job = tmp_path / "brats_fedavg"
    shutil.copytree(REPO / "jobs" / "brats_fedavg", job)
    server = job / "app" / "config" / "config_fed_server.json"
    config = json.loads(server.read_text())
    (controller,) = [w for w in config["workflows"] if w["args"].get("num_rounds") == JobParams().rounds]
    controller["args"]["num_rounds"] = 3
    server.write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if k != "BRATS_FL_SITE_CONFIG"} | {"PWD": str(sim_data.parents[1])}
    # the workspace's site policy admits the installed package's classes, as `brats-fl prepare` does for runs/simulator
    assert main(["site-policy", str(tmp_path / "ws")]) == 0
    command = ["nvflare", "simulator", str(job), "-w", str(tmp_path / "ws"), "-n", "3", "-t", "3"]
    out = subprocess.run(command, cwd=sim_data.parents[1], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = summarise_run(tmp_path / "ws")
    assert set(summary["test_per_site"]) == {"site-1", "site-2", "site-3"}
    for site, curves in summary["curves"].items():
        dice = curves["val_dice_WT"]
        assert len(dice) == 3 and dice[-1] > dice[0] + 0.05, (site, dice)
