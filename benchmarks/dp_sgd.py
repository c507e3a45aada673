"""What DP-SGD at the sites costs: Dice against epsilon beside FedAvg without privacy, and step time and memory.

    python benchmarks/dp_sgd.py dice --out runs/dp_bench [--epsilons 1 8 32] [--seeds 0 1] [--rounds 4]
    python benchmarks/dp_sgd.py step [--channels 16 32 64 128] [--patch 64] [--batch 2] [--steps 5]

``dice`` writes a small phantom cohort (3 scanner sites), then runs ``brats_fedavg`` in FLARE's simulator without
privacy and with DP-SGD at each epsilon (delta 1e-5), for each seed, and prints the pooled test Dice (mean of WT, TC,
ET) and the epsilon each run's privacy ledger recorded (FLARE's simulator logs to the standard output too: the JSON
is also written to ``<out>/dp_dice.json``). Finished runs are kept and reused. ``step`` times optimiser
steps of the U-Net with and without DP-SGD, each in its own process so that its peak memory (resident set on a CPU,
torch's peak allocation on a GPU) is its own. Both print JSON with the date and the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

SITES = 3


def _machine() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return f"{platform.machine()}, {os.cpu_count()} cores, {device}, torch {torch.__version__}"


def _cohort(out: Path, cases: int) -> Path:
    """The phantom cohort and its three scanner sites, written once; returns the site configuration."""
    from brats_fl.data.layout import find_cases
    from brats_fl.data.partition import assign_sites, write_datalists
    from brats_fl.data.phantom import generate_cohort

    config = out / "site_configs" / "simulation.json"
    if config.is_file():
        return config
    root = out / "data"
    generate_cohort(root, cases=cases, sites=SITES, seed=7, shape=(64, 64, 48))
    parts = assign_sites(find_cases(root), SITES, "natural", attribute="scanner")
    write_datalists(root, parts, out / "lists", description={"scheme": "natural", "attribute": "scanner"})
    config.parent.mkdir(parents=True, exist_ok=True)
    doc = {"data_root": str(root), "datalist_dir": str(out / "lists"), "threads": 1, "state_dir": str(out / "state")}
    config.write_text(json.dumps(doc))
    return config


def dice(args: argparse.Namespace) -> dict:
    from brats_fl.jobs.catalogue import JobParams
    from brats_fl.jobs.simulate import run_simulation
    from brats_fl.results.privacy import ledger_summary
    from brats_fl.results.report import summarise_run

    config = _cohort(args.out, args.cases)
    results = []
    for seed in args.seeds:
        for epsilon in [None, *args.epsilons]:
            name = f"seed{seed}_{'none' if epsilon is None else f'eps{epsilon:g}'}"
            workspace = args.out / "runs" / name
            if not any(workspace.rglob("brats_fl_run.json")):
                params = JobParams(
                    rounds=args.rounds, local_epochs=args.local_epochs, patch_size=(32, 32, 32), channels=(8, 16, 32),
                    seed=seed, dp_epsilon=epsilon, cross_site="none",
                )  # fmt: skip
                start = time.perf_counter()
                run_simulation("brats_fedavg", params, config, workspace)
                print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
            summary = summarise_run(workspace)
            privacy = ledger_summary(workspace)
            results.append(
                {
                    "seed": seed,
                    "dp_epsilon": epsilon,
                    "dice_mean": summary["test"]["dice_mean"],
                    "test_cases": summary["test"]["cases"],
                    "ledger_epsilon": privacy["epsilon"],
                    "ledger_delta": privacy["delta"],
                    "wall_time_s": summary["wall_time"],
                }
            )
    return {
        "date": datetime.date.today().isoformat(),
        "machine": _machine(),
        "cohort": f"{args.cases} phantom cases, 64x64x48, 3 scanner sites",
        "job": f"brats_fedavg, {args.rounds} rounds x {args.local_epochs} local epochs, U-Net 8-16-32, patch 32",
        "runs": results,
    }


def _step_cost(mode: str, channels: list[int], patch: int, batch: int, steps: int) -> dict:
    """Mean seconds per optimiser step after a warm-up step, and peak memory, of one mode in this process."""
    from brats_fl.data.loading import ANNOTATED
    from brats_fl.seg.trainer import TrainConfig, Trainer
    from torch.utils.data import DataLoader

    cases = [
        {
            "image": torch.randn(4, patch, patch, patch),
            "label": (torch.rand(3, patch, patch, patch) > 0.7).float(),
            ANNOTATED: torch.ones(3, dtype=torch.bool),
        }
        for _ in range(batch)
    ]
    settings = {
        "model": {"channels": channels, "strides": [2] * (len(channels) - 1), "init_seed": 0},
        "patch_size": [patch] * 3, "batch_size": batch, "samples_per_case": 1, "total_epochs": steps + 1,
    }  # fmt: skip
    if mode == "dp":
        settings["dp_epsilon"] = 8.0
    trainer = Trainer(TrainConfig.from_dict(settings))
    # batch == cases: every draw takes every case (sample rate 1), so each step has the same batch as without DP
    loader = DataLoader(cases, batch_size=batch)
    trainer.train_epochs(loader, 1)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train_epochs(loader, steps)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "seconds_per_step": (time.perf_counter() - start) / steps, "peak_memory_bytes": peak}


def step(args: argparse.Namespace) -> dict:
    rows = []
    for mode in ("plain", "dp"):
        command = [sys.executable, __file__, "step-one", mode, "--patch", str(args.patch), "--batch", str(args.batch)]
        command += ["--steps", str(args.steps), "--channels", *map(str, args.channels)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return {
        "date": datetime.date.today().isoformat(),
        "machine": _machine(),
        "threads": torch.get_num_threads(),
        "model": f"U-Net {'-'.join(map(str, args.channels))}, patch {args.patch}^3, batch {args.batch}",
        "memory": "peak GPU allocation" if torch.cuda.is_available() else "peak resident set of the process",
        "modes": rows,
        "dp_over_plain": {
            "time": rows[1]["seconds_per_step"] / rows[0]["seconds_per_step"],
            "memory": rows[1]["peak_memory_bytes"] / rows[0]["peak_memory_bytes"],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("dice")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 8.0, 32.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--cases", type=int, default=24)
    for name in ("step", "step-one"):
        p = sub.add_parser(name)
        if name == "step-one":
            p.add_argument("mode", choices=("plain", "dp"))
        p.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 128])
        p.add_argument("--patch", type=int, default=64)
        p.add_argument("--batch", type=int, default=2)
        p.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    if args.what == "step-one":
        print(json.dumps(_step_cost(args.mode, args.channels, args.patch, args.batch, args.steps)))
        return
    result = dice(args) if args.what == "dice" else step(args)
    if args.what == "dice":
        (args.out / "dp_dice.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
