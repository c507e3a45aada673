"""Mixed precision on a GPU (issue 20, item 7): what it saves and what it costs in Dice.

    python benchmarks/gpu_amp.py [--out runs/gpu_amp] [--json result.json] [--parts steps inference dice]
                                 [--precisions float32 float16 bfloat16] [--steps 20] [--epochs 30] [--cases 32]
                                 [--seeds 3]
    python benchmarks/gpu_amp.py --allow-cpu --precisions float32 bfloat16 --steps 2 --epochs 1 --cases 6 --seeds 2 \
        --patches 32  # checks the script; float16 on a CPU is slow

Each precision is an autocast type (``Trainer.use_precision``): float32 is none, float16 comes with loss scaling,
bfloat16 without; ``--amp on`` chooses bfloat16 on GPUs that have it and float16 on older ones (``amp_dtype``).

(a) Training step time and peak memory of the default U-Net at 64³ and 128³ patches (2 per step) in each precision,
    on tensors already on the device, after warm-up steps; on a GPU the peak is torch's largest allocation.
(b) Inference of one whole 240×240×155 four-channel case (Gaussian sliding windows of 128³) in each precision, median
    of 3.
(c) Dice: one model per precision and seed, trained from the same seed, data and order on a phantom cohort
    (``--cases``, 240×240×155 at 2 mm, 64³ patches), each scored on the same test cases in float32 and in its own
    precision; means, and differences from float32 paired by case, with two-way bootstrap CIs (seeds and cases) and
    Wilcoxon's p. A training that diverges (``Trainer`` stops it) is recorded as such, with its error.

Refuses to run without CUDA unless ``--allow-cpu``: there the precisions run under CPU autocast, a check that the
script works, not a figure. Prints JSON with the date and the device, and rewrites ``--json`` after each part so that
a run cut short on a lent machine keeps what it measured; docs/performance.md records it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch
from brats_fl.data.datalist import load_datalist
from brats_fl.data.layout import find_cases
from brats_fl.data.loading import ANNOTATED, eval_loader
from brats_fl.data.partition import assign_sites, write_datalists
from brats_fl.data.phantom import generate_cohort
from brats_fl.results.stats import bootstrap_ci, case_means, paired_differences, score_matrix, wilcoxon_p
from brats_fl.seg.trainer import TrainConfig, Trainer, make_train_loader
from monai.data import MetaTensor

PRECISIONS = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _trainer(precision: str, **config: object) -> Trainer:
    trainer = Trainer(TrainConfig.from_dict({"amp": "off", **config}))
    trainer.use_precision(PRECISIONS[precision])
    return trainer


def step_cost(patch: int, precision: str, steps: int) -> dict:
    """Seconds per optimiser step and peak device memory, default U-Net, two patches of ``patch``³ per step."""
    trainer = _trainer(precision, patch_size=[patch] * 3, batch_size=2, samples_per_case=1)
    device = trainer.device
    batch = [
        {
            "image": torch.randn(4, patch, patch, patch),
            "label": (torch.rand(3, patch, patch, patch) > 0.7).float(),
            ANNOTATED: torch.ones(3, dtype=torch.bool),
        }
        for _ in range(2)
    ]
    loader = torch.utils.data.DataLoader(batch, batch_size=2)
    trainer.train_epochs(loader, 2)  # warm-up: kernels chosen, memory pools filled
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train_epochs(loader, steps)
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return {"patch": patch, "precision": precision, "s_per_step": seconds, "peak_bytes": peak}


def inference_time(precision: str, repeats: int = 3) -> dict:
    """Median seconds to segment one whole case (4 x 240 x 240 x 155) by 128³ sliding windows."""
    trainer = _trainer(precision, patch_size=[128] * 3)
    image = MetaTensor(torch.randn(1, 4, 240, 240, 155))
    trainer.infer(image)  # warm-up
    times = []
    for _ in range(repeats):
        _sync(trainer.device)
        start = time.perf_counter()
        trainer.infer(image)
        _sync(trainer.device)
        times.append(time.perf_counter() - start)
    return {"precision": precision, "s_per_case": statistics.median(times)}


def _cohort(out: Path, cases: int) -> tuple[list[dict], list[dict], list[dict]]:
    """A one-site phantom cohort (made once): training, validation and test items."""
    root, lists = out / "data", out / "lists"
    if not root.is_dir():
        generate_cohort(root, cases=cases, sites=1, seed=3)
    if not lists.is_dir():
        write_datalists(root, assign_sites(find_cases(root), 1, "equal"), lists)
    datalist = load_datalist(next(lists.glob("site-*.json")), root)
    return datalist.items("training"), datalist.items("validation"), datalist.items("test")


def _case_dice(scores: dict) -> dict[str, float]:
    """Each test case's Dice averaged over the regions it has."""
    return {
        row["case_id"]: statistics.fmean(v for k, v in row.items() if k.startswith("dice_"))
        for row in scores["per_case"]
    }


