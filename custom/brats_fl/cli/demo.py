"""The embedded default data and the README's demo.

``prepare_data`` writes the phantom cohort and its partitions where ``site_configs/simulation.json``
expects them; ``run_demo`` prepares them if needed, runs FedAvg in FLARE's simulator, prints the
results table and writes the report (table, learning curves, per-site bars, overlays, index.html).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from brats_fl.cli.jobs import VERBOSE_HELP
from brats_fl.results.benchmark import machine
from brats_fl.settings.params import by_name

#: where ``site_configs/simulation*.json`` look for the phantom cohort, relative to the repository
DEFAULT_DATA = Path("data/phantom")
#: the workspace the README's `nvflare simulator` command uses
SIMULATOR_WORKSPACE = Path("runs/simulator")
#: the partitions the results compare: one scanner per site in equal shares, and quantity skew (1/2, 1/3, 1/6)
PARTITIONS = {
    "equal": ["--scheme", "natural", "--attribute", "scanner"],
    "unequal": ["--scheme", "unequal"],
}


#: the ``brats-fl`` command line (``brats_fl.cli.main.main``): argv -> exit code
Cli = Callable[[list[str]], int]


def prepare_data(out: Path, cases: int, sites: int, shape: tuple[int, int, int], cli: Cli, seed: int = 0) -> None:
    """Phantom cohort -> data checks -> one datalist folder per partition, each step run by ``cli``; skips what
    already exists."""
    data = out / "cohort"
    steps = []
    if not data.exists():
        steps.append(
            ["phantom", "--out", str(data), "--cases", str(cases), "--sites", str(sites), "--seed", str(seed),
             "--shape", *map(str, shape)]
        )  # fmt: skip
    from brats_fl.data.checks import CHECKED

    # the stamps spare the simulated sites (site_configs/simulation.json's cache) reading every case again
    steps.append(["check-data", str(data), "--stamps", str(out / "cache" / CHECKED)])
    for name, flags in PARTITIONS.items():
        lists = out / "datalists" / name
        if not lists.exists():
            steps.append(["partition", str(data), "--sites", str(sites), *flags, "--out", str(lists)])
    # `nvflare simulator jobs/<job> -w runs/simulator` then builds brats-fl's classes (brats_fl.ops.policy)
    steps.append(["site-policy", str(SIMULATOR_WORKSPACE)])
    _run_steps(steps, cli)


#: what the demo trains, chosen from measurements (``docs/tutorial.md``, "How the demo was chosen"); the README's
#: table is the one these settings printed (``DEMO_RECORD``, checked by ``tests/docs/test_demo_record.py``)
DEMO_SETTINGS: dict[str, object] = {
    "cases": 30,
    "sites": 3,
    "shape": [240, 240, 155],
    "rounds": 20,
    "local_epochs": 3,
    "spacing": 2.0,
    "patch": [40, 40, 40],
}
#: the demo run the README shows: settings, machine, date, commit, times and table, written by ``brats-fl demo`` as
#: ``<workspace>/demo.json`` and committed here
DEMO_RECORD = Path("benchmarks/results/demo.json")
#: the README's columns of the demo table (the lesion-wise ones are in the run's report)
README_COLUMNS = ("val_loss",)


def run_demo(workspace: Path, settings: dict, cli: Cli, verbose: bool = False) -> dict:
    """Run every step through the commands a user would type (``cli``), so the demo exercises them; ends with the
    report in ``<workspace>/report`` and the run's record in ``<workspace>/demo.json`` (returned).

    Run from the repository root: the simulated sites read ``site_configs/simulation.json``.
    """
    start = time.perf_counter()
    shape = tuple(settings["shape"])
    prepare_data(DEFAULT_DATA, settings["cases"], settings["sites"], shape, cli)
    prepared = time.perf_counter() - start
    run = [
        "run", "brats_fedavg", "--sites", str(settings["sites"]), "--rounds", str(settings["rounds"]),
        "--local-epochs", str(settings["local_epochs"]), "--patch", *map(str, settings["patch"]),
        "--workspace", str(workspace), "--site-config", "site_configs/simulation.json",
        *(["--spacing", str(settings["spacing"])] if settings["spacing"] else []), *(["--verbose"] if verbose else []),
    ]  # fmt: skip
    _run_steps([run, ["report", str(workspace), "--out", str(workspace / "report")]], cli)
    summary = json.loads((workspace / "brats_fedavg" / "summary.json").read_text())
    record = {
        "settings": settings,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": machine(),
        "commit": _commit(),
        "wall_time": time.perf_counter() - start,
        "data_time": prepared,
        "job_time": summary["wall_time"],
        "cost": summary.get("cost"),
        "table": {**summary["test_per_site"], "pooled": summary["test"]},
    }
    (workspace / "demo.json").write_text(json.dumps(record, indent=1) + "\n")
    index = workspace / "report" / "index.html"
    print(f"\ndemo finished in {record['wall_time']:.0f} s; the report: {index}; the record: {workspace / 'demo.json'}")
    return record


def demo_table(record: dict) -> str:
    """The README's demo section (between its ``demo-table`` markers) for a demo ``record``."""
    from brats_fl.results.report import format_table

    m = record["machine"]
    head = (
        f"`brats-fl demo` on commit `{record['commit'] or 'unknown'}` ({record['date']}; {m['cores']} CPU cores, "
        f"{m['cpu']}, no GPU): `demo finished in {record['wall_time']:.0f} s`, {record['data_time']:.0f} s for the "
        f"cohort, its checks and partitions and {record['job_time']:.0f} s for the FedAvg job. Each site's final model "
        "on its own test split (2 cases), and the 6 test cases pooled:"
    )
    rows = [(name, metrics) for name, metrics in record["table"].items()]
    return f"{head}\n\n{format_table(rows, extra=README_COLUMNS)}\n"


def _commit() -> str | None:
    """The checkout's short commit, where the demo runs from a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def _run_steps(steps: list[list[str]], cli: Cli) -> None:
    """Each step as ``brats-fl`` would run it."""
    for step in steps:
        print(f"\n$ brats-fl {' '.join(step)}", flush=True)
        code = cli(step)
        if code:
            raise SystemExit(code)


def _cmd_demo(args: argparse.Namespace) -> None:
    settings = {key: getattr(args, key) for key in DEMO_SETTINGS}
    run_demo(args.workspace, settings, args.cli, verbose=args.verbose)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``demo``; its options default to ``DEMO_SETTINGS``."""
    p = sub.add_parser("demo", help="phantom cohort -> FedAvg in FLARE's simulator -> results table and report")
    p.add_argument("--workspace", type=Path, default=Path("runs/demo"))
    d = DEMO_SETTINGS
    p.add_argument("--cases", type=int, default=d["cases"])
    p.add_argument("--sites", type=int, default=d["sites"])
    p.add_argument("--shape", type=int, nargs=3, default=d["shape"])
    p.add_argument("--rounds", type=int, default=d["rounds"], help=by_name("rounds").help)
    p.add_argument("--local-epochs", type=int, default=d["local_epochs"], help=by_name("local_epochs").help)
    p.add_argument("--spacing", type=float, default=d["spacing"], help=by_name("spacing").help)
    p.add_argument("--patch", type=int, nargs=3, default=d["patch"], help=by_name("patch_size").help)
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    p.set_defaults(func=_cmd_demo)
