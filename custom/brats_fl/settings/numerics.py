"""CPU numerics that every x86 machine with AVX2 shares, so that one seed gives one model on each of them.

A seed fixes the data order, the initial weights and the augmentation, but not the arithmetic: torch picks its CPU
kernels by the instruction sets it finds (AVX-512 where there is one, else AVX2), oneDNN's convolutions and MKL do the
same, and each path sums in its own order. Measured on this project's machines (2-core AMD EPYC, AVX2): one U-Net
forward and backward gives other bits under torch's default kernels than under AVX2 ones, and other bits again with 2
threads than with 1. So two machines of the same kind that differ only in AVX-512 train different models from the same
seed. Pinning the three libraries to AVX2 removes that difference at a small cost in speed where AVX-512 exists; the
thread count is pinned by the caller (``brats_fl.jobs.simulate``).

The settings are the libraries' own switches, read when each library starts: torch's ``ATEN_CPU_CAPABILITY``,
oneDNN's ``ONEDNN_MAX_CPU_ISA`` and MKL's conditional numerical reproducibility, ``MKL_CBWR``. They must be in the
environment of the processes that train (the simulator's site processes, which inherit it).
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

#: the settings that pin torch, oneDNN and MKL to AVX2 kernels
PORTABLE = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2,STRICT"}
#: ``portable`` pins the kernels (where the CPU has AVX2), ``native`` lets each library choose
MODES = ("portable", "native")


def _cpuinfo(field: str) -> str | None:
    """A field of /proc/cpuinfo's first processor (None where there is no such file or field)."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    return next((line.partition(":")[2].strip() for line in lines if line.split(":")[0].strip() == field), None)


def environment(mode: str) -> dict[str, str]:
    """The environment variables of ``mode``; a CPU without AVX2 runs natively, which it would anyway."""
    if mode not in MODES:
        raise ValueError(f"numerics must be one of {list(MODES)}, got {mode!r}")
    if mode == "native" or "avx2" not in (_cpuinfo("flags") or "").split():
        return {}
    return dict(PORTABLE)


def describe(reference: bool = False) -> dict[str, object]:
    """What decides this process's arithmetic: the CPU, the kernels torch chose, its threads and the settings above.
    ``reference`` adds the hash of one small U-Net step (forward and backward), which two machines share exactly
    when their numerics agree."""
    import torch

    out: dict[str, object] = {
        "cpu": _cpuinfo("model name") or platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "settings": {k: os.environ[k] for k in PORTABLE if k in os.environ},
    }
    if reference:
        out["reference_step_sha256"] = _reference_step()
    return out


def _reference_step() -> str:
    import torch
    from monai.networks.nets import UNet

    generator = torch.Generator().manual_seed(0)
    net = UNet(3, 4, 3, (8, 16, 32), (2, 2), num_res_units=2)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    out = net(torch.randn(2, 4, 32, 32, 32, generator=generator))
    out.square().mean().backward()
    digest = hashlib.sha256(out.detach().numpy().tobytes())
    for p in net.parameters():
        digest.update(p.grad.numpy().tobytes())
    return digest.hexdigest()
