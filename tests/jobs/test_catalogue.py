"""The FLARE jobs, run for real in FLARE's simulator on a tiny phantom cohort (no mocks)."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from brats_fl.cli.main import main
from brats_fl.jobs.catalogue import MEMORY_GC_ROUNDS, STARTUP_WAITS, JobParams, build
from brats_fl.jobs.export import export_jobs
from brats_fl.jobs.registry import JOBS
from brats_fl.protocol import RESUME_FILE, SEQUENTIAL_META
from brats_fl.server.fedavg import rounds_left
from brats_fl.version import mismatch, running

REPO = Path(__file__).resolve().parents[2]


def _configs(job: Path, checkpoint: str = "") -> list[dict]:
    """A job's configurations; a server-side ``checkpoint`` path read as the checkpoint bundled into the job."""
    texts = [p.read_text() for p in sorted(job.glob("app/config/*.json"))]
    return [json.loads(t.replace(checkpoint, RESUME_FILE) if checkpoint else t) for t in texts]


def _checkpoint(folder: Path, rnd: int) -> Path:
    """A server's global model as FLARE's persistor saves it, with the hypernetwork state HyperSeg keeps beside it and
    the moments FedOpt keeps."""
    folder.mkdir(parents=True)
    torch.save({"model": {"w": torch.ones(2)}, "meta_props": {"current_round": rnd}}, folder / "FL_global_model.pt")
    torch.save({"round": rnd}, folder / "hypernetwork.pt")
    torch.save({"round": rnd}, folder / "server_optimizer.pt")
    torch.save({"round": rnd}, folder / "scaffold_controls.pt")
    return folder / "FL_global_model.pt"


def _sequential_checkpoint(folder: Path, closed: int, visited: int) -> Path:
    """A sequential job's travelling model as its server saves it after a visit (``brats_fl.server.sequential``)."""
    folder.mkdir(parents=True)
    where = {"pass": closed + 1, "visited": visited, "norms": [], "record": "{}"}
    meta = {"current_round": closed, SEQUENTIAL_META: where}
    torch.save({"model": {"w": torch.ones(2)}, "meta_props": meta}, folder / "FL_global_model.pt")
    return folder / "FL_global_model.pt"


def test_committed_jobs_match_their_definitions():
    assert main(["export-jobs", "--out", str(REPO / "jobs"), "--check"]) == 0


def test_export_check_notices_a_hand_edit(tmp_path: Path, capsys):
    export_jobs(tmp_path)
    assert main(["export-jobs", "--out", str(tmp_path), "--check"]) == 0
    config = tmp_path / "brats_fedavg" / "app" / "config" / "config_fed_client.json"
    config.write_text(config.read_text().replace('"local_epochs": 4', '"local_epochs": 9'))
    assert main(["export-jobs", "--out", str(tmp_path), "--check"]) == 1
    assert "brats_fedavg: missing or differs" in capsys.readouterr().out


def test_jobs_name_no_machine_path():
    for path in (REPO / "jobs").rglob("*.json"):
        text = path.read_text()
        assert str(REPO) not in text and "/home/" not in text and "/tmp/" not in text, path


@pytest.mark.parametrize(
    "job", ["brats_fedper", "brats_segviz_fedbn", "brats_hyperseg_conv_bn", "brats_fedyogi", "brats_scaffold"]
)
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


