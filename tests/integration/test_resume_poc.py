"""A job whose server dies mid-run and is resumed with ``brats-fl resume-job`` ends with the very models an
uninterrupted run of it ends with (a POC, no mocks), for every family: FedAvg-type (FedPer; Ditto, whose sites keep
a personal model), FedOpt (FedAdam: the server optimiser's moments), SCAFFOLD (the server's control variate c, each
site's c_i), HyperSeg (Conv + BN: a server hypernetwork, batch-norm statistics kept at the sites), SegViz, and the
sequential jobs (cyclic: the travelling model, saved after every visit).

One POC runs the seven jobs at once, to their end: the reference. It then runs them again at once, stops each job's
server process (SIGSTOP) once it has saved its first checkpoint (a FedAvg-type job after round 0, the cyclic job
after its first visit, mid-pass), so that no job closes its last round however fast it runs, and kills the server
(SIGKILL, its job processes too) once every job has; meanwhile the sites train. The server starts again, and each
job is resumed from the last global model the dead server left on its disk (with the hypernetwork for HyperSeg, the
moments for FedAdam, c for SCAFFOLD). Every site goes on from what it kept: personal layers or statistics,
optimiser state, Ditto's personal model, SCAFFOLD's c_i, and where its training loader stood in its random draws
(``brats_fl.data.loading.sampling_state``); a cyclic site not yet visited in the first pass starts afresh.

Equal means bit for bit: the global model, HyperSeg's hypernetwork, FedAdam's moments, SCAFFOLD's c and every
site's final models (its last trained one and its personalised one). That holds because every step is deterministic
on the CPU at one thread per site, and with two sites each aggregation sums two terms, whose order cannot change a
float sum (HyperSeg's controller sums the sites in the order their answers arrive; with three or more sites an exact
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
from brats_fl.protocol import HYPERNETWORK_FILE, SCAFFOLD_FILE, SEQUENTIAL_META, SERVER_OPTIMIZER_FILE
from brats_fl.seg.model import fingerprint
from conftest import tiny_params

SITES = ["site-1", "site-2"]
JOBS = [
    "brats_fedper",
    "brats_ditto",
    "brats_fedadam",
    "brats_scaffold",
    "brats_hyperseg_conv_bn",
    "brats_segviz_fedavg",
    "brats_cyclic",
]
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


def _first_rounds(checkpoint: Path) -> dict[str, int]:
    """The first round each site trains in a job resumed from ``checkpoint``: the round after the one it closed, or
    for a sequential job (fixed order, sites sorted) the pass of the site's next visit."""
    meta = torch.load(checkpoint, map_location="cpu")["meta_props"]
    where = meta.get(SEQUENTIAL_META)
    if where is None:
        return dict.fromkeys(SITES, meta["current_round"] + 1)
    return {site: where["pass"] + (i < where["visited"]) for i, site in enumerate(SITES)}


def _closed(system: deploy.System, job_id: str) -> int | None:
    """The last round job ``job_id``'s server has closed (-1: a sequential job within its first pass), None before
    its first checkpoint."""
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
    if (server / SCAFFOLD_FILE).is_file():
        found["control variate"] = fingerprint(torch.load(server / SCAFFOLD_FILE, map_location="cpu")["controls"])
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
        # the cyclic job's first checkpoint is its first visit's, mid-pass 0; every other job's closes round 0
        assert closed == {name: -1 if name == "brats_cyclic" else 0 for name in JOBS}, closed
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
        first = _first_rounds(checkpoints[name])
        for site in SITES:
            folder = kits / site / resumed[name].job_id / "brats_fl"
            went_on = json.loads((folder / "site.json").read_text())["resumed_from"]
            if first[site] == 0:
                assert went_on["round"] is None, (name, site, went_on)
            else:
                assert (went_on["round"], went_on["sampling_restored"]) == (first[site] - 1, True), (name, site)
            rows = [json.loads(r)["round"] for r in (folder / "rounds.jsonl").read_text().splitlines()]
            before = kits / site / reference[name].job_id / "brats_fl" / "rounds.jsonl"
            everything = [json.loads(r)["round"] for r in before.read_text().splitlines()]
            assert rows == [r for r in everything if r >= first[site]], (name, site, rows, everything)
        assert _final_models(kits, resumed[name]) == _final_models(kits, reference[name]), name
