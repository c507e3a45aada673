"""Read a site's datalist and turn its relative entries into checked, absolute file paths.

A datalist (written by ``brats-fl partition``) names files relative to a data root that only the site
knows, so the same datalist and the same job work on any machine. Each entry records the BraTS release of its case
(``brats_fl.data.layout.RELEASES``), which fixes its label convention; an entry that records none (datalists from
before releases were told apart) takes the release its label file's name gives.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from brats_fl.data.checks import DataError, Problem, require_valid
from brats_fl.data.jsonfile import kind, read_json, shown
from brats_fl.data.labels import REGIONS, annotation_mask
from brats_fl.data.layout import MODALITIES, SEG, Case, match_file, release

SPLITS = ("training", "validation", "test")
#: what every case of a datalist names; ``annotated`` and ``release`` are optional
_ENTRY_KEYS = ("case_id", "image", "label")


@dataclass
class Datalist:
    site: str
    root: Path
    path: Path
    splits: dict[str, list[dict]]
    meta: dict

    def items(self, split: str) -> list[dict]:
        """MONAI-style items ``{"image": [4 paths], "label": path, "case_id": id, "annotated": [regions],
        "release": name}`` with absolute paths."""
        return self.splits[split]

    def annotated(self) -> list[str]:
        """The regions this site annotates (in any of its training cases), REGIONS order."""
        found = {r for item in self.splits["training"] for r in item["annotated"]}
        return [r for r in REGIONS if r in found]

    def cases(self, splits: Sequence[str] = SPLITS) -> list[Case]:
        """Every case of ``splits`` (default all), for the data checks."""
        out = []
        for split in splits:
            for item in self.splits[split]:
                files = dict(zip(MODALITIES, item["image"], strict=True)) | {SEG: item["label"]}
                out.append(
                    Case(
                        case_id=item["case_id"],
                        folder=Path(item["label"]).parent,
                        files={k: (p if p.is_file() else None) for k, p in files.items()},
                        expected=files,
                        release=item["release"],
                    )
                )
        return out


def _inside(root: Path, rel: object) -> Path:
    """The absolute path of a datalist entry, which must lie inside ``root`` once ``..`` and symbolic links are
    followed: a datalist names files of the site's data, nothing else on the machine."""
    if not isinstance(rel, str) or not rel:
        raise ValueError(f"path {shown(rel)} is not a non-empty string")
    if "\0" in rel:
        raise ValueError(f"path {shown(rel)} holds a NUL character")
    try:
        path = (root / rel).resolve()
        path.is_file()  # a name too long for the file system fails here, not later in the checks
    except (OSError, RuntimeError) as err:  # RuntimeError: a loop of symbolic links (Python 3.11)
        raise ValueError(f"path {shown(rel)} cannot be resolved: {err}") from err
    if not path.is_relative_to(root):
        how = " through a symbolic link" if Path(os.path.normpath(root / rel)).is_relative_to(root) else ""
        raise ValueError(f"entry {shown(rel)} resolves{how} to {path}, outside the data root {root}")
    return path


def _annotated(entry: dict) -> list[str]:
    """The regions an entry's label file annotates; all of them unless the datalist says otherwise."""
    regions = entry.get("annotated", list(REGIONS))
    if not isinstance(regions, list) or not all(isinstance(r, str) for r in regions):
        raise ValueError(f"annotated must be a list of region names from {list(REGIONS)}, got {shown(regions)}")
    annotation_mask(regions)
    return [r for r in REGIONS if r in regions]


def _release(entry: dict, label: Path) -> str:
    name = entry.get("release")
    if name is None:
        found = match_file(label)
        return found[0].name if found else "other"
    if not isinstance(name, str):
        raise ValueError(f"release must be a string, got {kind(name)}")
    return release(name).name


def _entry(entry: object, root: Path) -> dict:
    """One case of a split, its paths absolute and checked; raises ValueError saying what is wrong."""
    if not isinstance(entry, dict):
        raise ValueError(f"expected a case (an object with {list(_ENTRY_KEYS)}), got {kind(entry)}")
    missing = [k for k in _ENTRY_KEYS if k not in entry]
    if missing:
        raise ValueError(f"missing key(s) {missing}")
    case_id, image = entry["case_id"], entry["image"]
    if not isinstance(case_id, str) or not case_id:
        raise ValueError(f"case_id must be a non-empty string, got {shown(case_id)}")
    if not isinstance(image, list) or len(image) != len(MODALITIES):
        names = ", ".join(MODALITIES)
        raise ValueError(f"image must be a list of {len(MODALITIES)} paths ({names}), got {shown(image)}")
    return {
        "case_id": case_id,
        "image": [_inside(root, rel) for rel in image],
        "label": _inside(root, entry["label"]),
        "annotated": _annotated(entry),
        "release": _release(entry, root / entry["label"]),
    }


def _split(value: object, split: str, root: Path, path: Path, problems: list[Problem]) -> list[dict]:
    """The cases of one split; each bad one is a problem (naming the split, its index and its case) in ``problems``."""
    if not isinstance(value, list):
        problems.append(Problem(path, f"{split}: expected a list of cases, got {kind(value)}"))
        return []
    cases = []
    for i, entry in enumerate(value):
        try:
            cases.append(_entry(entry, root))
        except ValueError as err:
            case = f" (case {shown(entry['case_id'])})" if isinstance(entry, dict) and "case_id" in entry else ""
            problems.append(Problem(path, f"{split}[{i}]{case}: {err}"))
    return cases


def load_datalist(
    path: Path,
    root: Path,
    check: bool = True,
    grid_required: bool = True,
    checked: Sequence[str] = SPLITS,
    passed: Path | None = None,
) -> Datalist:
    """Load ``path`` with entries relative to ``root``; with ``check`` run the data checks on the cases of the
    ``checked`` splits (a site that is tuned never opens its test files) and raise on problems
    (``grid_required``: a case off the BraTS grid is one, unless the caller resamples; ``passed``: where stamps of
    cases that passed are kept, ``brats_fl.data.checks.require_valid``). A datalist of the wrong shape (types,
    missing keys, paths outside ``root``) raises DataError naming it and every bad entry."""
    path, root = Path(path), Path(root).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: datalist does not exist")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data root does not exist")
    try:
        doc = read_json(path)
    except ValueError as err:
        raise DataError([Problem(path, str(err))]) from err
    if not isinstance(doc, dict):
        raise DataError([Problem(path, f"expected an object with {list(SPLITS)}, got {kind(doc)}")])
    missing = [s for s in SPLITS if s not in doc]
    if missing:
        raise DataError([Problem(path, f"missing split(s) {missing}; expected {list(SPLITS)}")])
    problems: list[Problem] = []
    splits = {s: _split(doc[s], s, root, path, problems) for s in SPLITS}
    site = doc.get("site", path.stem)
    if not isinstance(site, str):
        problems.append(Problem(path, f"site must be a string, got {kind(site)}"))
    if problems:
        raise DataError(problems)
    meta = {k: v for k, v in doc.items() if k not in SPLITS}
    datalist = Datalist(site=site, root=root, path=path, splits=splits, meta=meta)
    if not splits["training"]:
        raise DataError([Problem(path, "no training case")])
    if check:
        require_valid(datalist.cases(checked), grid_required=grid_required, passed=passed)
    return datalist
