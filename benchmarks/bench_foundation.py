"""Foundation benchmarks: training-step overhead, whole-case inference time, training peak memory.

    python benchmarks/bench_foundation.py [--threads 2] [--steps 30]

(a) our training loop (cached MONAI loading + random crops + augmentation) against a bare MONAI U-Net
    forward/backward/step of the same size and batch on tensors already in memory, after a warm-up epoch;
(b) sliding-window inference of one 240x240x155 four-channel case with the default model;
(c) peak resident memory of a training process at the default patch size (measured in a child process).
Prints a Markdown table to paste into docs/benchmarks.md.
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

import torch
from brats_fl.data.layout import find_cases
from brats_fl.data.loading import inference_transforms, train_loader
from brats_fl.data.partition import assign_sites, write_datalists
from brats_fl.data.phantom import generate_cohort
from brats_fl.training import TrainConfig, Trainer

DATA = Path("data/bench")


def _cohort() -> tuple[Path, Path]:
    root, lists = DATA / "cohort", DATA / "lists"
    if not root.exists():
        generate_cohort(root, cases=6, sites=3, seed=0)
    if not lists.exists():
        write_datalists(root, assign_sites(find_cases(root), 1, "equal"), lists, split=(1, 0, 0))
    return root, lists / "site-1.json"


def bench_step(threads: int, steps: int) -> dict:
    from brats_fl.data.datalist import load_datalist

    root, datalist_path = _cohort()
    config = TrainConfig(threads=threads)
    items = load_datalist(datalist_path, root).items("training")
    loader = train_loader(items, config.patch_size, config.batch_size, config.samples_per_case, seed=0)
    ours = Trainer(config)
    ours.train_epochs(loader, 1)  # warm-up: fills the cache
    start = time.perf_counter()
    done = 0
    while done < steps:
        done += int(ours.train_epochs(loader, 1, max_steps=steps - done)["steps"])
    t_ours = (time.perf_counter() - start) / steps

    bare = Trainer(config)  # same network, optimiser and loss; data already in memory
    x = torch.randn(config.batch_size, 4, *config.patch_size)
    y = (torch.rand(config.batch_size, 3, *config.patch_size) > 0.9).float()
    for _ in range(3):
        _bare_step(bare, x, y)
    start = time.perf_counter()
    for _ in range(steps):
        _bare_step(bare, x, y)
    t_bare = (time.perf_counter() - start) / steps
    return {"ours_s_per_step": t_ours, "bare_s_per_step": t_bare, "ratio": t_ours / t_bare}


def _bare_step(trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> None:
    trainer.model.train()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.loss_fn(trainer.model(x), y).backward()
    trainer.optimizer.step()


def bench_inference(threads: int) -> dict:
    root, _ = _cohort()
    case = find_cases(root)[0]
    image = inference_transforms()({"image": [str(case.files[m]) for m in ("t1", "t1ce", "t2", "flair")]})["image"]
    trainer = Trainer(TrainConfig(threads=threads))
    trainer.infer(image[None])  # warm-up
    start = time.perf_counter()
    trainer.infer(image[None])
    return {"shape": list(image.shape), "seconds": time.perf_counter() - start}


def bench_memory(threads: int) -> dict:
    """Peak RSS of a child that trains 10 steps at the default patch size (the parent's memory excluded)."""
    code = (
        "import resource; from benchmarks.bench_foundation import _train_only; "
        f"_train_only({threads}); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {"peak_rss_mib": int(out.stdout.strip().splitlines()[-1]) / 1024}


def _train_only(threads: int) -> None:
    from brats_fl.data.datalist import load_datalist

    root, datalist_path = _cohort()
    config = TrainConfig(threads=threads)
    items = load_datalist(datalist_path, root).items("training")
    Trainer(config).train_epochs(train_loader(items, config.patch_size, 2, 2, seed=0), 1, max_steps=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    config = TrainConfig()
    params = sum(p.numel() for p in Trainer(config).model.parameters())
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads available, torch {torch.__version__}",
        "model": {**config.model, "parameters": params, "patch_size": list(config.patch_size)},
        "a_training_step": bench_step(args.threads, args.steps),
        "b_inference": bench_inference(args.threads),
        "c_memory": bench_memory(args.threads),
    }
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