def dice(out: Path, precisions: list[str], cases: int, epochs: int, patch: int, seeds: int) -> dict:
    """Per-case test Dice of one model per precision and seed (same seed, data and order), each inferred in float32
    and in its own precision; with the mean and 95 % CI of each, and of each against float32 paired by case."""
    train, _, test = _cohort(out, cases)
    runs: dict[str, list[dict[str, float]]] = {}
    diverged = []
    for seed in range(seeds):
        for trained in precisions:
            trainer = _trainer(trained, patch_size=[patch] * 3, spacing=2.0, seed=seed)
            config = trainer.config
            try:
                trainer.train_epochs(make_train_loader(train, config, out / "cache"), epochs)
            except FloatingPointError as error:
                diverged.append({"seed": seed, "trained": trained, "error": str(error)})
                print(json.dumps(diverged[-1]), flush=True)
                continue
            loader = eval_loader(test, out / "cache")
            for inferred in dict.fromkeys(("float32", trained)):
                trainer.use_precision(PRECISIONS[inferred])
                per_case = _case_dice(trainer.evaluate(loader, per_case=True, distances=False))
                runs.setdefault(f"trained {trained}, inferred {inferred}", []).append(per_case)
                print(json.dumps({"seed": seed, "trained": trained, "inferred": inferred, **per_case}), flush=True)
    reference_name = "trained float32, inferred float32"
    ids = sorted(runs[reference_name][0])
    matrices = {name: score_matrix(per_seed, ids) for name, per_seed in runs.items()}
    reference = matrices.pop(reference_name)
    differences = {
        f"{name} - {reference_name}": {
            **asdict(bootstrap_ci(m, reference)),
            "wilcoxon_p": wilcoxon_p(paired_differences(case_means(m, ids), case_means(reference, ids))),
        }
        for name, m in matrices.items()
    }
    summary = {name: asdict(bootstrap_ci(m)) for name, m in {reference_name: reference, **matrices}.items()}
    return {
        "seeds": seeds,
        "test_cases": len(ids),
        "finished_seeds": {name: len(per_seed) for name, per_seed in runs.items()},
        "mean_dice": summary,
        "differences": differences,
        "diverged": diverged,
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_amp"))
    parser.add_argument("--json", type=Path, default=None, help="also write the result here, after each part")
    parser.add_argument(
        "--parts", nargs="+", choices=("steps", "inference", "dice"), default=["steps", "inference", "dice"]
    )
    parser.add_argument("--precisions", nargs="+", choices=tuple(PRECISIONS), default=list(PRECISIONS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--cases", type=int, default=32, help="phantom cases of (c); a fifth of them are its test set")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of (c)")
    parser.add_argument("--patches", type=int, nargs="+", default=[64, 128], help="patch edges of (a)")
    parser.add_argument("--allow-cpu", action="store_true", help="run without CUDA (CPU autocast)")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        parser.error("no CUDA device: this benchmark measures a GPU (--allow-cpu checks the script on a CPU)")
    if "float32" not in args.precisions:
        parser.error("--precisions must include float32, the reference")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    result: dict = {"date": datetime.date.today().isoformat(), "device": device, "torch": torch.__version__}
    parts = {
        "steps": lambda: [step_cost(p, x, args.steps) for p in args.patches for x in args.precisions],
        "inference": lambda: [inference_time(x) for x in args.precisions],
        "dice": lambda: dice(args.out, args.precisions, args.cases, args.epochs, min(args.patches), args.seeds),
    }
    for name, measure in ((n, m) for n, m in parts.items() if n in args.parts):
        result[name] = measure()
        print(json.dumps({name: result[name]}), flush=True)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
