"""Run a catalogue job in FLARE's simulator on this machine."""

from __future__ import annotations

import os
from pathlib import Path

from nvflare.recipe import SimEnv

from brats_fl.jobs.catalogue import POOLED, SEQUENTIAL, JobParams, build
from brats_fl.ops.policy import install_policy
from brats_fl.site.config import ENV_VAR, THREADS_VAR


def run_simulation(name: str, params: JobParams, site_config: Path, workspace: Path) -> Path:
    """Run a job in FLARE's simulator with every site reading ``site_config``; returns the job's workspace."""
    sites = 1 if name in POOLED else params.sites
    env = SimEnv(num_clients=sites, num_threads=sites, workspace_root=str(Path(workspace).resolve()))
    # inherited by the simulator's site processes, which share this machine's cores
    training_at_once = 1 if name in SEQUENTIAL else sites
    threads = max(1, (os.cpu_count() or 1) // training_at_once)
    settings = {ENV_VAR: str(Path(site_config).resolve()), THREADS_VAR: str(threads)}
    # the simulated participants allow the installed package's classes, as a real site does (brats_fl.ops.policy)
    install_policy(Path(workspace).resolve() / name)
    previous = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        build(name, params).run(env)
    finally:
        for key, value in previous.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value
    return Path(workspace).resolve() / name
