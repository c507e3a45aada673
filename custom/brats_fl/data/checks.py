"""Check every case before training, so a bad file stops a run with a report instead of a crash mid-way.

Each problem names the file and what is wrong with it. Nothing is skipped: callers refuse to train when
the report is not empty. Besides readable, consistent files and labels of the case's own release, a case must lie
on the BraTS grid (``BRATS_GRID``: 1 mm isotropic voxels in LPS orientation, as every release ships them), unless
the caller resamples (``grid=False``, a job's ``spacing``): raw hospital data must never train on another grid
unnoticed. Each file's header is checked before any voxel is read (``read_header``), so a broken or hostile header
is a problem in the report, never a crash or an exhausted memory.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from brats_fl.data.labels import convention
from brats_fl.data.layout import MODALITIES, SEG, Case, release
from brats_fl.version import PACKAGE_DIR, code_sha256

#: the folder of a cache where stamps of the cases that passed are kept (``require_valid``)
CHECKED = "checked"
#: the code a case's check depends on, whose hash is part of its stamp (``case_stamp``)
_CODE = code_sha256(PACKAGE_DIR / "data")
#: voxel size (mm) and orientation (nibabel's axis codes) of every BraTS release's files
BRATS_GRID = ((1.0, 1.0, 1.0), ("L", "P", "S"))


@dataclass(frozen=True)
class Problem:
    path: Path
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class DataError(RuntimeError):
    """Raised when data fails the checks; the message is the full report, one problem per line."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = "\n".join(str(p) for p in problems)
        super().__init__(f"{len(problems)} data problem(s) found; nothing was trained:\n{lines}")


#: the most voxels one image may hold: 512³ (134 M, 1 GiB as float64), 15 times a BraTS volume (240x240x155). A header
#: that claims more is refused before any voxel is read, so a broken or hostile header cannot exhaust memory.
MAX_VOXELS = 512**3
#: voxel sizes (mm) an MRI can have; outside them the header is broken
VOXEL_MM = (0.01, 20.0)
#: the widest field of view (mm) along an axis, twice a head's: resampling a wider one to a job's spacing could
#: exhaust memory where the file itself is small
MAX_FIELD_MM = 512.0
#: deflate's largest compression ratio (zlib's technical details: 1032:1): a gzip file can hold no more
_DEFLATE_RATIO = 1032
#: what reading a NIfTI file raises on a broken file (nibabel, gzip, numpy); anything else is a bug of ours
_READ_ERRORS = (
    OSError, EOFError, zlib.error, ValueError, TypeError, OverflowError, struct.error,
    nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError, nib.wrapstruct.WrapStructError,
)  # fmt: skip


class VolumeError(ValueError):
    """A NIfTI file that cannot be used: the message says what is wrong, its caller names the file."""


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024:
            return f"{nbytes:.3g} {unit}"
        nbytes /= 1024
    return f"{nbytes:.3g} TiB"


