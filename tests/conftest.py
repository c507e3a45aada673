"""Shared fixtures: small hand-made cases for the data checks, a tiny phantom cohort, simulated sites."""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import nibabel as nib
import numpy as np
import pytest

MODS = ("t1", "t1ce", "t2", "flair")
#: the test files that take minutes (POCs, a provisioned deployment, several simulations each), longest first, as
#: measured in the suite's durations: they start first, so that the workers of ``--dist loadfile`` do not end with one
#: of them running a long file alone while the other waits (the suite lasts as long as its busiest worker)
LONGEST_FIRST = ("test_resume_poc.py", "test_deploy.py", "test_hung_site_poc.py", "test_tune_sim.py")
#: one region per site, as in the SegViz paper's organs (the partially labelled sites)
ANNOTATIONS = {"site-1": ["WT"], "site-2": ["TC"], "site-3": ["ET"]}


def pytest_collection_modifyitems(items: list) -> None:
    """Run ``LONGEST_FIRST``'s files first, in that order; the rest keep their order."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def benchmark_script(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (``benchmarks/`` is no installed package), registered in ``sys.modules``:
    a script's dataclasses look their module up while they are built."""
    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def tiny_params(**settings):
    """A job's parameters with a U-Net and patches small enough for the CPU simulator; ``settings`` add the rest.

    Cross-site evaluation is off unless a test asks for it (``cross_site="all"`` or ``"global"``): its validate
    tasks, one after another, add about 18 s of FLARE task round trips to a tiny simulation."""
    from brats_fl.jobs.catalogue import JobParams

    return JobParams(**{"patch_size": (32, 32, 32), "channels": (8, 16, 32), "cross_site": "none"} | settings)


def write_case(root: Path, case_id: str, shape=(24, 24, 16), seed: int = 0, release: str = "other") -> Path:
    """A minimal valid case: a box-shaped brain with a nested spherical tumour (oedema > core > enhancing rim), its
    files named and labelled as ``release`` names and labels them (``brats_fl.data.layout.RELEASES``)."""
    from brats_fl.data.labels import convention
    from brats_fl.data.layout import release as named

    rel = named(release)
    rng = np.random.default_rng(seed)
    folder = root / case_id
    folder.mkdir(parents=True)
    grid = np.indices(shape).astype(np.float32)
    centre = np.array(shape, dtype=np.float32)[:, None, None, None] / 2
    radius = np.sqrt(((grid - centre) ** 2).sum(0))
    brain = np.zeros(shape, bool)
    brain[2:-2, 2:-2, 2:-2] = True
    seg = np.zeros(shape, np.uint8)
    seg[radius < 6] = 2
    seg[radius < 4] = 1
    seg[(radius >= 2.5) & (radius < 4)] = convention(rel.convention).et
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    for i, mod in enumerate(MODS):
        img = (brain * (100 + 10 * i) + seg * 20 + rng.normal(0, 2, shape) * brain).astype(np.float32)
        nib.save(nib.Nifti1Image(img, affine), str(folder / rel.file_name(case_id, mod)))
    nib.save(nib.Nifti1Image(seg, affine), str(folder / rel.file_name(case_id, "seg")))
    return folder


def rewrite_nifti(path: Path, payload: bytes | None = None, **fields) -> None:
    """Rewrite a ``.nii.gz`` byte for byte with header ``fields`` set (``dim``, ``datatype``, ``pixdim``, ...),
    unchecked and unfixed by nibabel, then ``payload`` (default: the voxels it held), as a hostile file would be."""
    raw = gzip.decompress(path.read_bytes())
    header = nib.Nifti1Header(binaryblock=raw[:348], check=False)
    offset = int(header["vox_offset"])
    for key, value in fields.items():
        header[key] = value
    body = raw[offset:] if payload is None else payload
    path.write_bytes(gzip.compress(header.binaryblock + raw[348:offset] + body))


