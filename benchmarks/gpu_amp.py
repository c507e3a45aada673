"""Mixed precision on a GPU (issue 20, item 7): what it saves and what it costs in Dice.

    python benchmarks/gpu_amp.py [--out runs/gpu_amp] [--steps 20] [--epochs 30] [--cases 16]
    python benchmarks/gpu_amp.py --allow-cpu --steps 2 --epochs 1 --cases 6 --patches 32   # a check of the script

(a) Training step time and peak memory of the default U-Net at 64³ and 128³ patches (2 per step), with and
    without mixed precision (``--amp on``: float16 with loss scaling on a GPU), on tensors already on the device,
    after warm-up steps; on a GPU the peak is torch's largest allocation.
(b) Inference of one whole 240×240×155 four-channel case (Gaussian sliding windows of 128³), fp32 and mixed, median
    of 3.
(c) Dice: one model trained with mixed precision and one in fp32 from the same seed, data and order, on a phantom
    cohort (``--cases``, 240×240×155 at 2 mm, 64³ patches), each scored on the same test cases in fp32 and mixed.

Refuses to run without CUDA unless ``--allow-cpu``: there mixed precision is CPU autocast in bfloat16, a check
that the script works, not a figure. Prints JSON with the date and the device; docs/benchmarks.md records it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch
from brats_fl.data.datalist import load_datalist
from brats_fl.data.layout import find_cases
from brats_fl.data.loading import ANNOTATED, eval_loader
from brats_fl.data.partition import assign_sites, write_datalists
from brats_fl.data.phantom import generate_cohort
from brats_fl.seg.trainer import TrainConfig, Trainer, amp_dtype, make_train_loader
from monai.data import MetaTensor


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_cost(patch: int, amp: str, steps: int) -> dict:
    """Seconds per optimiser step and peak device memory, default U-Net, two patches of ``patch``³ per step."""
    config = TrainConfig.from_dict({"patch_size": [patch] * 3, "batch_size": 2, "samples_per_case": 1, "amp": amp})
    trainer = Trainer(config)
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
    return {"patch": patch, "amp": amp, "dtype": str(trainer.amp_dtype), "s_per_step": seconds, "peak_bytes": peak}


def inference_time(amp: str, repeats: int = 3) -> dict:
    """Median seconds to segment one whole case (4 x 240 x 240 x 155) by 128³ sliding windows."""
    trainer = Trainer(TrainConfig.from_dict({"patch_size": [128] * 3, "amp": amp}))
    image = MetaTensor(torch.randn(1, 4, 240, 240, 155))
    trainer.infer(image)  # warm-up
    times = []
    for _ in range(repeats):
        _sync(trainer.device)
        start = time.perf_counter()
        trainer.infer(image)
        _sync(trainer.device)
        times.append(time.perf_counter() - start)
    return {"amp": amp, "dtype": str(trainer.amp_dtype), "s_per_case": statistics.median(times)}


def _cohort(out: Path, cases: int) -> tuple[list[dict], list[dict], list[dict]]:
    """A one-site phantom cohort (made once): training, validation and test items."""
    root, lists = out / "data", out / "lists"
    if not root.is_dir():
        generate_cohort(root, cases=cases, sites=1, seed=3)
    if not lists.is_dir():
        write_datalists(root, assign_sites(find_cases(root), 1, "equal"), lists)
    datalist = load_datalist(next(lists.glob("site-*.json")), root)
    return datalist.items("training"), datalist.items("validation"), datalist.items("test")


def dice(out: Path, cases: int, epochs: int, patch: int) -> list[dict]:
    """Test Dice of a model trained in fp32 and one trained mixed, same seed, each inferred both ways."""
    train, _, test = _cohort(out, cases)
    rows = []
    for trained in ("off", "on"):
        config = TrainConfig.from_dict({"patch_size": [patch] * 3, "spacing": 2.0, "amp": trained, "seed": 0})
        trainer = Trainer(config)
        trainer.train_epochs(make_train_loader(train, config, out / "cache"), epochs)
        loader = eval_loader(test, out / "cache")
        trained_dtype = trainer.amp_dtype
        for inferred, dtype in (("off", None), ("on", amp_dtype("on", trainer.device))):
            trainer.amp_dtype = dtype
            scores = trainer.evaluate(loader, distances=False)
            rows.append({"trained_amp": trained, "inferred_amp": inferred, "dice_mean": scores["dice_mean"]})
        trainer.amp_dtype = trained_dtype
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_amp"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--patches", type=int, nargs="+", default=[64, 128], help="patch edges of (a)")
    parser.add_argument("--allow-cpu", action="store_true", help="run without CUDA (CPU autocast, bfloat16)")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        parser.error("no CUDA device: this benchmark measures a GPU (--allow-cpu checks the script on a CPU)")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    result = {
        "date": datetime.date.today().isoformat(),
        "device": device,
        "torch": torch.__version__,
        "steps": [step_cost(p, amp, args.steps) for p in args.patches for amp in ("off", "on")],
        "inference": [inference_time(amp) for amp in ("off", "on")],
        "dice": dice(args.out, args.cases, args.epochs, min(args.patches)),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