def read_header(path: Path) -> nib.Nifti1Image:
    """The image with its header checked and no voxel read: a real numeric datatype, a 3D shape of at most
    ``MAX_VOXELS``, sensible voxel sizes and field of view, an invertible affine, finite scaling, and a file large
    enough for the voxels its header claims. Raises VolumeError saying what is wrong.

    Written by hand because nibabel reads whatever a header claims (a 4000³ header makes it allocate 256 GB) and
    accepts complex voxels; MONAI's readers call nibabel."""
    try:
        img = nib.load(str(path))
        # the file's own header: the image's copy has its scaling and offset reset, and nibabel quietly reads a
        # negative or zero voxel size as a positive one and an infinite slope as none
        with nib.openers.ImageOpener(str(path)) as fh:
            raw = type(img.header).from_fileobj(fh, check=False)
        pixdim = raw["pixdim"][1:4].astype(float)
        slope, inter = float(raw["scl_slope"]), float(raw["scl_inter"])
        dtype = img.header.get_data_dtype()
        shape = tuple(int(v) for v in img.header.get_data_shape())
        affine = np.asarray(img.affine, dtype=float)
        offset = int(img.dataobj.offset)
    except _READ_ERRORS as err:
        raise VolumeError(f"cannot read NIfTI header (corrupt or truncated file): {type(err).__name__}: {err}") from err
    if dtype.kind not in "iuf" or dtype.itemsize > 8:
        raise VolumeError(f"voxel datatype {dtype} is not a real number type (integers or float32/float64)")
    if len(shape) != 3:
        raise VolumeError(f"expected a 3D volume, got shape {shape}")
    voxels = int(np.prod(shape, dtype=object))
    if min(shape) < 1 or voxels > MAX_VOXELS:
        raise VolumeError(f"shape {shape}: {voxels:,} voxels, outside 1 to {MAX_VOXELS:,} (512³)")
    # NaN or 0 slope: no scaling (NIfTI's rule; nibabel writes NaN); nibabel refuses a slope without a finite intercept
    if np.isinf(slope) or np.isinf(inter):
        raise VolumeError(f"intensity scaling scl_slope={slope:g}, scl_inter={inter:g} is not finite")
    if not (np.isfinite(pixdim) & (pixdim > 0)).all():
        raise VolumeError(f"voxel sizes pixdim[1:4] {pixdim.tolist()} are not positive numbers")
    if not np.isfinite(affine).all():
        raise VolumeError("affine holds NaN or Inf")
    if abs(np.linalg.det(affine[:3, :3])) < VOXEL_MM[0] ** 3:
        raise VolumeError(f"affine is not invertible (its voxel axes are degenerate): {affine[:3].tolist()}")
    sizes = nib.affines.voxel_sizes(affine)
    if not ((sizes >= VOXEL_MM[0]) & (sizes <= VOXEL_MM[1])).all():
        shown = "x".join(f"{v:g}" for v in sizes)
        raise VolumeError(f"voxel size {shown} mm outside {VOXEL_MM[0]:g} to {VOXEL_MM[1]:g} mm")
    field = np.asarray(shape) * sizes
    if (field > MAX_FIELD_MM).any():
        shown = "x".join(f"{v:.0f}" for v in field)
        raise VolumeError(f"field of view {shown} mm, wider than {MAX_FIELD_MM:.0f} mm along an axis")
    needed = offset + voxels * dtype.itemsize
    stored = Path(path).stat().st_size
    if offset < 0 or (stored * _DEFLATE_RATIO if str(path).endswith(".gz") else stored) < needed:
        what = f"{'x'.join(map(str, shape))} voxels of {dtype} ({_size(voxels * dtype.itemsize)}) after {offset} bytes"
        raise VolumeError(f"truncated or wrong header: it claims {what}, more than the {_size(stored)} file holds")
    return img


def read_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Voxels (scaled, as every reader scales them) and affine of a NIfTI file whose header passes ``read_header``;
    the voxels must be finite and within float32's range, in which training computes. Raises VolumeError."""
    img = read_header(path)
    try:
        data = np.asarray(img.dataobj)  # a truncated gzip only shows when the data are decompressed
    except _READ_ERRORS as err:
        raise VolumeError(f"cannot read NIfTI (corrupt or truncated file): {type(err).__name__}: {err}") from err
    finite = np.isfinite(data)
    if not finite.all():
        raise VolumeError(f"{int((~finite).sum())} non-finite voxels (NaN or Inf)")
    largest = float(np.abs(data).max())
    if largest > float(np.finfo(np.float32).max):
        raise VolumeError(f"voxel values up to {largest:.3g}, beyond float32, in which training computes")
    return data, img.affine


def grid(affine: np.ndarray) -> tuple[tuple[float, float, float], tuple[str, str, str]]:
    """Voxel size (mm) and orientation of an image's affine."""
    return tuple(float(v) for v in nib.affines.voxel_sizes(affine)), tuple(nib.aff2axcodes(affine))


def describe_grid(case: Case) -> str:
    """A case's shape, voxel size and orientation from its first image's header, for ``check-data``."""
    path = next((case.files[m] for m in MODALITIES if case.files.get(m)), None)
    if path is None:
        return "no image"
    try:
        img = read_header(path)
    except VolumeError:
        return "header refused (see the problems below)"
    size, axes = grid(img.affine)
    return f"{'x'.join(map(str, img.shape))} voxels of {'x'.join(f'{v:.2f}' for v in size)} mm, {''.join(axes)}"


def _label_problem(case: Case, path: Path, data: np.ndarray) -> Problem | None:
    allowed = convention(case.convention)
    unknown = sorted(float(v) for v in np.unique(data) if float(v) not in allowed.labels)
    if not unknown:
        return None
    shown = ", ".join(f"{v:g}" for v in unknown[:10])
    text = f"unknown label values {{{shown}}}; {release(case.release).description} labels are {allowed.describe()}"
    if case.convention == "brats2023" and unknown == [4.0]:
        text += "; if these are BraTS 2024 post-treatment glioma cases (4 = resection cavity), declare that release"
    return Problem(path, text)


