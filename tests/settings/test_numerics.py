"""The CPU numerics a simulated run pins (brats_fl.settings.numerics)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from brats_fl.settings import numerics

_AVX2 = "avx2" in (numerics._cpuinfo("flags") or "").split()


def test_modes_and_refusal():
    assert numerics.environment("native") == {}
    with pytest.raises(ValueError, match="numerics must be one of"):
        numerics.environment("fast")


@pytest.mark.skipif(not _AVX2, reason="pinning applies to CPUs with AVX2")
def test_portable_pins_all_three_libraries():
    assert set(numerics.environment("portable")) == {"ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR"}


def _describe(settings: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in numerics.PORTABLE} | settings | {"OMP_NUM_THREADS": "1"}
    code = "import json; from brats_fl.settings import numerics; print(json.dumps(numerics.describe(reference=True)))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not _AVX2, reason="pinning applies to CPUs with AVX2")
def test_the_kernels_decide_the_bits_and_pinning_fixes_them():
    """Why the pinning exists: torch's generic kernels give a U-Net step other bits than its AVX2 ones, as another
    machine's AVX-512 ones would; the pinned settings are what the record shows."""
    pinned = _describe(numerics.environment("portable"))
    generic = _describe({"ATEN_CPU_CAPABILITY": "default"})
    assert pinned["cpu_capability"] == "AVX2" and generic["cpu_capability"] == "DEFAULT"
    assert pinned["settings"] == numerics.PORTABLE
    assert pinned["reference_step_sha256"] != generic["reference_step_sha256"]
