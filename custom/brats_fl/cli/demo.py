"""The embedded default data and the README's demo.

``prepare_data`` writes the phantom cohort and its partitions where ``site_configs/simulation.json``
expects them; ``run_demo`` prepares them if needed, runs FedAvg in FLARE's simulator, prints the
results table and writes the report (table, learning curves, per-site bars, overlays, index.html).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from brats_fl.cli.jobs import VERBOSE_HELP
from brats_fl.jobs.params import by_name

#: where ``site_configs/simulation*.json`` look for the phantom cohort, relative to the repository
DEFAULT_DATA = Path("data/phantom")
#: the workspace the README's `nvflare simulator` command uses
SIMULATOR_WORKSPACE = Path("runs/simulator")
#: the partitions the results compare: one scanner per site in equal shares, and quantity skew (1/2, 1/3, 1/6)
PARTITIONS = {
    "equal": ["--scheme", "natural", "--attribute", "scanner"],
    "unequal": ["--scheme", "unequal"],
}


def prepare_data(out: Path, cases: int, sites: int, shape: tuple[int, int, int], seed: int = 0) -> None:
    """Phantom cohort -> data checks -> one datalist folder per partition; skips what already exists."""
    data = out / "cohort"
    steps = []
    if not data.exists():
        steps.append(
            ["phantom", "--out", str(data), "--cases", str(cases), "--sites", str(sites), "--seed", str(seed),
             "--shape", *map(str, shape)]
        )  # fmt: skip
    steps.append(["check-data", str(data)])
    for name, flags in PARTITIONS.items():
        lists = out / "datalists" / name
        if not lists.exists():
            steps.append(["partition", str(data), "--sites", str(sites), *flags, "--out", str(lists)])
    # `nvflare simulator jobs/<job> -w runs/simulator` then builds brats-fl's classes (brats_fl.ops.policy)
    steps.append(["site-policy", str(SIMULATOR_WORKSPACE)])
    _run_steps(steps)


def run_demo(
    workspace: Path,
    cases: int,
    sites: int,
    shape: tuple[int, int, int],
    rounds: int,
    spacing: float | None = None,
    verbose: bool = False,
) -> None:
    """Run every step through the commands a user would type, so the demo exercises them; ends with the
    report in ``<workspace>/report``.

    Run from the repository root: the simulated sites read ``site_configs/simulation.json``.
    """
    start = time.perf_counter()
    prepare_data(DEFAULT_DATA, cases, sites, shape)
    _run_steps(
        [
            ["run", "brats_fedavg", "--sites", str(sites), "--rounds", str(rounds), "--workspace", str(workspace),
             "--site-config", "site_configs/simulation.json", *(["--spacing", str(spacing)] if spacing else []),
             *(["--verbose"] if verbose else [])],
            ["report", str(workspace), "--out", str(workspace / "report")],
        ]
    )  # fmt: skip
    index = workspace / "report" / "index.html"
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s; the report: {index}")


def _run_steps(steps: list[list[str]]) -> None:
    """Each step as ``brats-fl`` would run it; the command line is imported here, as it imports this module."""
    from brats_fl.cli.main import main as cli

    for step in steps:
        print(f"\n$ brats-fl {' '.join(step)}", flush=True)
        code = cli(step)
        if code:
            raise SystemExit(code)


def _cmd_demo(args: argparse.Namespace) -> None:
    run_demo(
        args.workspace,
        cases=args.cases,
        sites=args.sites,
        shape=tuple(args.shape),
        rounds=args.rounds,
        spacing=args.spacing,
        verbose=args.verbose,
    )


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``demo``."""
    p = sub.add_parser("demo", help="phantom cohort -> FedAvg in FLARE's simulator -> results table and report")
    p.add_argument("--workspace", type=Path, default=Path("runs/demo"))
    p.add_argument("--cases", type=int, default=30)
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--rounds", type=int, default=by_name("rounds").default)
    p.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155])
    p.add_argument("--spacing", type=float, default=by_name("spacing").default, help=by_name("spacing").help)
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    p.set_defaults(func=_cmd_demo)
