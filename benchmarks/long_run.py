"""Many sites and long runs: a 16-site FedAvg in FLARE's simulator, and resident memory over a 200-round POC.

    python benchmarks/long_run.py [--out runs/long_run] sites [--sites 16] [--rounds 3]
    python benchmarks/long_run.py [--out runs/long_run] memory [--rounds 200] [--sites 2] [--from 20] \
        [--figure docs/figures/long_run_rss.png]

Both run ``brats_fedavg`` with a tiny U-Net (channels 4-8-16, 16³ patches, one local epoch of one training case per
site, no cross-site evaluation) on a tiny phantom (3 cases of 32×32×24 per site), so that the rounds are short and
what is measured is FLARE's and the job's own cost, not training.

``sites`` runs the job in FLARE's simulator with ``--sites`` sites (one torch thread each, as ``brats-fl run`` gives
them on 2 cores) and records the wall time, whether every site trained in every round (its ``rounds.jsonl``) and
the peak resident memory of the whole process tree (sum of RSS, and of PSS, which counts shared pages once).

``memory`` starts a real POC (``brats_fl.ops.deploy``: FLARE's processes from their startup kits, a private HOME,
a free port), submits the job with ``--rounds`` rounds and, each time the server logs ``Round r started``, samples
the resident set size of the server's process, the server's job process, and each site's process and job process
(found by their command lines below the processes the POC started). Round k (1-based) is the sample taken as FLARE's
round k-1 starts. Writes ``memory.csv`` (one row per round and process) and the curve, and reports the growth of each
process from round ``--from`` (20) to the last round.

Generated data and workspaces go under ``--out`` (git-ignored ``runs/``). Each prints JSON with the command, the
date and the machine, and writes it to ``<out>/sites.json`` or ``<out>/memory.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import os
import platform
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from brats_fl.data.layout import find_cases  # noqa: E402
from brats_fl.data.partition import assign_sites, write_datalists  # noqa: E402
from brats_fl.data.phantom import generate_cohort  # noqa: E402
from brats_fl.jobs.catalogue import JobParams  # noqa: E402
from brats_fl.jobs.export import export_jobs  # noqa: E402
from brats_fl.jobs.simulate import run_simulation  # noqa: E402
from brats_fl.ops import deploy  # noqa: E402

JOB = "brats_fedavg"
#: 3 cases a site: one each for training, validation and test (the partition's minimum)
CASES_PER_SITE = 3
SHAPE = (32, 32, 24)
#: FLARE's FedAvg logs this on the server as each round begins
ROUND_STARTED = re.compile(r"Round (\d+) started\.")
#: the start of a stamped line of FLARE's log
STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")
#: FLARE's modules whose processes are measured: the participant's own process, and the one it starts per job
ROLES = {
    "nvflare.private.fed.app.server.server_train": "",
    "nvflare.private.fed.app.server.runner_process": " job",
    "nvflare.private.fed.app.client.client_train": "",
    "nvflare.private.fed.app.client.worker_process": " job",
}
MIB = 2**20


def tiny_params(rounds: int, sites: int) -> JobParams:
    """The job's parameters: a U-Net and patches small enough that a round costs FLARE's overhead, not training."""
    return JobParams(
        rounds=rounds,
        local_epochs=1,
        sites=sites,
        patch_size=(16, 16, 16),
        channels=(4, 8, 16),
        cross_site="none",
    )


def cohort(root: Path, sites: int) -> tuple[Path, Path]:
    """A tiny phantom of ``CASES_PER_SITE`` cases per site and its datalists (made once); returns both folders."""
    data, lists = root / "cohort", root / "lists"
    if not data.exists():
        generate_cohort(data, cases=CASES_PER_SITE * sites, sites=sites, seed=3, shape=SHAPE)
    if not lists.exists():
        write_datalists(data, assign_sites(find_cases(data), sites, "equal", seed=0), lists)
    return data.resolve(), lists.resolve()


def machine() -> str:
    """CPU model, cores and torch, as the other benchmarks print them."""
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    return f"{model}, {os.cpu_count()} cores, {platform.machine()}, torch {torch.__version__}"


def memory_mib(proc: psutil.Process) -> tuple[float, float]:
    """Resident set (RSS) and unique set (USS: the pages no other process shares, what the process itself holds;
    RSS also counts shared library pages as the process first touches them) in MiB."""
    info = proc.memory_full_info()
    return info.rss / MIB, info.uss / MIB


def growth(series: dict[int, float], start: int, end: int) -> float:
    """Growth in per cent of ``series`` (round -> value) from round ``start`` to round ``end``."""
    return 100.0 * (series[end] / series[start] - 1.0)


class RoundWatcher:
    """The rounds of job ``job_id`` the server starts, from its log's lines in order. FLARE writes the round's banner
    on the lines after the stamped line that names the job, so a banner belongs to the last stamped line's job."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        self.ours = False

    def feed(self, lines: list[str]) -> list[int]:
        """FLARE's 0-based numbers of the rounds started in ``lines``."""
        found = []
        for line in lines:
            if STAMP.match(line):
                self.ours = f"run={self.job_id}" in line
            elif self.ours and (banner := ROUND_STARTED.search(line)):
                found.append(int(banner.group(1)))
        return found


