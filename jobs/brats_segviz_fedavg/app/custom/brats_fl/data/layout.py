"""Find BraTS cases on disk by their files, whatever the case numbering or release.

A case is a folder holding files named ``<anything>_<modality>.nii.gz`` (or ``.nii``) for the modalities
below; BraTS 2020 (``BraTS20_Training_001``) and BraTS 2021 (``BraTS2021_00000``) both fit.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

#: Input channel order of every image tensor in this package.
MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
SEG = "seg"
_KINDS = (*MODALITIES, SEG)
_SUFFIXES = (".nii.gz", ".nii")


@dataclass
class Case:
    """One subject: its folder, the file found for each kind (None when missing) and metadata."""

    case_id: str
    folder: Path
    files: dict[str, Path | None]
    duplicates: dict[str, list[Path]] = field(default_factory=dict)
    attributes: dict[str, str] = field(default_factory=dict)
    #: Paths named by a datalist, so that a missing file is reported under the name the datalist used.
    expected: dict[str, Path] = field(default_factory=dict)

    def expected_path(self, kind: str) -> Path:
        """Where the file of this kind should be, for error messages about missing files."""
        return self.expected.get(kind, self.folder / f"{self.case_id}_{kind}.nii.gz")


def _kind_of(path: Path) -> str | None:
    name = path.name
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            stem = name[: -len(suffix)]
            kind = stem.rsplit("_", 1)[-1].lower()
            return kind if kind in _KINDS and "_" in stem else None
    return None


def read_case(folder: Path) -> Case:
    """Collect the files of one case folder; missing kinds map to None."""
    found: dict[str, list[Path]] = {k: [] for k in _KINDS}
    for path in sorted(folder.iterdir()):
        kind = _kind_of(path)
        if kind is not None and path.is_file():
            found[kind].append(path)
    files = {k: (v[0] if v else None) for k, v in found.items()}
    duplicates = {k: v for k, v in found.items() if len(v) > 1}
    return Case(case_id=folder.name, folder=folder, files=files, duplicates=duplicates)


def find_cases(root: Path) -> list[Case]:
    """Every case folder below ``root`` (recursively), sorted by case id, with name_mapping.csv metadata.

    Raises FileNotFoundError naming the path when ``root`` does not exist or holds no case.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data folder does not exist")
    folders = sorted({p.parent for p in root.rglob("*.nii*") if _kind_of(p) is not None})
    if not folders:
        raise FileNotFoundError(f"{root}: no BraTS case found (expected <case>/<case>_{{t1,t1ce,t2,flair,seg}}.nii.gz)")
    cases = [read_case(f) for f in folders]
    mapping = read_name_mapping(root)
    for case in cases:
        case.attributes = mapping.get(case.case_id, {})
    return sorted(cases, key=lambda c: c.case_id)


def read_name_mapping(root: Path) -> dict[str, dict[str, str]]:
    """Read the optional ``name_mapping.csv`` of a BraTS release: subject id -> its row.

    The subject id column is the one whose header names the release's own ids
    (``BraTS_2020_subject_ID``, ``BraTS_2021_subject_ID``, ...); other columns are kept as metadata.
    """
    path = Path(root) / "name_mapping.csv"
    if not path.is_file():
        return {}
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return {}
    id_columns = [c for c in rows[0] if c.startswith("BraTS_") and c.endswith("subject_ID")]
    if not id_columns:
        raise ValueError(f"{path}: no BraTS_<year>_subject_ID column in {list(rows[0])}")
    return {row[id_columns[0]]: {k: v for k, v in row.items() if k is not None} for row in rows}