def check_case(case: Case, with_label: bool = True, grid_required: bool = True) -> list[Problem]:
    """All problems of one case: missing or duplicate files, unreadable files, geometry, values, labels; and, with
    ``grid_required``, a grid other than the BraTS grid."""
    problems: list[Problem] = []
    for kind, paths in case.duplicates.items():
        problems.append(Problem(paths[1], f"second {kind} file in the case folder (also {paths[0].name})"))
    reference: tuple[str, Path, tuple[int, ...], np.ndarray] | None = None
    brain_voxels = 0
    for kind in (*MODALITIES, SEG) if with_label else MODALITIES:
        path = case.files.get(kind)
        if path is None:
            problems.append(Problem(case.expected_path(kind), f"missing {kind} file"))
            continue
        try:
            data, affine = read_volume(path)
        except VolumeError as err:
            problems.append(Problem(path, str(err)))
            continue
        if reference is None:
            reference = (kind, path, data.shape, affine)
            size, axes = grid(affine)
            if grid_required and not (np.allclose(size, BRATS_GRID[0], atol=1e-3) and axes == BRATS_GRID[1]):
                problems.append(
                    Problem(
                        path,
                        f"voxel size {'x'.join(f'{v:.2f}' for v in size)} mm, orientation {''.join(axes)}: not the "
                        "BraTS grid (1 mm isotropic, LPS); resample to train on it (a job's spacing option)",
                    )
                )
        elif data.shape != reference[2]:
            problems.append(Problem(path, f"shape {data.shape} differs from {reference[0]} {reference[2]}"))
            continue
        elif not np.allclose(affine, reference[3], atol=1e-3):
            problems.append(Problem(path, f"affine differs from {reference[0]} ({reference[1].name})"))
        if kind == SEG:
            problem = _label_problem(case, path, data)
            if problem:
                problems.append(problem)
        else:
            brain_voxels = max(brain_voxels, int(np.count_nonzero(data)))
    if reference is not None and brain_voxels == 0 and any(case.files.get(m) for m in MODALITIES):
        first = next(case.files[m] for m in MODALITIES if case.files.get(m))
        problems.append(Problem(first, "empty brain: every modality is zero everywhere"))
    return problems


def check_cases(cases: Iterable[Case], with_label: bool = True, grid_required: bool = True) -> list[Problem]:
    """Problems of all cases, in case order."""
    return [p for case in cases for p in check_case(case, with_label, grid_required)]


def require_valid(
    cases: Iterable[Case], with_label: bool = True, grid_required: bool = True, passed: Path | None = None
) -> None:
    """Raise DataError with the full report when any case has a problem.

    ``passed``: a folder where a stamp of each case that passed is kept (a site's cache folder), so that the next run
    on the same cohort reads no voxel of it again: checking decodes every file in full, which was a site's largest
    start-up cost on a cohort of BraTS-sized cases. A stamp holds every file's path, size and modification time and
    the code of the checks (``case_stamp``), so a changed file or changed checks check it again."""
    problems = [p for case in cases for p in _checked(case, with_label, grid_required, passed)]
    if problems:
        raise DataError(problems)


def check_cases_once(
    cases: Iterable[Case], with_label: bool = True, grid_required: bool = True, passed: Path | None = None
) -> list[Problem]:
    """``check_cases``, skipping the cases with a stamp in ``passed`` and stamping those that pass now."""
    return [p for case in cases for p in _checked(case, with_label, grid_required, passed)]


def _checked(case: Case, with_label: bool, grid_required: bool, passed: Path | None) -> list[Problem]:
    """The case's problems; none where a stamp says it passed a check at least as strict (one that required the BraTS
    grid passes one that does not). A case that passes now is stamped."""
    if passed is None:
        return check_case(case, with_label, grid_required)
    stamp = Path(passed) / case_stamp(case, with_label)
    strict, lenient = stamp.with_suffix(".grid"), stamp.with_suffix(".any")
    if strict.is_file() or (not grid_required and lenient.is_file()):
        return []
    found = check_case(case, with_label, grid_required)
    if not found:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        (strict if grid_required else lenient).touch()
    return found


def case_stamp(case: Case, with_label: bool) -> str:
    """A SHA-256 of what a check of ``case`` depends on besides the grid rule: its files (path, size, modification
    time), whether labels are checked, and the code of the data package. A missing or unreadable file gives a stamp
    no passed check wrote, so the case is checked and its problem reported."""
    digest = hashlib.sha256(json.dumps([with_label, _CODE]).encode())
    for kind, path in sorted((k, str(p)) for k, p in case.files.items() if p is not None):
        try:
            info = Path(path).stat()
        except OSError:
            return "unreadable-" + digest.hexdigest()
        digest.update(json.dumps([kind, path, info.st_size, info.st_mtime_ns]).encode())
    digest.update(json.dumps(sorted(str(p) for paths in case.duplicates.values() for p in paths)).encode())
    return digest.hexdigest()