def test_resume_job_continues_a_sequential_job_after_its_last_visit(tmp_path: Path, capsys):
    """A sequential job resumes from the travelling model its server saved after the last visit, mid-pass too; a
    checkpoint that records no visits is refused."""
    cyclic = export_jobs(tmp_path / "submitted", ["brats_cyclic"])[0]
    checkpoint = _sequential_checkpoint(tmp_path / "server", closed=-1, visited=2)
    resumed = tmp_path / "resumed"
    assert main(["resume-job", str(cyclic), "--checkpoint", str(checkpoint), "--out", str(resumed)]) == 0
    assert "after visit 2 of pass 0, every site" in capsys.readouterr().out
    expected = export_jobs(tmp_path / "expected", ["brats_cyclic"], params=JobParams(resume_from=str(checkpoint)))[0]
    assert _configs(resumed) == _configs(expected, str(checkpoint))
    workflows = json.loads((resumed / "app" / "config" / "config_fed_server.json").read_text())["workflows"]
    (controller,) = [w for w in workflows if w["path"] == "brats_fl.server.sequential.SequentialTransfer"]
    assert controller["args"]["resume"] is True
    plain = _checkpoint(tmp_path / "fedavg_server", 0)
    assert main(["resume-job", str(cyclic), "--checkpoint", str(plain), "--out", str(tmp_path / "x")])
    assert f"{plain}: not a sequential job's checkpoint (it records no visits)" in capsys.readouterr().err
    last = _sequential_checkpoint(tmp_path / "ended", closed=1, visited=0)
    assert main(["resume-job", str(cyclic), "--checkpoint", str(last), "--out", str(tmp_path / "x")])
    assert "nothing to resume: the checkpoint closed round 1, the last of the job's 2" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_resume_job_refuses_what_cannot_resume(tmp_path: Path, capsys):
    checkpoint = _checkpoint(tmp_path / "server", 1)
    scaffold = export_jobs(tmp_path, ["brats_scaffold"])[0]
    torch.save({"round": 2}, checkpoint.parent / "scaffold_controls.pt")  # c saved, the global model not yet
    assert main(["resume-job", str(scaffold), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "x")])
    assert "scaffold_controls.pt: the control variate is of round 2, the global model of 1" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    fedadam = export_jobs(tmp_path, ["brats_fedadam"])[0]
    torch.save({"round": 0}, checkpoint.parent / "server_optimizer.pt")  # a server that died between the two saves
    assert main(["resume-job", str(fedadam), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "x")])
    assert "server_optimizer.pt: the server optimiser is of round 0, the global model of 1" in capsys.readouterr().err
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


def test_committed_jobs_are_configuration_naming_the_installed_package():
    """No job carries code; every site runs the installed package's executor, told its parameters as structured
    configuration, and every class a job names is one a site admits once it installs brats-fl."""
    from brats_fl.ops.policy import allowed, class_allow_list

    policy = class_allow_list()
    for job in sorted((REPO / "jobs").iterdir()):
        assert not (job / "app" / "custom").exists(), job
        client = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())
        (executor,) = [e["executor"] for e in client["executors"]]
        assert executor["path"] == "brats_fl.site.executor.SiteExecutor", job
        assert executor["args"]["config"]["job"] == job.name
        assert executor["args"]["expects"] == running()
        texts = "".join(p.read_text() for p in (job / "app" / "config").glob("*.json"))
        for path in re.findall(r'"path": "([\w.]+)"', texts):
            assert allowed(path, policy), (job.name, path)


def test_every_job_cleans_memory_every_round_at_its_sites_and_fedavg_at_its_server():
    """FLARE's per-round memory cleanup, which held a 200-round POC run's memory (docs/performance.md)."""
    for job in sorted((REPO / "jobs").iterdir()):
        client = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())
        (executor,) = [e["executor"] for e in client["executors"]]
        assert executor["args"]["memory_gc_rounds"] == MEMORY_GC_ROUNDS, job
    server = json.loads((REPO / "jobs" / "brats_fedavg" / "app" / "config" / "config_fed_server.json").read_text())
    (controller,) = [c for c in server["workflows"] if c["path"] == "brats_fl.server.fedavg.DeadlineFedAvg"]
    assert controller["args"]["memory_gc_rounds"] == MEMORY_GC_ROUNDS


def test_every_job_tells_its_sites_flare_s_start_up_waits(tmp_path: Path):
    """FLARE's 60 s for a site's job process to reach the server's ended jobs started at once on a busy machine
    (issue 37); every job, whatever its recipe, gives its sites the project's wait, which FLARE reads there."""
    assert STARTUP_WAITS["max_runner_sync_timeout"] > 60
    for job in export_jobs(tmp_path, ["brats_fedavg", "brats_cyclic", "brats_hyperseg_conv", "brats_scaffold"]):
        client = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())
        assert {k: client.get(k) for k in STARTUP_WAITS} == STARTUP_WAITS, job.name


