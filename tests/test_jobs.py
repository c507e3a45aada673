"""The FLARE jobs, run for real in FLARE's simulator on a tiny phantom cohort (no mocks)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from brats_fl.algorithms.rounds import rounds_left
from brats_fl.cli import main
from brats_fl.jobs import JobParams, export_jobs, run_simulation
from brats_fl.report import summarise_run
from brats_fl.resume import RESUME_FILE

REPO = Path(__file__).resolve().parents[1]
TINY = JobParams(rounds=3, local_epochs=3, patch_size=(32, 32, 32), channels=(8, 16, 32), lr=3e-3)


def _state(path: Path) -> dict[str, torch.Tensor]:
    blob = torch.load(path, map_location="cpu", weights_only=False)
    return {k: torch.as_tensor(v) for k, v in blob.get("model", blob).items()}


def test_committed_jobs_match_their_definitions():
    assert main(["export-jobs", "--out", str(REPO / "jobs"), "--check"]) == 0


def test_export_check_notices_a_hand_edit(tmp_path: Path, capsys):
    export_jobs(tmp_path)
    assert main(["export-jobs", "--out", str(tmp_path), "--check"]) == 0
    config = tmp_path / "brats_fedavg" / "app" / "config" / "config_fed_client.json"
    config.write_text(config.read_text().replace("--local-epochs", "--local-epochs 9 --x"))
    assert main(["export-jobs", "--out", str(tmp_path), "--check"]) == 1
    assert "brats_fedavg: missing or differs" in capsys.readouterr().out


def test_jobs_name_no_machine_path():
    for path in (REPO / "jobs").rglob("*.json"):
        text = path.read_text()
        assert str(REPO) not in text and "/home/" not in text and "/tmp/" not in text, path


def _configs(job: Path, checkpoint: str = "") -> list[dict]:
    """A job's configurations; a server-side ``checkpoint`` path read as the checkpoint bundled into the job."""
    texts = [p.read_text() for p in sorted(job.glob("app/config/*.json"))]
    return [json.loads(t.replace(checkpoint, RESUME_FILE) if checkpoint else t) for t in texts]


def _checkpoint(folder: Path, rnd: int) -> Path:
    """A server's global model as FLARE's persistor saves it, with the hypernetwork state HyperSeg keeps beside it."""
    folder.mkdir(parents=True)
    torch.save({"model": {"w": torch.ones(2)}, "meta_props": {"current_round": rnd}}, folder / "FL_global_model.pt")
    torch.save({"round": rnd}, folder / "hypernetwork.pt")
    return folder / "FL_global_model.pt"


@pytest.mark.parametrize("job", ["brats_fedper", "brats_segviz_fedbn", "brats_hyperseg_conv_bn"])
def test_resume_job_is_the_export_with_resume_from(job: str, tmp_path: Path, capsys):
    """`brats-fl resume-job` turns a submitted job folder into the one the definitions export with resume_from,
    with the checkpoint bundled into the job."""
    checkpoint = _checkpoint(tmp_path / "server" / "1234", 1)
    submitted = export_jobs(tmp_path / "submitted", [job])[0]
    expected = export_jobs(tmp_path / "expected", [job], params=JobParams(resume_from=str(checkpoint)))[0]
    assert _configs(submitted) != _configs(expected, str(checkpoint))
    resumed = tmp_path / "resumed"
    assert main(["resume-job", str(submitted), "--checkpoint", str(checkpoint), "--out", str(resumed)]) == 0
    assert "after round 1" in capsys.readouterr().out
    assert _configs(resumed) == _configs(expected, str(checkpoint))
    assert (resumed / "app" / "custom" / RESUME_FILE).read_bytes() == checkpoint.read_bytes()
    assert main(["resume-job", str(submitted), "--checkpoint", str(checkpoint), "--out", str(resumed)]) == 2
    assert "resumed: already exists" in capsys.readouterr().err
    # a resumed job that is interrupted in its turn continues from its own, newer checkpoint
    newer = _checkpoint(tmp_path / "server" / "5678", 3)
    assert main(["resume-job", str(resumed), "--checkpoint", str(newer), "--out", str(tmp_path / "again")]) == 0
    assert _configs(tmp_path / "again") == _configs(expected, str(checkpoint))
    assert (tmp_path / "again" / "app" / "custom" / RESUME_FILE).read_bytes() == newer.read_bytes()


