"""The phantom cohort: BraTS layout, plausible labels and contrasts, scanner differences, determinism."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from brats_fl.data.checks import check_cases
from brats_fl.data.layout import find_cases
from brats_fl.data.phantom import generate_cohort

SHAPE = (48, 48, 32)


def _load(folder: Path, kind: str) -> np.ndarray:
    return np.asarray(nib.load(str(folder / f"{folder.name}_{kind}.nii.gz")).dataobj).astype(np.float32)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ph") / "data"
    generate_cohort(root, cases=10, sites=4, seed=3, shape=SHAPE)
    return root


def _high_frequency_energy(img: np.ndarray) -> float:
    brain = img > 0
    lap = np.abs(np.diff(img, 2, axis=0))[brain[1:-1]]
    return float(lap.mean() / img[brain].mean())


def test_layout_metadata_and_checks_pass(cohort: Path):
    cases = find_cases(cohort)
    assert [c.case_id for c in cases] == [f"BraTS20_Training_{i:03d}" for i in range(1, 11)]
    for case in cases:
        assert sorted(p.name for p in case.folder.iterdir()) == sorted(
            f"{case.case_id}_{k}.nii.gz" for k in ("t1", "t1ce", "t2", "flair", "seg")
        )
    assert check_cases(cases) == []
    with (cohort / "name_mapping.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["BraTS_2020_subject_ID"] for r in rows] == [c.case_id for c in cases]
    assert cases[3].attributes["scanner"] == "spike" and cases[4].attributes["scanner"] == "clean"
    assert json.loads((cohort / "phantom.json").read_text())["shape"] == list(SHAPE)


def test_labels_tumour_inside_brain_and_variety(cohort: Path):
    volumes, enhancing = [], []
    for case in find_cases(cohort):
        seg, t1 = _load(case.folder, "seg"), _load(case.folder, "t1")
        assert set(np.unique(seg)) <= {0, 1, 2, 4}
        assert (seg == 2).any() and (seg == 1).any() or (seg == 4).any()
        assert (t1[seg > 0] > 0).all(), "tumour outside the brain"
        assert (t1[0] == 0).all() and (t1[-1] == 0).all(), "background must be zero"
        volumes.append(int((seg > 0).sum()))
        enhancing.append(bool((seg == 4).any()))
    assert max(volumes) / min(volumes) > 2
    assert 0 < sum(enhancing) < len(enhancing), "expected some cases without enhancement"


def test_modality_contrasts(cohort: Path):
    case = next(c.folder for c in find_cases(cohort) if (_load(c.folder, "seg") == 4).any())
    seg = _load(case, "seg")
    t1, t1ce, t2, flair = (_load(case, m) for m in ("t1", "t1ce", "t2", "flair"))
    brain = (t1 > 0) & (seg == 0)
    assert flair[seg == 2].mean() > 1.5 * flair[brain].mean()  # oedema bright in FLAIR
    assert t2[seg == 2].mean() > 1.25 * t2[brain].mean()
    et = seg == 4
    assert t1ce[et].mean() / t1ce[brain].mean() > 1.5 * t1[et].mean() / t1[brain].mean()  # contrast uptake
    dark_flair = flair[brain] < np.percentile(flair[brain], 10)  # CSF: dark in FLAIR, bright in T2
    assert t2[brain][dark_flair].mean() > t2[brain].mean()


def test_same_seed_same_cohort_other_seed_other(tmp_path: Path):
    a, b, c = (tmp_path / n for n in "abc")
    for root, seed in ((a, 1), (b, 1), (c, 2)):
        generate_cohort(root, cases=2, sites=2, seed=seed, shape=SHAPE)
    case = "BraTS20_Training_002"
    for kind in ("t1ce", "seg"):
        assert np.array_equal(_load(a / case, kind), _load(b / case, kind))
    assert not np.array_equal(_load(a / case, "flair"), _load(c / case, "flair"))
    for kind in ("t1", "t1ce", "t2", "flair"):
        assert np.allclose(nib.load(str(a / case / f"{case}_{kind}.nii.gz")).affine, np.diag([-1.0, -1, 1, 1]))


def test_scanner_profiles_differ(tmp_path: Path):
    """The same anatomy seen by the clean and the strong-Gibbs / spike scanners differs measurably."""
    energies = []
    for sites in (1, 3, 4):  # case 3 of 3 sites -> profile 3 (gibbs_strong); of 4 sites -> profile 4 (spike)
        root = tmp_path / str(sites)
        generate_cohort(root, cases=sites, sites=sites, seed=5, shape=(64, 64, 48))
        energies.append(_high_frequency_energy(_load(root / f"BraTS20_Training_{sites:03d}", "t1")))
    clean_case = tmp_path / "1" / "BraTS20_Training_001"
    assert _load(clean_case, "t1").max() > 0
    assert energies[2] > 1.2 * energies[1] or energies[1] > 1.2 * energies[2]


def test_never_overwrites(cohort: Path):
    with pytest.raises(FileExistsError, match="BraTS20_Training_001"):
        generate_cohort(cohort, cases=1, sites=1, seed=0, shape=SHAPE)
