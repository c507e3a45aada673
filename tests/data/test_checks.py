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

from tests.conftest import rewrite_nifti

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


def test_header_claiming_4000_cubed_voxels_is_refused_before_reading(good_cohort: Path, capsys):
    """The issue's case: a header claiming a 4000³ volume made check-data die with a MemoryError traceback."""
    path = _file(good_cohort, "t1")
    rewrite_nifti(path, dim=[3, 4000, 4000, 4000, 1, 1, 1, 1])
    [problem] = _problems(good_cohort)
    assert problem == f"{path}: shape (4000, 4000, 4000): 64,000,000,000 voxels, outside 1 to 134,217,728 (512³)"
    assert main(["check-data", str(good_cohort)]) == 1
    assert f"{CASE}: header refused" in capsys.readouterr().out


def test_complex_voxels_are_refused(good_cohort: Path):
    """The issue's case: complex-valued voxels passed check-data."""
    path = _file(good_cohort, "flair")
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj).astype(np.complex64) * (1 + 1j), img.affine), str(path))
    [problem] = _problems(good_cohort)
    assert problem == f"{path}: voxel datatype complex64 is not a real number type (integers or float32/float64)"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"datatype": 128, "bitpix": 24}, "datatype [('R', 'u1'), ('G', 'u1'), ('B', 'u1')] is not a real number"),
        ({"dim": [4, 24, 24, 16, 2, 1, 1, 1]}, "expected a 3D volume, got shape (24, 24, 16, 2)"),
        ({"dim": [3, 240, 240, 155, 1, 1, 1, 1]}, "truncated or wrong header: it claims 240x240x155 voxels of float32"),
        ({"pixdim": [1, -1, 1, 1, 1, 1, 1, 1]}, "voxel sizes pixdim[1:4] [-1.0, 1.0, 1.0] are not positive numbers"),
        ({"pixdim": [1, 1, 0, 1, 1, 1, 1, 1]}, "pixdim[1:4] [1.0, 0.0, 1.0] are not positive numbers"),
        ({"scl_slope": np.inf, "scl_inter": 0.0}, "intensity scaling scl_slope=inf, scl_inter=0 is not finite"),
        ({"scl_slope": 1.0, "scl_inter": -np.inf}, "HeaderDataError: Valid slope but invalid intercept -inf"),
        ({"scl_slope": 1e37, "scl_inter": 0.0}, "beyond float32, in which training computes"),
        ({"srow_x": [0.0, 0.0, 0.0, 0.0]}, "affine is not invertible"),
        ({"srow_y": [0.0, np.nan, 0.0, 0.0]}, "affine holds NaN or Inf"),
        ({"srow_x": [-50.0, 0.0, 0.0, 0.0]}, "voxel size 50x1x1 mm outside 0.01 to 20 mm"),
        ({"scl_slope": 2.0, "scl_inter": np.nan}, "HeaderDataError: Valid slope but invalid intercept nan"),
        ({"vox_offset": 100000.0}, "cannot read NIfTI (corrupt or truncated file)"),
        ({"vox_offset": 10**9}, "truncated or wrong header: it claims 24x24x16 voxels of float32 (36 KiB) after"),
    ],
)
def test_broken_header_is_refused_naming_the_file(good_cohort: Path, fields: dict, message: str):
    path = _file(good_cohort, "t2")
    rewrite_nifti(path, **fields)
    [problem] = _problems(good_cohort)
    assert problem.startswith(f"{path}: ") and message in problem


def test_field_of_view_wider_than_a_body_is_refused(good_cohort: Path):
    path = _file(good_cohort, "t2")
    nib.save(nib.Nifti1Image(np.ones((40, 24, 16), np.float32), np.diag([-15.0, -1.0, 1.0, 1.0])), str(path))
    [problem] = _problems(good_cohort)
    assert problem == f"{path}: field of view 600x24x16 mm, wider than 512 mm along an axis"


def test_truncated_uncompressed_file_is_refused_before_reading(good_cohort: Path):
    gz = _file(good_cohort, "t1")
    path = gz.with_name(gz.name.removesuffix(".gz"))
    data = gzip.decompress(gz.read_bytes())
    gz.unlink()
    path.write_bytes(data[:-100])
    [problem] = _problems(good_cohort)
    assert problem.startswith(f"{path}: truncated or wrong header: it claims 24x24x16 voxels of float32 (36 KiB)")


def test_values_beyond_float32_are_refused(good_cohort: Path):
    path = _file(good_cohort, "t1")
    _rewrite(path, lambda a: a.astype(np.float64) * 1e300)
    [problem] = _problems(good_cohort)
    assert problem.startswith(f"{path}: voxel values up to ") and "beyond float32" in problem


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


def test_a_case_that_passed_is_not_read_again_until_a_file_changes(good_cohort: Path, tmp_path: Path, monkeypatch):
    """The stamps of ``require_valid(passed=...)``: a site's second run on the same cohort decodes nothing, and a
    case whose file changed is checked again and its problem reported."""
    import brats_fl.data.checks as checks

    stamps = tmp_path / "checked"
    checks.require_valid(find_cases(good_cohort), passed=stamps)
    assert len(list(stamps.glob("*.grid"))) == len(find_cases(good_cohort))

    def no_reading(path):
        raise AssertionError(f"read {path} again")

    monkeypatch.setattr(checks, "read_volume", no_reading)
    checks.require_valid(find_cases(good_cohort), passed=stamps)
    # a check on the BraTS grid covers one that accepts any grid (a job that resamples)
    checks.require_valid(find_cases(good_cohort), grid_required=False, passed=stamps)

    monkeypatch.undo()
    _rewrite(_file(good_cohort, "seg"), lambda seg: np.where(seg == 2, 7, seg).astype(seg.dtype))
    with pytest.raises(checks.DataError, match=f"{CASE}_seg.nii.gz"):
        checks.require_valid(find_cases(good_cohort), passed=stamps)
    # a case with a problem leaves no stamp: the next run reports it again
    with pytest.raises(checks.DataError, match=f"{CASE}_seg.nii.gz"):
        checks.require_valid(find_cases(good_cohort), passed=stamps)


def test_a_pass_without_the_grid_rule_does_not_stand_for_one_with_it(good_cohort: Path, tmp_path: Path, monkeypatch):
    import brats_fl.data.checks as checks

    stamps = tmp_path / "checked"
    checks.require_valid(find_cases(good_cohort), grid_required=False, passed=stamps)
    assert stamps.glob("*.any") and not list(stamps.glob("*.grid"))

    def no_reading(path):
        raise AssertionError("read again")

    monkeypatch.setattr(checks, "read_volume", no_reading)
    with pytest.raises(AssertionError, match="read again"):
        checks.require_valid(find_cases(good_cohort), grid_required=True, passed=stamps)
