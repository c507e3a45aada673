"""Read a site's datalist and turn its relative entries into checked, absolute file paths.

A datalist (written by ``brats-fl partition``) names files relative to a data root that only the site
knows, so the same datalist and the same job work on any machine. Each entry records the BraTS release of its case
(``brats_fl.data.layout.RELEASES``), which fixes its label convention; an entry that records none (datalists from
before releases were told apart) takes the release its label file's name gives.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from brats_fl.data.checks import DataError, Problem, require_valid
from brats_fl.data.labels import REGIONS, annotation_mask
from brats_fl.data.layout import MODALITIES, SEG, Case, match_file, release

SPLITS = ("training", "validation", "test")


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

    def cases(self) -> list[Case]:
        """Every case of every split, for the data checks."""
        out = []
        for split in SPLITS:
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


def _inside(root: Path, rel: str, datalist: Path) -> Path:
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise DataError([Problem(datalist, f"entry {rel!r} points outside the data root {root}")])
    return path


def _annotated(entry: dict, datalist: Path) -> list[str]:
    """The regions an entry's label file annotates; all of them unless the datalist says otherwise."""
    regions = entry.get("annotated", list(REGIONS))
    try:
        annotation_mask(regions)
    except ValueError as err:
        raise DataError([Problem(datalist, f"case {entry.get('case_id')!r}: {err}")]) from err
    return [r for r in REGIONS if r in regions]


def _release(entry: dict, label: Path, datalist: Path) -> str:
    name = entry.get("release")
    if name is None:
        found = match_file(label)
        return found[0].name if found else "other"
    try:
        return release(name).name
    except ValueError as err:
        raise DataError([Problem(datalist, f"case {entry.get('case_id')!r}: {err}")]) from err


def load_datalist(path: Path, root: Path, check: bool = True, grid_required: bool = True) -> Datalist:
    """Load ``path`` with entries relative to ``root``; with ``check`` run the data checks and raise on problems
    (``grid_required``: a case off the BraTS grid is one, unless the caller resamples)."""
    path, root = Path(path), Path(root).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: datalist does not exist")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data root does not exist")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError([Problem(path, f"not valid JSON: {err}")]) from err
    missing = [s for s in SPLITS if s not in doc]
    if missing:
        raise DataError([Problem(path, f"missing split(s) {missing}; expected {list(SPLITS)}")])
    splits = {
        s: [
            {
                "case_id": e["case_id"],
                "image": [_inside(root, rel, path) for rel in e["image"]],
                "label": _inside(root, e["label"], path),
                "annotated": _annotated(e, path),
                "release": _release(e, root / e["label"], path),
            }
            for e in doc[s]
        ]
        for s in SPLITS
    }
    meta = {k: v for k, v in doc.items() if k not in SPLITS}
    datalist = Datalist(site=doc.get("site", path.stem), root=root, path=path, splits=splits, meta=meta)
    if not splits["training"]:
        raise DataError([Problem(path, "no training case")])
    if check:
        require_valid(datalist.cases(), grid_required=grid_required)
    return datalist
