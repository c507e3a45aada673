"""Find BraTS cases on disk by their files, and tell from the file names which release they come from.

A case is a folder holding one NIfTI file (``.nii.gz`` or ``.nii``) per modality and one segmentation, named as its
release names them (``RELEASES``): BraTS 2020 ``BraTS20_Training_001_t1ce``, BraTS 2021 and FeTS 2022
``BraTS2021_00000_t1ce``, BraTS 2023 and later ``BraTS-GLI-00000-000-t1c`` (and MEN, MET, PED, SSA), or any other
name in the 2020 style, ``<case>_t1ce``. The release fixes the modality names and the label convention
(``brats_fl.data.labels``). A folder whose cases come from more than one release is refused: the releases share
subjects under new names (BraTS 2021 holds the 2020 cases), so a mix can put one patient in training and test.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

#: Input channel order of every image tensor in this package, named as BraTS 2020 names the files.
MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
SEG = "seg"
_KINDS = (*MODALITIES, SEG)
_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Release:
    """A BraTS release's file names: which cases they match and what each modality is called."""

    name: str
    description: str
    #: a regular expression of the case ids
    case: str
    #: file token -> this package's modality name (``MODALITIES``) or ``SEG``
    tokens: dict[str, str]
    #: between case id and token
    separator: str
    #: label convention (``brats_fl.data.labels.CONVENTIONS``)
    convention: str
    example: str
    #: chosen only when the user names it: its files are named as another release's
    declared: bool = False
    #: the id of case number n in this release's style (``format(n)``), as the phantom names its cases; None: the
    #: release has no one style of ids, and the phantom does not write it
    case_format: str | None = None

    def match(self, stem: str) -> tuple[str, str] | None:
        """(case id, kind) of a file name without suffix, or None if this release does not name files so."""
        found = re.fullmatch(rf"({self.case}){self.separator}({'|'.join(self.tokens)})", stem, re.IGNORECASE)
        return (found.group(1), self.tokens[found.group(2).lower()]) if found else None

    def file_name(self, case_id: str, kind: str) -> str:
        token = next(t for t, k in self.tokens.items() if k == kind)
        return f"{case_id}{self.separator}{token}.nii.gz"


