"""check-data on crafted bad cases: each problem is caught and names the file."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from brats_fl.cli.main import main
from brats_fl.data.checks import check_cases
from brats_fl.data.layout import find_cases

CASE = "BraTS20_Training_003"


def _problems(root: Path) -> list[str]:
    return [str(p) for p in check_cases(find_cases(root))]


def _file(root: Path, kind: str) -> Path:
    return root / CASE / f"{CASE}_{kind}.nii.gz"


def _rewrite(path: Path, fn) -> None:
    img = nib.load(str(path))
    data = fn(np.asarray(img.dataobj).copy())
    nib.save(nib.Nifti1Image(data, img.affine), str(path))


def test_good_cohort_has_no_problem(good_cohort: Path):
    assert _problems(good_cohort) == []


def test_truncated_gzip(good_cohort: Path):
    path = _file(good_cohort, "t2")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    [problem] = _problems(good_cohort)
    assert problem.startswith(str(path)) and "truncated" in problem


def test_not_a_nifti(good_cohort: Path):
    path = _file(good_cohort, "t1")
    path.write_bytes(gzip.compress(b"hello, not an image"))
    [problem] = _problems(good_cohort)
    assert problem.startswith(str(path)) and "cannot read" in problem


def test_missing_modality(good_cohort: Path):
    path = _file(good_cohort, "t1ce")
    path.unlink()
    [problem] = _problems(good_cohort)
    assert problem == f"{path}: missing t1ce file"


def test_shape_mismatch(good_cohort: Path):
    path = _file(good_cohort, "flair")
    _rewrite(path, lambda a: a[:-1])
    [problem] = _problems(good_cohort)
    assert problem.startswith(str(path)) and "shape (23, 24, 16) differs from t1 (24, 24, 16)" in problem


def test_affine_mismatch(good_cohort: Path):
    path = _file(good_cohort, "t2")
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine @ np.diag([2.0, 1, 1, 1])), str(path))
    [problem] = _problems(good_cohort)
    assert problem.startswith(str(path)) and "affine differs" in problem


def test_unknown_label_value(good_cohort: Path):
    path = _file(good_cohort, "seg")
    _rewrite(path, lambda a: np.where(a == 4, 3, a).astype(np.uint8))
    [problem] = _problems(good_cohort)
    assert problem.startswith(str(path)) and "unknown label values {3}" in problem


def test_nan_voxels(good_cohort: Path):
    path = _file(good_cohort, "flair")

    def poison(a):
        a[5, 5, 5] = np.nan
        a[6, 6, 6] = np.inf
        return a

    _rewrite(path, poison)
    [problem] = _problems(good_cohort)
    assert problem == f"{path}: 2 non-finite voxels (NaN or Inf)"


def test_empty_brain(good_cohort: Path):
    for mod in ("t1", "t1ce", "t2", "flair"):
        _rewrite(_file(good_cohort, mod), np.zeros_like)
    [problem] = _problems(good_cohort)
    assert "empty brain" in problem


def test_wrong_path_names_the_path(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        find_cases(tmp_path / "nowhere")


def test_cli_reports_every_problem_and_fails(good_cohort: Path, capsys):
    _file(good_cohort, "t1ce").unlink()
    _rewrite(
        good_cohort / "BraTS20_Training_005" / "BraTS20_Training_005_seg.nii.gz",
        lambda a: (a + (a == 2)).astype(np.uint8),
    )
    assert main(["check-data", str(good_cohort)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == "6 case(s) named as BraTS 2020 (BraTS20_Training_001_t1ce.nii.gz); labels 1 NCR/NET, 2 ED, 4 ET"
    assert out[1] == "BraTS20_Training_001: 24x24x16 voxels of 1.00x1.00x1.00 mm, LPS"
    problems = out[7:]
    assert len(problems) == 2
    assert "BraTS20_Training_003_t1ce.nii.gz: missing t1ce file" in problems[0]
    assert "BraTS20_Training_005_seg.nii.gz: unknown label values {3}; BraTS 2020 labels are" in problems[1]
    assert main(["check-data", str(good_cohort / "missing")]) == 2


def test_case_folders_are_found_by_their_files_not_their_numbers(tmp_path: Path):
    from tests.conftest import write_case

    write_case(tmp_path / "d", "BraTS2021_01666")
    write_case(tmp_path / "d" / "nested", "BraTS2021_00000")
    assert [c.case_id for c in find_cases(tmp_path / "d")] == ["BraTS2021_00000", "BraTS2021_01666"]
