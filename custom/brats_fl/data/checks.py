"""Check every case before training, so a bad file stops a run with a report instead of a crash mid-way.

Each problem names the file and what is wrong with it. Nothing is skipped: callers refuse to train when
the report is not empty. Besides readable, consistent files and labels of the case's own release, a case must lie
on the BraTS grid (``BRATS_GRID``: 1 mm isotropic voxels in LPS orientation, as every release ships them), unless
the caller resamples (``grid=False``, a job's ``spacing``): raw hospital data must never train on another grid
unnoticed.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from brats_fl.data.labels import convention
from brats_fl.data.layout import MODALITIES, SEG, Case, release

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


def _load(path: Path) -> tuple[np.ndarray | None, np.ndarray | None, str | None]:
    """Read header and every voxel; a truncated gzip only shows when the data are decompressed."""
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except (OSError, EOFError, zlib.error, ValueError, nib.filebasedimages.ImageFileError) as err:
        return None, None, f"cannot read NIfTI (corrupt or truncated file): {type(err).__name__}: {err}"
    return data, img.affine, None


def grid(affine: np.ndarray) -> tuple[tuple[float, float, float], tuple[str, str, str]]:
    """Voxel size (mm) and orientation of an image's affine."""
    return tuple(float(v) for v in nib.affines.voxel_sizes(affine)), tuple(nib.aff2axcodes(affine))


def describe_grid(case: Case) -> str:
    """A case's shape, voxel size and orientation from its first image's header, for ``check-data``."""
    path = next((case.files[m] for m in MODALITIES if case.files.get(m)), None)
    if path is None:
        return "no image"
    img = nib.load(str(path))
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
        data, affine, error = _load(path)
        if error is not None:
            problems.append(Problem(path, error))
            continue
        if data.ndim != 3:
            problems.append(Problem(path, f"expected a 3D volume, got shape {data.shape}"))
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
        finite = np.isfinite(data)
        if not finite.all():
            problems.append(Problem(path, f"{int((~finite).sum())} non-finite voxels (NaN or Inf)"))
            continue
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


def require_valid(cases: Iterable[Case], with_label: bool = True, grid_required: bool = True) -> None:
    """Raise DataError with the full report when any case has a problem."""
    problems = check_cases(cases, with_label, grid_required)
    if problems:
        raise DataError(problems)
