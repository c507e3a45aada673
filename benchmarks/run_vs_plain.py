"""A whole FedAvg run against a plain MONAI loop that takes the same training steps, side by side.

    python benchmarks/run_vs_plain.py --site-config site_configs/simulation.json --out runs/vs_plain

FLARE's side is a FedAvg run as the benchmark's ``full`` profile runs one (its job parameters: 2 mm, 48³ patches,
U-Net 16-32-64, 10 rounds of 1 local epoch, no cross-site evaluation), started as a user starts it (``brats-fl run``, a
process of its own) and timed from its launch to its end: start-up, every round's validation and exchange, each
site's scoring of its test cases on their own grid, shut-down. The plain side is a process of its own too, timed the
same way: it imports torch and MONAI, loads every site's training cases through the same cached pipeline and takes
the same optimiser steps (every round, each site's local epoch, one site after the other, then the case-weighted
average), with the machine's cores as the run's sites share them; it validates and scores nothing, since what it
measures is the training the run pays for. Both find the sites' disk cache filled (an untimed one-round run fills
it first), as every run of a benchmark but its first does. The ratio is the run's wall time over the plain loop's;
the run's own split into training and fixed cost (``brats_fl.results.cost``) says where the difference goes. Prints
JSON for ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "custom"))

#: the FedAvg run of the benchmark's ``full`` profile (``brats_fl.results.benchmark.PROFILES``)
RUN_OPTIONS = ["--spacing", "2", "--patch", "48", "48", "48", "--channels", "16", "32", "64", "--rounds", "10",
               "--local-epochs", "1", "--cross-site", "none"]  # fmt: skip


def plain(site_config: Path, rounds: int, local_epochs: int) -> dict:
    """The plain loop, in this process: the same sites, cases, pipeline, model and steps as the run's."""
    import torch
    from brats_fl.data.datalist import load_datalist
    from brats_fl.seg.trainer import TrainConfig, Trainer, make_train_loader
    from brats_fl.settings.numerics import environment
    from brats_fl.site.config import resolve

    os.environ.update(environment("portable"))
    torch.set_num_threads(os.cpu_count() or 1)
    config = TrainConfig.from_dict(
        {"model": {"channels": [16, 32, 64], "strides": [2, 2]}, "patch_size": [48, 48, 48], "spacing": 2.0}
    )
    sites = []
    for name in ("site-1", "site-2", "site-3"):
        data = resolve(name, config=site_config)
        datalist = load_datalist(data.datalist, data.data_root, grid_required=False)
        items = datalist.items("training")
        sites.append((Trainer(config), make_train_loader(items, config, data.cache_dir), len(items)))
    total = sum(n for *_, n in sites)
    global_state = {k: v.clone() for k, v in sites[0][0].model.state_dict().items()}
    steps = 0
    for _ in range(rounds):
        states = []
        for trainer, loader, n in sites:
            trainer.model.load_state_dict(global_state)
            steps += int(trainer.train_epochs(loader, local_epochs)["steps"])
            states.append((trainer.model.state_dict(), n))
        global_state = {k: sum(s[k].float() * n for s, n in states) / total for k in global_state}
    return {"steps": steps, "threads": torch.get_num_threads()}


def timed(command: list[str], log: Path) -> float:
    start = time.time()
    with log.open("w") as fh:
        subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, check=True, cwd=REPO)
    return time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--site-config", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plain-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    site_config = args.site_config.resolve()
    if args.plain_only:
        print(json.dumps(plain(site_config, rounds=10, local_epochs=1)))
        return
    from brats_fl.results.benchmark import machine
    from brats_fl.results.cost import run_cost

    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()
    workspace = out / "run"
    run = [sys.executable, "-m", "brats_fl.cli.main", "run", "brats_fedavg", "--site-config", str(site_config)]
    # untimed: the sites' disk cache of the cohort, which every later run of a benchmark finds filled
    warm = [*RUN_OPTIONS]
    warm[warm.index("--rounds") + 1] = "1"
    timed([*run, *warm, "--workspace", str(out / "warm-up")], out / "warm-up.log")
    launched = time.time()
    run_wall = timed([*run, *RUN_OPTIONS, "--workspace", str(workspace)], out / "run.log")
    cost = run_cost(workspace / "brats_fedavg", launched, launched + run_wall)
    plain_wall = timed([sys.executable, __file__, "--site-config", str(site_config), "--out", str(out), "--plain-only"],
                       out / "plain.log")  # fmt: skip
    steps = json.loads((out / "plain.log").read_text().splitlines()[-1])
    summary = json.loads((workspace / "brats_fedavg" / "summary.json").read_text())
    results = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python benchmarks/run_vs_plain.py", *sys.argv[1:]]),
        "machine": machine(),
        "load_average_after": os.getloadavg(),
        "run_options": RUN_OPTIONS,
        "run_wall_s": run_wall,
        "run_cost": cost,
        "run_test_dice_mean": summary["test"]["dice_mean"],
        "run_test_cases": summary["test"]["cases"],
        "plain_wall_s": plain_wall,
        "plain": steps,
        "ratio": run_wall / plain_wall,
    }
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
