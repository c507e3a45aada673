"""The embedded default data and the README's demo.

``prepare_data`` writes the phantom cohort and its partitions where ``site_configs/simulation.json``
expects them; ``run_demo`` prepares them if needed, runs FedAvg in FLARE's simulator, prints the
results table and writes the report (table, learning curves, per-site bars, overlays, index.html).
"""

from __future__ import annotations

import time
from pathlib import Path

from brats_fl.cli.main import main as cli

#: where ``site_configs/simulation*.json`` look for the phantom cohort, relative to the repository
DEFAULT_DATA = Path("data/phantom")
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
    _run_steps(steps)


def run_demo(workspace: Path, cases: int, sites: int, shape: tuple[int, int, int], rounds: int) -> None:
    """Run every step through the commands a user would type, so the demo exercises them; ends with the
    report in ``<workspace>/report``.

    Run from the repository root: the simulated sites read ``site_configs/simulation.json``.
    """
    start = time.perf_counter()
    prepare_data(DEFAULT_DATA, cases, sites, shape)
    _run_steps(
        [
            ["run", "brats_fedavg", "--sites", str(sites), "--rounds", str(rounds), "--workspace", str(workspace),
             "--site-config", "site_configs/simulation.json"],
            ["report", str(workspace), "--out", str(workspace / "report")],
        ]
    )  # fmt: skip
    index = workspace / "report" / "index.html"
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s; the report: {index}")


def _run_steps(steps: list[list[str]]) -> None:
    for step in steps:
        print(f"\n$ brats-fl {' '.join(step)}", flush=True)
        code = cli(step)
        if code:
            raise SystemExit(code)