def test_resume_job_refuses_what_cannot_resume(tmp_path: Path, capsys):
    checkpoint = _checkpoint(tmp_path / "server", 1)
    cyclic = export_jobs(tmp_path, ["brats_cyclic"])[0]
    assert main(["resume-job", str(cyclic), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "x")])
    assert "cannot resume (the sequential jobs cannot)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    fedavg = export_jobs(tmp_path, ["brats_fedavg"])[0]
    broken = tmp_path / "broken.pt"
    broken.write_bytes(checkpoint.read_bytes()[:100])
    torch.save({"model": {}}, tmp_path / "no_round.pt")
    last = _checkpoint(tmp_path / "finished", JobParams().rounds - 1)
    hyperseg = export_jobs(tmp_path, ["brats_hyperseg_conv"])[0]
    assert main(["resume-job", str(hyperseg), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "x")]) == 0
    torch.save({"round": 0}, checkpoint.parent / "hypernetwork.pt")  # a server that died between the two saves
    assert main(["resume-job", str(hyperseg), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "z")])
    assert "the hypernetwork is of round 0, the global model of 1" in capsys.readouterr().err
    cases = [(broken, "not a readable checkpoint"), (tmp_path / "no_round.pt", "records no completed round")]
    cases.append((last, "nothing to resume: the checkpoint closed round 19, the last of the job's 20"))
    for bad, why in cases:
        assert main(["resume-job", str(fedavg), "--checkpoint", str(bad), "--out", str(tmp_path / "y")])
        assert f"{bad}: {why}" in capsys.readouterr().err
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_rounds_left_after_a_checkpoint():
    assert rounds_left({"current_round": 1}, total=5) == (2, 3)
    with pytest.raises(ValueError, match="nothing to resume: the checkpoint closed round 4, the last of the job's 5"):
        rounds_left({"current_round": 4}, total=5)
    with pytest.raises(ValueError, match="records no completed round"):
        rounds_left({}, total=5)


@pytest.mark.parametrize("job", ["brats_central", "brats_local", "brats_fedavg"])
def test_exported_job_carries_its_code(job: str):
    """A site without our package installed can import the client script and model from the job alone."""
    custom = REPO / "jobs" / job / "app" / "custom"
    code = (
        "import sys; "
        f"sys.path = [{str(custom)!r}] + [p for p in sys.path if not p.startswith({str(REPO)!r})]; "
        "import brats_fl.client, brats_fl.model; print(brats_fl.client.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(custom))


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
    """Data loading, augmentation, initialisation and training take their seeds from the job's: a repeat of the
    shared run gives the same global model. (It did not while the server summed the updates in arrival order: one
    ulp in round 1's global model grew to 1e-3 by round 3.)"""
    workspace, params = fedavg_run
    again = run_simulation("brats_fedavg", params, sim_data, tmp_path)
    final = Path("server") / "simulate_job" / "app_server" / "FL_global_model.pt"
    first, second = _state(workspace / "brats_fedavg" / final), _state(again / final)
    assert set(first) == set(second)
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=1e-6, msg=key)
    initial = params.model().state_dict()
    assert any(not torch.allclose(first[k], initial[k]) for k in first), "training moved the model"


@pytest.mark.slow
def test_local_only_sends_no_weights(sim_data: Path, tmp_path: Path):
    params = JobParams(**{**vars(TINY), "rounds": 2, "local_epochs": 2, "extra_args": ["--audit"]})
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
def test_site_with_bad_data_stops_the_job_and_is_named(sim_data: Path, tmp_path: Path):
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
    command = ["nvflare", "simulator", str(job), "-w", str(tmp_path / "ws"), "-n", "3", "-t", "3"]
    out = subprocess.run(command, cwd=sim_data.parents[1], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = summarise_run(tmp_path / "ws")
    assert set(summary["test_per_site"]) == {"site-1", "site-2", "site-3"}
    for site, curves in summary["curves"].items():
        dice = curves["val_dice_WT"]
        assert len(dice) == 3 and dice[-1] > dice[0] + 0.1, (site, dice)
