"""The README's demo: phantom cohort -> data checks -> partition -> centralized training -> results table."""

from __future__ import annotations

import time
from pathlib import Path

from brats_fl.cli import main as cli


def run_demo(out: Path, cases: int, sites: int, epochs: int, shape: tuple[int, int, int]) -> None:
    """Run every step through the same commands a user would type, so the demo exercises them."""
    start = time.perf_counter()
    data, lists = out / "data", out / "datalists"
    steps = []
    if not data.exists():
        steps.append(
            ["phantom", "--out", str(data), "--cases", str(cases), "--sites", str(sites), "--shape", *map(str, shape)]
        )
    steps.append(["check-data", str(data)])
    if not lists.exists():
        steps.append(["partition", str(data), "--sites", str(sites), "--scheme", "natural", "--out", str(lists)])
    steps.append(
        [
            "train-central",
            "--data-root",
            str(data),
            "--datalist",
            str(lists / "site-All.json"),
            "--out",
            str(out / f"central-{time.strftime('%Y%m%d-%H%M%S')}"),
            "--epochs",
            str(epochs),
        ]
    )
    for step in steps:
        print(f"\n$ brats-fl {' '.join(step)}", flush=True)
        code = cli(step)
        if code:
            raise SystemExit(code)
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s")
