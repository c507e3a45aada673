"""One site's training step: ours against a bare MONAI step, and what the field uses on CPU to make it faster.

    python benchmarks/step_speed.py [--threads 1] [--steps 24] [--patch 48] [--spacing 2]

Run under the jobs' numerics (``brats_fl.settings.numerics``, ``portable``: AVX2 kernels), set before torch starts, as a
site's process has them. Every variant trains the same U-Net (the job's default channels) at the same batch, and is
measured in alternating blocks against the bare step, so that load from elsewhere lands on both:

- ``ours``: the site's loop (``Trainer.train_epochs``) on its cached, augmenting patch loader (``make_train_loader``);
- ``loader``: drawing the same batches alone, without a model (the data path's share of ``ours``);
- ``bare``: forward, loss, backward and Adam step on tensors already in memory (the reference, ratio 1);
- ``channels_last``: the bare step with model and input in channels-last 3D memory format;
- ``compiled``: the bare step with ``torch.compile`` (inductor; its compile time is left out and reported);
- ``interop1``: the bare step with one inter-op thread.

Prints JSON: seconds per step, steps per second and the ratio to ``bare`` for each, the machine and the load average;
``docs/performance.md`` records the results. A variant that fails (``torch.compile`` without a C compiler) says why.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "custom"), str(REPO)]

from brats_fl.settings.numerics import environment  # noqa: E402  (torch-free: the settings precede torch)

os.environ.update(environment("portable"))

import torch  # noqa: E402
from brats_fl.data.datalist import load_datalist  # noqa: E402
from brats_fl.results.benchmark import machine  # noqa: E402
from brats_fl.seg.trainer import TrainConfig, Trainer, make_train_loader  # noqa: E402

from benchmarks.bench_foundation import _cohort  # noqa: E402


def _bare_step(trainer: Trainer, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.loss_fn(model(x).float(), y).backward()
    trainer.optimizer.step()


def _timed(fn, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a site of a 3-site job on 2 cores: 1)")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--patch", type=int, default=48)
    parser.add_argument("--spacing", type=float, default=2.0)
    args = parser.parse_args()
    root, datalist_path = _cohort()
    config = TrainConfig(threads=args.threads, patch_size=(args.patch,) * 3, spacing=args.spacing)
    items = load_datalist(datalist_path, root, grid_required=args.spacing is None).items("training")
    loader = make_train_loader(items, config)
    ours = Trainer(config)
    x = torch.randn(config.batch_size, 4, *config.patch_size)
    y = (torch.rand(config.batch_size, 3, *config.patch_size) > 0.9).float()

    bare = Trainer(config)
    bare.model.train()
    variants = {"bare": lambda: _bare_step(bare, bare.model, x, y)}
    last = Trainer(config)
    last.model.train()
    last.model.to(memory_format=torch.channels_last_3d)
    x_last = x.to(memory_format=torch.channels_last_3d)
    variants["channels_last"] = lambda: _bare_step(last, last.model, x_last, y)
    notes: dict[str, str] = {}
    try:
        comp = Trainer(config)
        comp.model.train()
        compiled = torch.compile(comp.model)
        start = time.perf_counter()
        _bare_step(comp, compiled, x, y)
        notes["compile_seconds"] = f"{time.perf_counter() - start:.1f}"
        variants["compiled"] = lambda: _bare_step(comp, compiled, x, y)
    except Exception as err:  # reported, not fatal: the other variants still say what they say
        notes["compiled"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"

    batches = iter(())

    def draw() -> None:
        nonlocal batches
        try:
            next(batches)
        except StopIteration:
            batches = iter(loader)
            next(batches)

    ours.train_epochs(loader, 1)  # warm-up: caches filled, kernels chosen
    for fn in variants.values():
        fn()
    totals = dict.fromkeys(["ours", "loader", *variants], 0.0)
    done = 0
    while done < args.steps:
        start = time.perf_counter()
        block = int(ours.train_epochs(loader, 1, max_steps=args.steps - done)["steps"])
        totals["ours"] += time.perf_counter() - start
        totals["loader"] += _timed(draw, block)
        for name, fn in variants.items():
            totals[name] += _timed(fn, block)
        done += block
    interop = torch.get_num_interop_threads()
    results = {
        "date": datetime.date.today().isoformat(),
        "command": f"python benchmarks/step_speed.py --threads {args.threads} --steps {args.steps} "
        f"--patch {args.patch} --spacing {args.spacing}",
        "machine": machine(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "interop_threads": interop,
        "model_channels": list(ours.model.config()["channels"]),
        "batch": [config.batch_size, 4, *config.patch_size],
        "steps": done,
        "load_average": os.getloadavg(),
        "notes": notes,
        "variants": {
            name: {
                "s_per_step": t / done,
                "steps_per_s": done / t,
                "ratio_to_bare": t / totals["bare"],
            }
            for name, t in totals.items()
        },
    }
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