def test_bundled_jobs_carry_the_package_and_stay_out_of_the_repository(tmp_path: Path):
    """A bundled job imports the client script and model from its own custom/ folder alone."""
    job = export_jobs(tmp_path, ["brats_fedavg"], bundle=True)[0]
    custom = job / "app" / "custom"
    code = (
        "import sys; "
        f"sys.path = [{str(custom)!r}] + [p for p in sys.path if not p.startswith({str(REPO / 'custom')!r})]; "
        "import brats_fl.site.client, brats_fl.seg.model, brats_fl.version as v; "
        "print(brats_fl.site.client.__file__); print(v.code_sha256())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=False)
    assert out.returncode == 0, out.stderr
    where, code_hash = out.stdout.split()
    assert where.startswith(str(custom)) and code_hash == running()["code_sha256"]
    with pytest.raises(ValueError, match="write them outside"):
        export_jobs(REPO / "jobs" / "bundled", ["brats_fedavg"], bundle=True)
    assert not (REPO / "jobs" / "bundled").exists()


def test_other_code_is_refused_naming_where_both_versions_and_the_fix():
    here = running()
    assert mismatch(here, "site-1") is None
    older = mismatch({"version": "0.1.0", "code_sha256": "sha256:" + "0" * 64}, "site-2")
    assert older.startswith(f"site-2 runs brats-fl {here['version']}") and "exported from brats-fl 0.1.0" in older
    assert "Fix: pip install brats-fl==0.1.0 at site-2" in older
    edited = mismatch({**here, "code_sha256": "sha256:" + "1" * 64}, "the server (server)")
    assert f"exported from brats-fl {here['version']} (code 111111111111)" in edited
    assert "brats-fl export-jobs" in edited


#: the jobs whose papers keep batch-norm statistics at the sites: FedBN, SegViz's FedBN, HyperSeg's Conv + BN
BATCH_NORM_JOBS = {
    "brats_fedbn",
    "brats_fedbn_ft",
    "brats_segviz_fedbn",
    "brats_hyperseg_conv_bn",
    "brats_hyperseg_conv_bn_emb",
}


def test_fedbn_jobs_default_to_batch_norm_and_every_other_job_to_the_networks_own():
    """Server model and sites agree on the job's own normalisation (the FedBN family's batch norm; any other job leaves
    it to the network, the U-Net's instance norm); HyperSeg Conv + BN generates the learnable normalisation tensors and
    leaves the running statistics at the sites (``stats``)."""
    for job in sorted(JOBS):
        configs = _configs(REPO / "jobs" / job)
        norms = set(re.findall(r'"norm": "(\w+)"', json.dumps(configs)))
        if job in BATCH_NORM_JOBS:
            assert norms == {"batch"}, job
        else:
            assert norms <= {"instance"} and '"norm": null' in json.dumps(configs[0]), job
    server, client = _configs(REPO / "jobs" / "brats_hyperseg_conv_bn")[::-1]
    assert '"personal": "stats"' in json.dumps(client)
    generated = next(c["args"]["personal_keys"] for c in server["workflows"] if "personal_keys" in c["args"])
    assert generated and not [k for k in generated if "running" in k or "num_batches" in k]


def test_only_hyperseg_conv_bn_sites_re_estimate_their_batch_norm_statistics(tmp_path: Path):
    """The hypernetwork regenerates the normalisation layers each round: Conv + BN's sites re-estimate the statistics
    they keep for each received model (``recalibrate_stats``); no other job's sites spend the pass."""
    for job in ("brats_hyperseg_conv_bn", "brats_hyperseg_conv", "brats_fedbn"):
        build(job, JobParams()).export(str(tmp_path))
        client = _configs(tmp_path / job)[0]
        assert ('"recalibrate_stats": true' in json.dumps(client)) is (job == "brats_hyperseg_conv_bn"), job


def test_a_chosen_norm_wins_over_the_jobs_and_a_bad_one_is_refused(tmp_path: Path):
    build("brats_fedbn", JobParams(norm="group")).export(str(tmp_path))
    assert set(re.findall(r'"norm": "(\w+)"', json.dumps(_configs(tmp_path / "brats_fedbn")))) == {"group"}
    with pytest.raises(ValueError, match=r"job parameter out of range: need norm one of \['batch'"):
        JobParams(norm="layer")
    with pytest.raises(ValueError, match="job parameter out of range: group norm .* multiple of 8, got \\[12, 24\\]"):
        JobParams(norm="group", channels=(12, 24), patch_size=(32, 32, 32))


def test_job_parameters_survive_pickling_as_brats_fl_run_sends_them_to_the_simulator():
    params = JobParams(norm="batch", rounds=3)
    assert pickle.loads(pickle.dumps(params)) == params


def test_a_missing_site_configuration_is_refused_before_flare_starts(tmp_path):
    from brats_fl.jobs.catalogue import JobParams
    from brats_fl.jobs.simulate import run_simulation

    missing = tmp_path / "no" / "site.json"
    with pytest.raises(FileNotFoundError, match="site.json: site configuration does not exist"):
        run_simulation("brats_fedavg", JobParams(), missing, tmp_path / "workspace")
    assert not (tmp_path / "workspace").exists()
