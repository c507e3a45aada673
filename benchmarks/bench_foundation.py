"""Foundation benchmarks: training-step overhead, whole-case inference time, training peak memory.

    python benchmarks/bench_foundation.py [--threads 2] [--steps 30]

(a) our training loop (cached MONAI loading + random crops + augmentation) against a bare MONAI U-Net
    forward/backward/step of the same size and batch on tensors already in memory, after a warm-up epoch
    (the two measured in alternating blocks);
(b) sliding-window inference of one 240x240x155 four-channel case with the default model (median of 3);
(c) peak resident memory of a training process at the default patch size (measured in a child process).
Uses a 6-case phantom cohort in data/bench (made on first run). Prints JSON, with the machine and the
load average before and after; docs/performance.md records the results.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import monai
import torch
from brats_fl.data.layout import find_cases
from brats_fl.data.loading import inference_transforms
from brats_fl.data.partition import assign_sites, write_datalists
from brats_fl.data.phantom import generate_cohort
from brats_fl.seg.trainer import TrainConfig, Trainer, make_train_loader

REPO = Path(__file__).resolve().parents[1]
# absolute: write_datalists resolves its root, and case paths must lie below it (a relative root fails)
DATA = REPO / "data" / "bench"


def _cohort() -> tuple[Path, Path]:
    root, lists = DATA / "cohort", DATA / "lists"
    # test the files written last, so an interrupted run is redone rather than left half-made
    if not (root / "phantom.json").exists():
        generate_cohort(root, cases=6, sites=3, seed=0)
    if not (lists / "site-All.json").exists():
        write_datalists(root, assign_sites(find_cases(root), 1, "equal"), lists, split=(1, 0, 0))
    return root, lists / "site-1.json"


def bench_step(threads: int, steps: int) -> dict:
    """Seconds per optimiser step, ours and bare, measured in alternating blocks.

    Alternating (one epoch of ours, then as many bare steps) exposes both to the same machine conditions,
    so a burst of load from another process cannot land on one side only.
    """
    from brats_fl.data.datalist import load_datalist

    root, datalist_path = _cohort()
    config = TrainConfig(threads=threads)
    items = load_datalist(datalist_path, root).items("training")
    loader = make_train_loader(items, config)
    ours = Trainer(config)
    bare = Trainer(config)  # same network, optimiser and loss; data already in memory
    x = torch.randn(config.batch_size, 4, *config.patch_size)
    y = (torch.rand(config.batch_size, 3, *config.patch_size) > 0.9).float()
    ours.train_epochs(loader, 1)  # warm-up epoch
    for _ in range(len(loader)):
        _bare_step(bare, x, y)
    t_ours = t_bare = 0.0
    done = 0
    while done < steps:
        start = time.perf_counter()
        block = int(ours.train_epochs(loader, 1, max_steps=steps - done)["steps"])
        t_ours += time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(block):
            _bare_step(bare, x, y)
        t_bare += time.perf_counter() - start
        done += block
    return {
        "cases": len(items),
        "batch": [config.batch_size, 4, *config.patch_size],
        "steps": steps,
        "ours_s_per_step": t_ours / steps,
        "bare_s_per_step": t_bare / steps,
        "ratio": t_ours / t_bare,
    }


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
    times = []
    for _ in range(3):
        start = time.perf_counter()
        trainer.infer(image[None])
        times.append(time.perf_counter() - start)
    return {"shape": list(image.shape), "seconds_median_of_3": sorted(times)[1], "seconds": times}


def bench_memory(threads: int) -> dict:
    """Peak RSS of a child that trains 10 steps at the default patch size (the parent's memory excluded)."""
    code = (
        "import resource; from benchmarks.bench_foundation import _train_only; "
        f"_train_only({threads}); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return {"peak_rss_mib": int(out.stdout.strip().splitlines()[-1]) / 1024}  # ru_maxrss is in KiB on Linux


def _train_only(threads: int) -> None:
    from brats_fl.data.datalist import load_datalist

    root, datalist_path = _cohort()
    config = TrainConfig(threads=threads)
    items = load_datalist(datalist_path, root).items("training")
    loader = make_train_loader(items, config)
    Trainer(config).train_epochs(loader, 10, max_steps=10)


def _machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kib = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
    )
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": round(mem_kib / 2**20, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    config = TrainConfig()
    params = sum(p.numel() for p in Trainer(config).model.parameters())
    results = {
        "date": datetime.date.today().isoformat(),
        "command": f"python benchmarks/bench_foundation.py --threads {args.threads} --steps {args.steps}",
        "machine": _machine(),
        "model": {**config.model, "parameters": params, "patch_size": list(config.patch_size)},
        "load_average_before": os.getloadavg(),
    }
    _cohort()  # generated before timing starts
    results["a_training_step"] = bench_step(args.threads, args.steps)
    results["b_inference"] = bench_inference(args.threads)
    results["c_memory"] = bench_memory(args.threads)
    results["load_average_after"] = os.getloadavg()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
