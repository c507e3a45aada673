"""Run a catalogue job in FLARE's simulator on this machine.

With ``progress`` the simulator's output (FLARE's own and that of the site processes it starts, which inherit the
file descriptors) goes to ``<workspace>/<job>_simulator.log`` (beside the job's folder, which the simulator empties
when it starts), while a thread shows each site's rounds (``brats_fl.jobs.live``) or, ``verbose``, copies the log
to the terminal.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from tempfile import TemporaryDirectory

import torch
from nvflare.fuel.f3.mpm import MainProcessMonitor
from nvflare.fuel.utils.log_utils import FL_LOG_LEVEL, LogMode
from nvflare.job_config.api import FedJob
from nvflare.private.fed.app.simulator.simulator_runner import SimulatorRunner
from nvflare.recipe import SimEnv

from brats_fl.data.datalist import SPLITS, load_datalist
from brats_fl.data.partition import POOLED_SITE, site_names
from brats_fl.jobs.catalogue import JobParams, build, planned_rounds
from brats_fl.jobs.live import LiveView, failure_report, read_rows
from brats_fl.jobs.registry import get_job
from brats_fl.ops.policy import install_policy
from brats_fl.settings import numerics
from brats_fl.site.config import ENV_VAR, THREADS_VAR, resolve

#: seconds between two looks at the sites' rows or the log
POLL = 1.0
#: seconds FLARE's process monitor waits, once the simulation has ended, for "pending activities" before it closes the
#: simulator's connections (FLARE: 3 s); by then every site has ended its run and the server has stopped
SHUTDOWN_GRACE = 0.2


def run_simulation(
    name: str,
    params: JobParams,
    site_config: Path,
    workspace: Path,
    *,
    progress: bool = False,
    verbose: bool = False,
    numerics_mode: str = "portable",
    cores: int | None = None,
) -> Path:
    """Run a job in FLARE's simulator with every site reading ``site_config``; returns the job's workspace.

    ``progress`` shows the rounds as they finish and keeps FLARE's output in ``<workspace>/<job>_simulator.log``
    (``verbose``: shows that output instead); without it FLARE runs in this process and prints as it likes.
    ``numerics_mode`` ``portable`` pins the sites' CPU kernels so that a seed gives the same model on every machine of
    this kind (``brats_fl.settings.numerics``); ``native`` lets torch choose.
    ``cores``: the cores the run may use (default the machine's), less where several runs share it."""
    # the sites would find it missing only inside FLARE's processes, after start-up, and say so in its log alone
    if not Path(site_config).is_file():
        raise FileNotFoundError(f"{site_config}: site configuration does not exist")
    job = get_job(name)
    sites = 1 if job.pooled else params.sites
    root = Path(workspace).resolve()
    check_site_data(name, site_names(sites), Path(site_config), root, params.final_split)
    # inherited by the simulator's site processes, which share this machine's cores
    training_at_once = 1 if job.sequential else sites
    threads = max(1, (cores or os.cpu_count() or 1) // training_at_once)
    settings = {ENV_VAR: str(Path(site_config).resolve()), THREADS_VAR: str(threads)}
    settings |= numerics.environment(numerics_mode)
    # the simulated participants allow the installed package's classes, as a real site does (brats_fl.ops.policy)
    install_policy(root / name)
    previous = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        if progress:
            _run_watched(name, params, sites, root, verbose)
        else:
            _simulate(name, params, sites, root)
    finally:
        for key, value in previous.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value
    return root / name


def check_site_data(name: str, sites: list[str], site_config: Path, workspace: Path, final_split: str = "test") -> None:
    """Refuse, before FLARE starts, a site whose data root, datalist folder or datalist is missing or empty, or whose
    datalist lacks a split the job uses; otherwise the site would fail only after FLARE's start-up, and say why in its
    own log alone. Each site's data is resolved by the site's own code (``brats_fl.site.config.resolve``) and its
    datalist read as the site reads it, without the per-file data checks, which the site runs at its start."""
    pooled = POOLED_SITE if get_job(name).pooled else None
    for site in sites:
        data = resolve(site, pooled, workspace=workspace / name / site, config=site_config)
        datalist = load_datalist(data.datalist, data.data_root, check=False)
        # a site being tuned scores validation after training, and never opens its test split
        used = [split for split in SPLITS if split != "test" or final_split == "test"]
        sizes = {split: len(datalist.items(split)) for split in SPLITS}
        empty = [split for split in used if not sizes[split]]
        if empty:
            counts = "/".join(map(str, sizes.values()))
            raise ValueError(
                f"{name} scores each site's validation split every round and its test split after training, but "
                f"{site}'s datalist {data.datalist} has no {' and no '.join(empty)} case (train/val/test {counts}); "
                "write the partition with a share of cases in every split (brats-fl partition --split)"
            )


def _simulate(name: str, params: JobParams, sites: int, root: Path) -> None:
    env = ForkedSimEnv(num_clients=sites, num_threads=sites, workspace_root=str(root))
    build(name, params).run(env)


class ForkedSimEnv(SimEnv):
    """FLARE's simulator, its server forked from this process instead of started as ``python -m ...simulator``.

    ``SimEnv`` starts a new interpreter that imports FLARE, torch, MONAI and the job's server components again before
    it forks the simulated server: 3 to 5 s of every run on two cores (``docs/performance.md``). Here this process,
    which has imported them already, runs FLARE's own ``SimulatorRunner`` on the exported job; the sites are still
    FLARE's own worker processes, and the server the same code as in every other mode."""

    def deploy(self, job: FedJob) -> str:
        workspace = os.path.join(self.workspace_root, job.name)
        self._ensure_default_component_policy(workspace)
        with TemporaryDirectory() as job_root:
            job.export_job(job_root)
            runner = _Simulator(
                job_folder=os.path.join(job_root, job.name),
                workspace=workspace,
                n_clients=self.num_clients,
                threads=self.num_threads,
                log_config=self.log_config or os.environ.get(FL_LOG_LEVEL, LogMode.CONCISE),
            )
            status = runner.run()
        if status not in (None, 0):
            raise RuntimeError(f"Simulation failed with return code {status}; the sites' logs are under {workspace}")
        return job.name


class _Simulator(SimulatorRunner):
    """FLARE's simulator with a shorter shut-down grace (``SHUTDOWN_GRACE``), in a child forked from a process that may
    have used torch's thread pool."""

    def run_process(self, return_dict: dict) -> None:
        # OpenMP's pool does not survive a fork: one thread keeps the server's tensor arithmetic out of it
        torch.set_num_threads(1)
        return_dict["run_status"] = MainProcessMonitor.run(
            main_func=self.simulator_run_main,
            run_dir=self.workspace,
            shutdown_grace_time=SHUTDOWN_GRACE,
            cleanup_grace_time=6,
        )


def _run_watched(name: str, params: JobParams, sites: int, root: Path, verbose: bool) -> None:
    """Run the simulator in this process with its output, and that of the site processes FLARE starts (which inherit
    the file descriptors), sent to the log at the descriptor level, while a thread shows each site's rounds (or copies
    the log) to the terminal; when it fails, show the log's errors and where the log is, then raise what it raised.

    In this process, not a child's: a spawned child imported torch, MONAI and FLARE a second time, about 5 s of CPU
    of every run's fixed cost (``docs/performance.md``)."""
    run_dir = root / name
    log = root / f"{name}_simulator.log"
    log.write_bytes(b"")
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    view = LiveView(name, planned_rounds(name, params), [f"site-{i}" for i in range(1, sites + 1)], terminal)
    done = threading.Event()

    def watch() -> None:
        with log.open("rb") as tail:
            while True:
                finished = done.wait(POLL)
                if verbose:
                    terminal.buffer.write(tail.read())
                    terminal.flush()
                else:
                    view.refresh(read_rows(run_dir))
                if finished:
                    return

    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    watcher = threading.Thread(target=watch, name="brats-fl-live-view", daemon=True)
    watcher.start()
    try:
        _simulate(name, params, sites, root)
    except BaseException:
        _restore(saved, done, watcher, terminal)
        print("", *failure_report(name, run_dir, log), sep="\n", file=sys.stderr)
        raise
    _restore(saved, done, watcher, terminal)
    if not verbose:
        print(f"FLARE's log: {log}")


def _restore(saved: tuple[int, int], done: threading.Event, watcher: threading.Thread, terminal) -> None:
    """Send this process's output to where it went before the run, after the watcher's last look."""
    sys.stdout.flush()
    sys.stderr.flush()
    done.set()
    watcher.join()
    terminal.close()
    for fd, original in zip((1, 2), saved, strict=True):
        os.dup2(original, fd)
        os.close(original)
