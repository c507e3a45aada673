"""How the code reaches the sites, in FLARE's real simulator: a bundled job runs where brats-fl is not installed,
and a server or site running other brats-fl code refuses a job before any training."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import brats_fl
import pytest
from brats_fl.jobs.export import export_jobs
from brats_fl.ops.policy import install_policy
from brats_fl.results.report import summarise_run
from conftest import tiny_params

TINY = tiny_params(rounds=2, local_epochs=1)
SITES = ["site-1", "site-2", "site-3"]
NVFLARE = "import sys; from nvflare.cli import main; sys.exit(main())"


def _python_without_brats_fl(folder: Path) -> Path:
    """A Python that sees this environment's packages (torch, MONAI, FLARE) but not brats-fl: a bare virtual
    environment whose one .pth file adds the site-packages folder, whose own .pth files (among them the editable
    install of brats-fl) a plain path entry does not process."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    (shadow_site,) = folder.glob("lib/python*/site-packages")
    (shadow_site / "shared.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = folder / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import brats_fl"], capture_output=True, text=True, cwd=folder)
    assert probe.returncode != 0 and "No module named 'brats_fl'" in probe.stderr
    return python


def _simulate(python: Path, job: Path, workspace: Path, sim_data: Path) -> subprocess.CompletedProcess:
    env = {"BRATS_FL_SITE_CONFIG": str(sim_data), "BRATS_FL_THREADS": "1", "PATH": str(python.parent) + ":/usr/bin"}
    command = [str(python), "-c", NVFLARE, "simulator", str(job), "-w", str(workspace), "-n", "3", "-t", "3"]
    return subprocess.run(command, cwd=workspace.parent, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_bundled_job_runs_where_brats_fl_is_not_installed(sim_data: Path, tmp_path: Path):
    job = export_jobs(tmp_path / "bundled", ["brats_fedavg"], params=TINY, bundle=True)[0]
    python = _python_without_brats_fl(tmp_path / "env")
    out = _simulate(python, job, tmp_path / "ws", sim_data)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = summarise_run(tmp_path / "ws")
    assert set(summary["test_per_site"]) == set(SITES)
    for site in SITES:
        (record,) = (tmp_path / "ws" / site).rglob("brats_fl/site.json")
        package = Path(json.loads(record.read_text())["code"]["package"])
        assert package.parent.name == "custom" and package.is_relative_to(tmp_path / "ws"), package
        assert len((record.parent / "rounds.jsonl").read_text().splitlines()) == TINY.rounds


def _refused(job: Path, side: str, workspace: Path, sim_data: Path) -> str:
    """Run ``job`` with the brats-fl code hash ``side`` expects edited; returns every log line of the run."""
    config = job / "app" / "config" / f"config_fed_{side}.json"
    config.write_text(config.read_text().replace('"code_sha256": "sha256:', '"code_sha256": "sha256:0000'))
    install_policy(workspace)
    out = _simulate(Path(sys.executable), job, workspace, sim_data)
    assert not list(workspace.rglob("rounds.jsonl")), "a site trained"
    return out.stdout + out.stderr + "".join(p.read_text() for p in workspace.rglob("log.txt"))


@pytest.mark.slow
def test_other_brats_fl_code_is_refused_before_any_training(sim_data: Path, tmp_path: Path):
    version = brats_fl.__version__
    job = export_jobs(tmp_path / "a", ["brats_fedavg"], params=TINY)[0]
    sites = _refused(job, "client", tmp_path / "ws_a", sim_data)
    for site in SITES:
        assert f"{site} runs brats-fl {version} (code " in sites
    assert "refusing the job before any training. Fix: install the same brats-fl code at site-1" in sites
    job = export_jobs(tmp_path / "b", ["brats_fedavg"], params=TINY)[0]
    server = _refused(job, "server", tmp_path / "ws_b", sim_data)
    assert f"the server (simulator_server) runs brats-fl {version}" in server