def label(proc: psutil.Process, participant: str) -> str | None:
    """``site-1`` or ``site-1 job`` (``server``, ``server job``) for FLARE's processes, None for any other."""
    with contextlib.suppress(psutil.Error):
        command = proc.cmdline()
        for module, suffix in ROLES.items():
            if module in command:
                return participant + suffix
    return None


class TreeMemory(threading.Thread):
    """Samples the summed RSS and PSS of this process and all its descendants until stopped; keeps the peaks."""

    def __init__(self, interval: float = 1.0):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak_rss = self.peak_pss = 0.0
        self.peak_processes = 0
        self._done = threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self._done.wait(self.interval):
            rss = pss = 0.0
            procs = [me, *me.children(recursive=True)]
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    info = proc.memory_full_info()
                    rss += info.rss / MIB
                    pss += info.pss / MIB
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.peak_processes = max(self.peak_processes, len(procs))

    def stop(self) -> None:
        self._done.set()
        self.join()


def run_sites(out: Path, sites: int, rounds: int) -> dict:
    """The job with ``sites`` simulated sites: wall time, whether each site trained every round, peak memory."""
    data, lists = cohort(out / f"cohort_{sites}", sites)
    config = out / f"sites_{sites}.json"
    config.write_text(json.dumps({"data_root": str(data), "datalist_dir": str(lists), "threads": 1}))
    workspace = out / f"sim_{sites}"
    shutil.rmtree(workspace, ignore_errors=True)
    memory = TreeMemory()
    memory.start()
    start = time.time()
    try:
        run = run_simulation(JOB, tiny_params(rounds, sites), config, workspace)
    finally:
        wall = time.time() - start
        memory.stop()
    trained = {}
    for k in range(1, sites + 1):
        record = run / f"site-{k}" / "simulate_job" / "brats_fl" / "rounds.jsonl"
        rows = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
        trained[f"site-{k}"] = [row["round"] for row in rows]
    return {
        "sites": sites,
        "rounds": rounds,
        "wall_s": round(wall, 1),
        "every_site_trained_every_round": all(r == list(range(rounds)) for r in trained.values()),
        "rounds_trained_per_site": {site: len(r) for site, r in trained.items()},
        "peak_tree_rss_mib": round(memory.peak_rss),
        "peak_tree_pss_mib": round(memory.peak_pss),
        "peak_processes": memory.peak_processes,
    }


