"""The three networks' size and training step, and predict's time per case with flips and ensembles (issue 39).

    python benchmarks/networks_predict.py [--threads 2] [--patch 64] [--case-shape 128 128 96] [--json out.json]

(a) Each network with its defaults (``brats_fl.seg.model``): parameters, and the median time of one training step
    (forward, loss, backward, Adam) of a batch of 2 random ``--patch``³ patches over 3 steps after one warm-up, in
    training mode (DynUNet with its deep supervision).
(b) ``brats-fl predict``'s time per case (``Predictor.write``: read, crop, normalise, sliding windows, write) on one
    phantom case of ``--case-shape``, with the default U-Net and 64³ windows: one model, one model with the 8 flips,
    an ensemble of 3, and the ensemble with flips; the models are untrained (their weights do not change the time).

Prints JSON with the date and the machine; docs/benchmarks.md records it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from brats_fl.data.layout import find_cases
from brats_fl.data.phantom import generate_cohort
from brats_fl.seg.inference import Predictor
from brats_fl.seg.model import NETWORKS, build_model, model_args
from brats_fl.seg.trainer import RegionLoss, TrainConfig, Trainer


def step_cost(network: str, patch: int) -> dict:
    model = build_model(model_args(network, init_seed=0)).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = RegionLoss(with_ce=False)
    image = torch.randn(2, 4, patch, patch, patch)
    label = (torch.rand(2, 3, patch, patch, patch) > 0.8).float()
    times = []
    for _ in range(4):
        start = time.perf_counter()
        optimiser.zero_grad()
        loss_fn(model(image), label).backward()
        optimiser.step()
        times.append(time.perf_counter() - start)
    return {"parameters": sum(p.numel() for p in model.parameters()), "step_s": statistics.median(times[1:])}


def predict_cost(shape: tuple[int, int, int], folder: Path) -> dict:
    generate_cohort(folder / "data", cases=1, sites=1, seed=11, shape=shape)
    (case,) = find_cases(folder / "data")
    models = []
    for seed in range(3):
        path = folder / f"model_{seed}.pt"
        Trainer(TrainConfig.from_dict({"model": model_args("unet", init_seed=seed)})).save(path)
        models.append(path)
    out = {}
    for name, paths, tta in (
        ("1 model", models[:1], False),
        ("1 model, 8 flips", models[:1], True),
        ("3 models", models, False),
        ("3 models, 8 flips", models, True),
    ):
        predictor = Predictor(paths, (64, 64, 64), tta=tta)
        start = time.perf_counter()
        predictor.write(case, folder / f"{name}.nii.gz")
        out[name] = time.perf_counter() - start
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--case-shape", type=int, nargs=3, default=[128, 128, 96])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads",
        "torch": torch.__version__,
        "networks": {n: step_cost(n, args.patch) for n in NETWORKS},
    }
    with tempfile.TemporaryDirectory() as tmp:
        result["predict_s_per_case"] = predict_cost(tuple(args.case_shape), Path(tmp))
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
