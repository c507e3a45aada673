"""The job registry declares every job once; the catalogue builds each, and the registry stays light to import."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
from brats_fl.jobs.catalogue import builder
from brats_fl.jobs.registry import JOBS, get_job


@pytest.mark.parametrize("name", JOBS)
def test_every_job_has_a_documented_recipe_builder(name: str):
    assert callable(builder(name)) and inspect.getdoc(builder(name))


def test_an_unknown_job_is_refused_naming_the_jobs():
    with pytest.raises(ValueError, match="unknown job 'brats_nope'; choose one of"):
        get_job("brats_nope")


def test_round_timeouts_belong_to_the_jobs_whose_rounds_can_be_cut_short():
    timed = {name for name, job in JOBS.items() if "timeout" in job.uses}
    assert timed == {name for name, job in JOBS.items() if job.uses & {"deadline", "hypernetwork"}}
    assert "brats_scaffold" not in timed and "brats_cyclic" not in timed


def test_the_registry_imports_neither_torch_nor_flare():
    code = "import sys, brats_fl.jobs.registry; print(sorted({m.split('.')[0] for m in sys.modules}))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert not {"torch", "nvflare", "monai"} & set(eval(loaded))
