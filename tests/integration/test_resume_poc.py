"""A job whose server dies mid-run and is resumed with ``brats-fl resume-job`` ends with the very models an
uninterrupted run of it ends with (a POC, no mocks), for each family that resumes: FedAvg-type (FedPer; Ditto,
whose sites keep a personal model), FedOpt (FedAdam: the server optimiser's moments), HyperSeg (Conv + BN: a server
hypernetwork, batch-norm statistics kept at the sites) and SegViz.

One POC runs the five jobs at once, to their end: the reference. It then runs them again at once, stops each job's
server process (SIGSTOP) once it has closed round 0, so that no job closes its last round however fast it runs, and
kills the server (SIGKILL, its job processes too) once every job has; meanwhile the sites train round 1. The server
starts again, and each job is resumed from the last global model the dead server left on its disk (with the
hypernetwork for HyperSeg, the moments for FedAdam). Every site goes on from what it kept: personal layers or
statistics, optimiser state, Ditto's personal model, and where its training loader stood in its random draws
(``brats_fl.data.loading.sampling_state``).

Equal means bit for bit: the global model, HyperSeg's hypernetwork, FedAdam's moments and every site's final models
(its last trained one and its personalised one). That holds because every step is deterministic on the CPU at one
thread per site, and with two sites each aggregation sums two terms, whose order cannot change a float sum
(HyperSeg's controller sums the sites in the order their answers arrive; with three or more sites an exact
comparison would need a fixed order).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from brats_fl.data.layout import find_cases
from brats_fl.data.partition import assign_sites, write_datalists
from brats_fl.jobs.export import export_jobs
from brats_fl.jobs.resume import checkpoint_round, resume_job
from brats_fl.ops import deploy
from brats_fl.seg.model import fingerprint
from brats_fl.server.fedopt import STATE_FILE as SERVER_OPTIMIZER_FILE
from brats_fl.server.hyperseg import STATE_FILE as HYPERNETWORK_FILE
from conftest import tiny_params

SITES = ["site-1", "site-2"]
JOBS = ["brats_fedper", "brats_ditto", "brats_fedadam", "brats_hyperseg_conv_bn", "brats_segviz_fedavg"]
#: two rounds: the server dies after a job's first, and the resumed job runs the second
TINY = tiny_params(rounds=2, local_epochs=1, sites=2, lr=3e-3, cross_site="none")
#: the files a site keeps of its final models (``brats_fl.site.client``)
SITE_MODELS = ("local_model.pt", "personalised_model.pt")


def _run_at_once(server_kit: Path, jobs: int) -> None:
    """Let the server run ``jobs`` jobs at once (FLARE's job scheduler runs 4 by default and queues the rest)."""
    path = server_kit / "local" / "resources.json"
    doc = json.loads(path.read_text())
    (scheduler,) = [c for c in doc["components"] if c["id"] == "job_scheduler"]
    scheduler["args"]["max_jobs"] = jobs
    path.write_text(json.dumps(doc, indent=2))


def _server_folder(system: deploy.System, job_id: str) -> Path:
    return system.kit(system.server) / job_id / "app_server"


def _closed(system: deploy.System, job_id: str) -> int | None:
    """The last round job ``job_id``'s server has closed, None before the first."""
    path = _server_folder(system, job_id) / "FL_global_model.pt"
    try:
        return checkpoint_round(path)
    except ValueError:  # not there yet, or being replaced
        return None


def _run_all(system: deploy.System, jobs: dict[str, Path], download_to: Path) -> dict[str, deploy.JobResult]:
    """Submit every job at once and wait for each to end; their results downloaded."""
    results = {}
    with system.session() as sess:
        ids = {name: sess.submit_job(str(folder)) for name, folder in jobs.items()}
        for name, job_id in ids.items():
            meta = sess.wait_for_job(job_id, timeout=900, poll_interval=3)
            folder = Path(sess.download_job_result(job_id, str(download_to)))
            results[name] = deploy.JobResult(job_id=job_id, status=str(meta.get("status")), folder=folder)
    for name, result in results.items():
        assert result.completed, (name, result, system.logs())
    return results


def _state(path: Path) -> dict[str, torch.Tensor]:
    blob = torch.load(path, map_location="cpu", weights_only=False)
    state = blob.get("model", blob.get("state_dict", blob.get("net")))
    return {k: torch.as_tensor(v) for k, v in state.items()}


def _final_models(kits: Path, result: deploy.JobResult) -> dict[str, str]:
    """Fingerprints of what a run ends with: the global model, the hypernetwork (HyperSeg) and each site's models."""
    server = result.folder / "workspace" / "app_server"
    found = {"global": fingerprint(_state(server / "FL_global_model.pt"))}
    if (server / HYPERNETWORK_FILE).is_file():
        found["hypernetwork"] = fingerprint(_state(server / HYPERNETWORK_FILE))
    if (server / SERVER_OPTIMIZER_FILE).is_file():
        moments = torch.load(server / SERVER_OPTIMIZER_FILE, map_location="cpu")["optimizer"]
        found["server optimiser"] = fingerprint({f"{k}.{key}": v for k in ("m", "v") for key, v in moments[k].items()})
    for site in SITES:
        for name in SITE_MODELS:
            found[f"{site}/{name}"] = fingerprint(_state(kits / site / result.job_id / "brats_fl" / name))
    return found


@pytest.mark.slow
def test_poc_jobs_resumed_after_the_server_died_end_with_the_uninterrupted_models(tiny_phantom, tmp_path):
    started = time.monotonic()
    jobs = dict(zip(JOBS, export_jobs(tmp_path / "jobs", JOBS, params=TINY), strict=True))
    lists = tmp_path / "lists"
    write_datalists(tiny_phantom, assign_sites(find_cases(tiny_phantom), 2, "equal", seed=0), lists)
    # a private HOME, so that FLARE's startup-kit registry (~/.nvflare) of this machine is left alone
    env = dict(os.environ) | {"HOME": str(tmp_path / "home")}
    kits = deploy.poc_prepare(tmp_path / "poc", len(SITES), deploy.free_port(), env=env)
    for site in SITES:
        deploy.install_site_config(kits / site, tiny_phantom, lists, threads=1)
    deploy.set_heartbeat_timeout(kits / "server", 20)
    _run_at_once(kits / "server", len(JOBS))
    timings = {}
    with deploy.System(kits, "server", deploy.POC_ADMIN, env=env) as system:
        system.start_all(SITES, timeout=240)
        timings["start"] = time.monotonic() - started
        reference = _run_all(system, jobs, tmp_path / "reference")
        timings["reference"] = time.monotonic() - started

        with system.session() as sess:
            interrupted = {name: sess.submit_job(str(folder)) for name, folder in jobs.items()}
        deadline, hung = time.monotonic() + 600, set()
        while len(hung) < len(JOBS):
            assert time.monotonic() < deadline, f"{sorted(hung)} of {JOBS} closed a round in 600 s\n{system.logs()}"
            for name, job_id in interrupted.items():
                if name not in hung and _closed(system, job_id) is not None:
                    # the job's server process stops (SIGSTOP) once it has closed round 0, so that however fast a
                    # job runs, none closes its last round before the server dies; its sites train round 1
                    system.hang(system.server, job_id)
                    hung.add(name)
            time.sleep(0.5)
        system.kill("server")
        closed = {name: _closed(system, job_id) for name, job_id in interrupted.items()}
        assert set(closed.values()) == {0}, closed
        # the jobs' folders stay on the server's disk when its process dies: take what resumes them from there
        checkpoints = {}
        for name, job_id in interrupted.items():
            kept = shutil.copytree(_server_folder(system, job_id), tmp_path / "checkpoints" / name)
            checkpoints[name] = kept / "FL_global_model.pt"
        system.start("server")
        system.wait_for_sites(SITES, timeout=240)
        timings["interrupted"] = time.monotonic() - started

        resumed_jobs = {
            name: resume_job(jobs[name], checkpoints[name], tmp_path / "resumed" / name)[0] for name in JOBS
        }
        resumed = _run_all(system, resumed_jobs, tmp_path / "results")
        timings["resumed"] = time.monotonic() - started
    print(f"resumed after rounds {closed}; seconds since the start: {timings}")

    for name in JOBS:
        for site in SITES:
            record = json.loads((kits / site / resumed[name].job_id / "brats_fl" / "site.json").read_text())
            went_on = record["resumed_from"]
            assert (went_on["round"], went_on["sampling_restored"]) == (closed[name], True), (name, site, went_on)
            rows = (kits / site / resumed[name].job_id / "brats_fl" / "rounds.jsonl").read_text().splitlines()
            assert [json.loads(r)["round"] for r in rows] == list(range(closed[name] + 1, TINY.rounds)), (name, site)
        assert _final_models(kits, resumed[name]) == _final_models(kits, reference[name]), name