class LogFollower:
    """Reads the lines a growing log file gains, never the same line twice."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = ""

    def lines(self) -> list[str]:
        if not self.path.exists():
            return []
        with self.path.open("r", errors="replace") as fh:
            fh.seek(self.offset)
            text = self.partial + fh.read()
            self.offset = fh.tell()
        *complete, self.partial = text.split("\n")
        return complete


def flare_processes(system: deploy.System) -> dict[str, psutil.Process]:
    """Every measured FLARE process below those the POC started, by label (``site-1 job``, ...)."""
    found = {}
    for name, popen in system.processes.items():
        with contextlib.suppress(psutil.Error):
            top = psutil.Process(popen.pid)
            for proc in [top, *top.children(recursive=True)]:
                tag = label(proc, name)
                if tag:
                    found[tag] = proc
    return found


def follow_rounds(system: deploy.System, job_id: str, rounds: int, start: float, timeout: float) -> list[dict]:
    """One RSS sample of every FLARE process as each round of job ``job_id`` starts, until the last one."""
    log = LogFollower(system.kit(system.server) / "console.log")
    watcher = RoundWatcher(job_id)
    rows: list[dict] = []
    deadline = time.monotonic() + timeout
    seen = -1
    while seen < rounds - 1:
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id}: round {seen} after {timeout:.0f} s\n{system.logs(30)}")
        started = watcher.feed(log.lines())
        if not started:
            if seen >= 0 and "server job" not in flare_processes(system):
                raise RuntimeError(f"job {job_id} ended after round {seen} of {rounds}\n{system.logs(30)}")
            time.sleep(0.5)
            continue
        seen = max(started)
        at = time.time() - start
        for tag, proc in sorted(flare_processes(system).items()):
            with contextlib.suppress(psutil.Error):
                rss, uss = memory_mib(proc)
                rows.append({"round": seen + 1, "t_s": round(at, 1), "process": tag, "pid": proc.pid,
                             "rss_mib": round(rss, 2), "uss_mib": round(uss, 2)})  # fmt: skip
    return rows


def write_curve(rows: list[dict], path: Path, start: int) -> None:
    """RSS per round of each process, small enough for the docs."""
    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=90)
    for tag in sorted({r["process"] for r in rows}):
        points = [(r["round"], r["rss_mib"]) for r in rows if r["process"] == tag]
        ax.plot(*zip(*points, strict=True), label=tag, linewidth=1.2)
    ax.axvline(start, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("round")
    ax.set_ylabel("resident set (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{JOB}, POC, tiny U-Net: RSS as each round starts", fontsize=9)
    ax.legend(fontsize=7, ncol=3, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def run_memory(out: Path, sites: int, rounds: int, start_round: int, figure: Path, arena_max: int | None) -> dict:
    """A POC of a server and ``sites`` sites running the job for ``rounds`` rounds; RSS and USS per round and
    process. ``arena_max``: glibc's ``MALLOC_ARENA_MAX`` for every FLARE process, None for the POC's default
    (``brats_fl.ops.deploy``)."""
    if rounds <= start_round:
        raise ValueError(f"--rounds {rounds} must exceed --from {start_round}")
    names = [f"site-{k}" for k in range(1, sites + 1)]
    data, lists = cohort(out / f"cohort_{sites}", sites)
    root = out / "poc"
    shutil.rmtree(root, ignore_errors=True)
    job = export_jobs(root / "jobs", [JOB], params=tiny_params(rounds, sites))[0]
    # a private HOME, so that FLARE's startup-kit registry (~/.nvflare) of this machine is left alone
    env = dict(os.environ) | {"HOME": str(root / "home")}
    if arena_max is not None:
        env[deploy.ARENA_VAR] = str(arena_max)
    kits = deploy.poc_prepare(root / "workspace", sites, deploy.free_port(), env=env)
    for site in names:
        deploy.install_site_config(kits / site, data, lists, threads=1)
    with deploy.System(kits, "server", deploy.POC_ADMIN, env=env) as system:
        system.start_all(names, timeout=300)
        with system.session() as sess:
            job_id = sess.submit_job(str(job))
        start = time.time()
        rows = follow_rounds(system, job_id, rounds, start, timeout=60 + 30 * rounds)
        with system.session() as sess:
            meta = sess.wait_for_job(job_id, timeout=600, poll_interval=3)
        wall = time.time() - start
    with (out / "memory.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_curve(rows, figure, start_round)
    per_process = {}
    for tag in sorted({r["process"] for r in rows}):
        mine = [r for r in rows if r["process"] == tag]
        per_process[tag] = {"pids": sorted({r["pid"] for r in mine})}
        for kind in ("rss", "uss"):
            series = {r["round"]: r[f"{kind}_mib"] for r in mine}
            per_process[tag] |= {
                f"{kind}_mib_round_{start_round}": series.get(start_round),
                f"{kind}_mib_round_{rounds}": series.get(rounds),
                f"max_{kind}_mib": max(series.values()),
                f"{kind}_growth_pct": round(growth(series, start_round, rounds), 2)
                if {start_round, rounds} <= series.keys()
                else None,
            }
    variables = {k for settings in deploy.ALLOCATOR.values() for k in settings}
    result = {
        "sites": sites,
        "rounds": rounds,
        # glibc's settings each participant ran with: the POC's (brats_fl.ops.deploy.ALLOCATOR) unless set here
        "allocator": {
            role: settings | {k: env[k] for k in variables if k in env} for role, settings in deploy.ALLOCATOR.items()
        },
        "job_id": job_id,
        "status": str(meta.get("status")),
        "wall_s_submit_to_end": round(wall, 1),
        "rounds_sampled": len({r["round"] for r in rows}),
        "per_process": per_process,
        "csv": str(out / "memory.csv"),
        "figure": str(figure),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/long_run"))
    sub = parser.add_subparsers(dest="command", required=True)
    sites = sub.add_parser("sites", help="a tiny FedAvg with many simulated sites")
    sites.add_argument("--sites", type=int, default=16)
    sites.add_argument("--rounds", type=int, default=3)
    memory = sub.add_parser("memory", help="resident memory of a long POC run, per round and process")
    memory.add_argument("--sites", type=int, default=2)
    memory.add_argument("--rounds", type=int, default=200)
    memory.add_argument("--from", dest="start_round", type=int, default=20, help="round growth is measured from")
    memory.add_argument("--figure", type=Path, default=None, help="the curve's PNG (default <out>/memory.png)")
    memory.add_argument(
        "--malloc-arena-max", dest="arena_max", type=int, default=None, help="MALLOC_ARENA_MAX for every FLARE process"
    )
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    if args.command == "sites":
        results = run_sites(out, args.sites, args.rounds)
    else:
        figure = args.figure or out / "memory.png"
        results = run_memory(out, args.sites, args.rounds, args.start_round, figure, args.arena_max)
    report = {
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "results": results,
    }
    # FLARE prints to the standard output too: the report is also kept beside the run's data
    (out / f"{args.command}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