@pytest.fixture
def good_cohort(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for i in range(1, 7):
        write_case(root, f"BraTS20_Training_{i:03d}", seed=i)
    return root


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 phantom cases from 3 scanner profiles on a small grid, shared by the training tests."""
    from brats_fl.data.phantom import generate_cohort

    root = tmp_path_factory.mktemp("phantom") / "data"
    generate_cohort(root, cases=12, sites=3, seed=7, shape=(64, 64, 48))
    return root


@pytest.fixture(scope="session")
def sim_data(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three sites of the tiny phantom, one scanner each, and a site configuration pointing at them, with a disk
    cache that the session's runs share, as simulated sites do (``site_configs/simulation.json``): a run after the
    first neither checks nor decodes a case again."""
    from brats_fl.data.layout import find_cases
    from brats_fl.data.partition import assign_sites, write_datalists

    root = tmp_path_factory.mktemp("sim")
    parts = assign_sites(find_cases(tiny_phantom), 3, "natural", attribute="scanner")
    write_datalists(tiny_phantom, parts, root / "lists", description={"scheme": "natural", "attribute": "scanner"})
    config = root / "site_configs" / "simulation.json"
    config.parent.mkdir()
    doc = {"data_root": str(tiny_phantom), "datalist_dir": str(root / "lists"), "threads": 1}
    config.write_text(json.dumps(doc | {"state_dir": str(root / "site_state"), "cache_dir": str(root / "cache")}))
    return config


@pytest.fixture(scope="session")
def fedavg_run(sim_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """One tiny FedAvg job in FLARE's simulator (3 sites, 3 rounds, every update kept, every message recorded),
    shared by the tests that check the job, what leaves its sites, and its report; returns the simulator
    workspace and the job's parameters."""
    from brats_fl.jobs.simulate import run_simulation

    params = tiny_params(
        rounds=3,
        local_epochs=3,
        lr=3e-3,
        audit_transfer=True,
        audit=True,
        cross_site="all",
    )
    workspace = tmp_path_factory.mktemp("fedavg")
    run_simulation("brats_fedavg", params, sim_data, workspace)
    return workspace, params


@pytest.fixture(scope="session")
def partial_sites(tiny_phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny phantom's three scanner sites, each annotating one region; returns the site configuration."""
    root = tmp_path_factory.mktemp("partial")
    from brats_fl.data.layout import find_cases
    from brats_fl.data.partition import assign_sites, write_datalists

    parts = assign_sites(find_cases(tiny_phantom), 3, "natural", attribute="scanner")
    write_datalists(tiny_phantom, parts, root / "lists", annotated=ANNOTATIONS)
    config = root / "simulation.json"
    doc = {"data_root": str(tiny_phantom), "datalist_dir": str(root / "lists"), "threads": 1}
    config.write_text(json.dumps(doc | {"state_dir": str(root / "site_state"), "cache_dir": str(root / "cache")}))
    return config


def tiny_trainer(**config):
    """A FLARE-free trainer of a 2-level U-Net small enough for unit tests (``synthetic_batches``' 16³ patches)."""
    from brats_fl.seg.trainer import TrainConfig, Trainer

    model = {"channels": [4, 8], "strides": [2], "num_res_units": 1, "init_seed": 0}
    return Trainer(TrainConfig.from_dict({"model": model, "patch_size": [16, 16, 16], "threads": 1} | config))


def synthetic_batches(count: int = 3, seed: int = 0) -> list[dict]:
    """Random 16³ training batches in the data pipeline's layout (image, region labels, annotated regions)."""
    import torch
    from brats_fl.data.loading import ANNOTATED

    generator = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        image = torch.as_tensor(generator.normal(size=(2, 4, 16, 16, 16)), dtype=torch.float32)
        label = torch.as_tensor(generator.random((2, 3, 16, 16, 16)) > 0.7, dtype=torch.float32)
        out.append({"image": image, "label": label, ANNOTATED: torch.ones(2, 3, dtype=torch.bool)})
    return out
