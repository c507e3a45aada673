"""Where centralized training's validation Dice stops rising: the benchmark's training budget (issue 38, item 1).

    python benchmarks/plateau.py --out runs/plateau                  # 2 seeds of 200 epochs, validated every 5
    python benchmarks/plateau.py --out runs/plateau --figure-only    # the figure and JSON from the finished seeds

Trains the benchmark profile's central job outside FLARE (``brats-fl train-central`` on the ``iid`` partition's pooled
datalist, with the profile's network, patch, grid and recipe, both cores) once per seed, one seed after another, and
scores its validation split every ``--val-every`` epochs. A seed whose run finished (its ``test_metrics.json``
written) is kept; a half-finished one starts again, so the script resumes seed by seed.

The plateau rule (``brats_fl.results.stats.plateau``, which the benchmark page also applies to every algorithm's
curve): the budget B is the first validated epoch from which on, to the end of the measured curve, the curve gains
less than ``--tolerance`` (0.005 Dice) over the last quarter of the budget, from 0.75 B to B. The curve is the mean
over seeds, smoothed by a centred moving average of three validations (``stats.smoothed``), and read between
validations by linear interpolation. Each seed's own gain at B is reported beside it.

Writes ``DIR/plateau.json`` (each seed's curve, B, every gain, the command, the date and the machine) and, with
``--figure``, the figure of the curves with B marked. The test split is scored once, after the last epoch, by
``train-central`` itself: centralized training's test Dice at the end of the measured curve.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from brats_fl.data.cohorts import build_partition
from brats_fl.results.benchmark import CENTRAL, PARTITION_SEED, PROFILES, Profile, job_params
from brats_fl.results.stats import PLATEAU_TOLERANCE, plateau, quarter_gains, smoothed
from brats_fl.settings.params import by_name

#: the test scores kept: voxel- and lesion-wise, with and without post-processing (issue 39, item 5)
KEPT = ("dice_", "hd95_", "lesion_dice_", "unprocessed_dice_", "unprocessed_lesion_dice_")
#: the job parameters ``train-central`` takes (``brats_fl.cli.train.add_training_options``, and ``--min-volume``)
CENTRAL_OPTIONS = (
    "recipe", "network", "patch_size", "spacing", "amp", "batch_size", "fg_ratio", "lr", "momentum", "channels", "norm",
    "min_volume",
)  # fmt: skip


def train_central_args(profile: Profile, seed: int) -> list[str]:
    """``brats-fl train-central``'s options for the profile's central run of ``seed``: the job's own parameters
    (``brats_fl.results.benchmark.job_params``) under the schema's flags, so that the curve is the one the benchmark's
    central run follows."""
    params = job_params(profile, CENTRAL, seed)
    args = ["--seed", str(seed)]
    for name in CENTRAL_OPTIONS:
        value = getattr(params, name)
        if value is not None:
            args += [by_name(name).flag, *map(str, value if isinstance(value, (tuple, list)) else [value])]
    return args


def _finished(folder: Path) -> bool:
    return (folder / "test_metrics.json").is_file()


def _curve(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    history = json.loads((folder / "history.json").read_text())
    return np.array([row["epoch"] for row in history]), np.array([row["dice_mean"] for row in history])


def analyse(out: Path, seeds: list[int], tolerance: float) -> dict:
    """The plateau of the finished seeds' mean curve, each seed's gain at it, and their test scores."""
    curves = {s: _curve(out / f"seed{s}") for s in seeds}
    epochs = curves[seeds[0]][0]
    if any(not np.array_equal(e, epochs) for e, _ in curves.values()):
        raise ValueError(f"{out}: the seeds were validated at different epochs; run them with the same settings")
    mean = smoothed(np.mean([c for _, c in curves.values()], axis=0))
    budget = plateau(epochs, mean, tolerance)
    per_seed = {s: quarter_gains(epochs, smoothed(c)) for s, (_, c) in curves.items()}
    test = {s: json.loads((out / f"seed{s}" / "test_metrics.json").read_text()) for s in seeds}
    return {
        "epochs": epochs.tolist(),
        "curves": {f"seed{s}": c.tolist() for s, (_, c) in curves.items()},
        "mean_smoothed": mean.tolist(),
        "gains": quarter_gains(epochs, mean),
        "tolerance": tolerance,
        "budget_epochs": budget,
        "seed_gains_at_budget": {f"seed{s}": g.get(budget) for s, g in per_seed.items()} if budget else None,
        "test_last_model": {
            f"seed{s}": {k: v for k, v in m.items() if k.startswith(KEPT) or k == "min_volume"} for s, m in test.items()
        },
    }


def figure(result: dict, path: Path, title: str) -> Path:
    """Each seed's validation curve, their smoothed mean, and the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = result["epochs"]
    fig, ax = plt.subplots(figsize=(6.5, 3.0), layout="constrained")
    for name, curve in result["curves"].items():
        ax.plot(epochs, curve, linewidth=0.8, alpha=0.6, label=f"{name} (validation)")
    ax.plot(epochs, result["mean_smoothed"], color="black", linewidth=1.6, label="mean over seeds, smoothed")
    if result["budget_epochs"]:
        b = result["budget_epochs"]
        ax.axvline(b, color="tab:red", linestyle="--", linewidth=1, label=f"plateau: {b} epochs")
        ax.axvspan(0.75 * b, b, color="tab:red", alpha=0.08, linewidth=0)
    ax.set_xlabel("Epoch (two patches of every training case)")
    ax.set_ylabel("Validation Dice (mean of WT, TC, ET)")
    ax.set_title(title, loc="left", fontsize=8)
    ax.grid(alpha=0.3, linewidth=0.5)
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the runs' folder (resumable)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, help="epochs per seed; default 200")
    parser.add_argument("--val-every", type=int, help="epochs between validations; default 5")
    parser.add_argument("--threads", type=int, help="torch threads of each run; default 2")
    parser.add_argument("--tolerance", type=float, default=PLATEAU_TOLERANCE)
    parser.add_argument("--figure", type=Path, help="where to draw the curves (PNG)")
    parser.add_argument("--figure-only", action="store_true", help="analyse the finished seeds; train nothing")
    args = parser.parse_args()
    training = {"--epochs": args.epochs, "--val-every": args.val_every, "--threads": args.threads}
    unused = [flag for flag, value in training.items() if value is not None]
    if args.figure_only and unused:
        parser.error(f"--figure-only trains nothing: {', '.join(unused)} unused")
    args.epochs, args.val_every, args.threads = args.epochs or 200, args.val_every or 5, args.threads or 2
    profile = PROFILES[args.profile]
    seeds = list(range(args.seeds))
    if not args.figure_only:
        shape, split = profile.shape, profile.split
        site_config = build_partition(
            "iid", args.out / "partitions", profile.cases, PARTITION_SEED, shape, split, hard=profile.hard
        )
        doc = json.loads(site_config.read_text())
        data_root = (site_config.parent / doc["data_root"]).resolve()
        datalist = (site_config.parent / doc["datalist_dir"]).resolve() / "site-All.json"
        for seed in seeds:
            folder = args.out / f"seed{seed}"
            if _finished(folder):
                continue
            command = [
                sys.executable, "-m", "brats_fl.cli.main", "train-central", "--data-root", str(data_root),
                "--datalist", str(datalist), "--out", str(folder), "--epochs", str(args.epochs),
                "--val-every", str(args.val_every), "--threads", str(args.threads), *train_central_args(profile, seed),
            ]  # fmt: skip
            started = time.perf_counter()
            subprocess.run(command, check=True)
            (folder / "wall.json").write_text(json.dumps({"seconds": time.perf_counter() - started}))
    finished = [s for s in seeds if _finished(args.out / f"seed{s}")]
    if not finished:
        raise SystemExit(f"{args.out}: no finished seed yet")
    result = analyse(args.out, finished, args.tolerance)
    walls = [args.out / f"seed{s}" / "wall.json" for s in finished]
    record = args.out / "plateau.json"
    ran = {
        "command": " ".join(["python benchmarks/plateau.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
        "machine": f"{platform.machine()}, {platform.python_version()}, {args.threads} threads",
    }
    if args.figure_only and record.is_file():  # the command, date and machine that trained the seeds, not this one's
        ran = {k: json.loads(record.read_text())[k] for k in ran}
    result |= {
        "profile": args.profile,
        "seconds_per_seed": [json.loads(w.read_text())["seconds"] for w in walls if w.is_file()],
        **ran,
    }
    record.write_text(json.dumps(result, indent=1))
    if args.figure:
        title = (f"Centralized training, profile {args.profile}, the iid partition's pooled training cases, "
                 f"{len(finished)} seed(s)")  # fmt: skip
        figure(result, args.figure, title)
    budget = result["budget_epochs"]
    print(f"plateau: {budget} epochs" if budget else f"no plateau within {result['epochs'][-1]} epochs")
    print(json.dumps({k: result[k] for k in ("budget_epochs", "seed_gains_at_budget", "test_last_model")}, indent=1))


if __name__ == "__main__":
    main()