_NAMES_2020 = {k: k for k in _KINDS}
_NAMES_2023 = {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair", "seg": "seg"}

#: every release, in the order names are tried; the last one takes any name in the 2020 style
RELEASES: tuple[Release, ...] = (
    Release("2020", "BraTS 2020", r"BraTS20_(?:Training|Validation|Testing)_\d+", _NAMES_2020, "_", "brats2020",
            "BraTS20_Training_001_t1ce.nii.gz", case_format="BraTS20_Training_{:03d}"),
    Release("2021", "BraTS 2021 / FeTS 2022", r"BraTS2021_\d+", _NAMES_2020, "_", "brats2020",
            "BraTS2021_00000_t1ce.nii.gz", case_format="BraTS2021_{:05d}"),
    Release("2023", "BraTS 2023 and later (GLI, MEN, MET, PED, SSA)", r"BraTS-(?:GLI|MEN|MET|PED|SSA)-\d+-\d+",
            _NAMES_2023, "-", "brats2023", "BraTS-GLI-00000-000-t1c.nii.gz", case_format="BraTS-GLI-{:05d}-000"),
    Release("2024-gli-post", "BraTS 2024 post-treatment glioma (2023 names; 4 = resection cavity)",
            r"BraTS-GLI-\d+-\d+", _NAMES_2023, "-", "brats2024-post", "BraTS-GLI-02000-100-t1c.nii.gz",
            declared=True, case_format="BraTS-GLI-{:05d}-100"),
    Release("other", "other names in the BraTS 2020 style", r".+", _NAMES_2020, "_", "brats2020",
            "<case>_t1ce.nii.gz"),
)  # fmt: skip
#: the names ``--release`` takes
RELEASE_NAMES = tuple(r.name for r in RELEASES)
#: the releases the phantom writes (``brats-fl phantom --release``): those with a style of case ids
PHANTOM_RELEASES = tuple(r.name for r in RELEASES if r.case_format)


def release(name: str) -> Release:
    """The release ``name``; refuses an unknown one."""
    found = next((r for r in RELEASES if r.name == name), None)
    if found is None:
        raise ValueError(f"unknown BraTS release {name!r}; known: {', '.join(RELEASE_NAMES)}")
    return found


def match_file(path: Path, declared: str | None = None) -> tuple[Release, str, str] | None:
    """(release, case id, kind) of a NIfTI file named as a release names its files, or None.

    Undeclared, a name is given to the first release it fits, never to one that must be declared; ``declared`` tries
    only that release."""
    name = path.name
    suffix = next((s for s in _SUFFIXES if name.lower().endswith(s)), None)
    if suffix is None:
        return None
    stem = name[: -len(suffix)]
    candidates = [release(declared)] if declared else [r for r in RELEASES if not r.declared]
    for rel in candidates:
        found = rel.match(stem)
        if found:
            return rel, *found
    return None


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
    #: the release its files are named by (``RELEASES``)
    release: str = "other"

    def expected_path(self, kind: str) -> Path:
        """Where the file of this kind should be, for error messages about missing files."""
        return self.expected.get(kind, self.folder / release(self.release).file_name(self.case_id, kind))

    @property
    def convention(self) -> str:
        """The label convention of its segmentation (``brats_fl.data.labels``)."""
        return release(self.release).convention


def _mixed(found: dict[str, list[Path]], where: Path) -> ValueError:
    shown = "; ".join(f"{release(r).description}: {paths[0]}" for r, paths in sorted(found.items()))
    return ValueError(
        f"{where}: files of {len(found)} BraTS releases ({shown}); the releases share subjects under other names, so "
        "keep each release in its own folder"
    )


def read_case(folder: Path, declared: str | None = None) -> Case:
    """Collect the files of one case folder; missing kinds map to None. Refuses files of two releases."""
    found: dict[str, list[Path]] = {k: [] for k in _KINDS}
    releases: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        match = match_file(path, declared)
        if match is not None and path.is_file():
            found[match[2]].append(path)
            releases.setdefault(match[0].name, []).append(path)
    if len(releases) > 1:
        raise _mixed(releases, folder)
    files = {k: (v[0] if v else None) for k, v in found.items()}
    duplicates = {k: v for k, v in found.items() if len(v) > 1}
    name = next(iter(releases), declared or "other")
    return Case(case_id=folder.name, folder=folder, files=files, duplicates=duplicates, release=name)


def find_cases(root: Path, declared: str | None = None) -> list[Case]:
    """Every case folder below ``root`` (recursively), sorted by case id, with name_mapping.csv metadata.

    The release comes from the file names, or is ``declared`` (the 2024 post-treatment glioma data, named as 2023's).
    Raises FileNotFoundError naming the path when ``root`` does not exist or holds no case, ValueError naming files
    of each release when the folder mixes releases.
    """
    root = Path(root)
    if declared is not None:
        release(declared)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data folder does not exist")
    matches = {p: m for p in root.rglob("*.nii*") if (m := match_file(p, declared)) is not None}
    if not matches:
        names = "; ".join(f"{r.description}: {r.example}" for r in RELEASES if not r.declared)
        raise FileNotFoundError(f"{root}: no BraTS case found; expected <case>/<file> named as in {names}")
    by_release: dict[str, list[Path]] = {}
    for path, (rel, _, _) in sorted(matches.items()):
        by_release.setdefault(rel.name, []).append(path)
    if len(by_release) > 1:
        raise _mixed(by_release, root)
    cases = [read_case(f, declared) for f in sorted({p.parent for p in matches})]
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
