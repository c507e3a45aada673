"""Split a cohort into sites, and each site into train / validation / test, with no case in two places.

Schemes follow the FL literature: equal (IID), unequal (quantity skew), dirichlet (label / attribute skew,
Hsu et al. 2019), hybrid (Dirichlet skew where every site keeps every stratum, as in the pneumonia FL
study), natural (one site per value of an attribute such as the scanner) and csv (a FeTS-style
``Partition_ID,Subject_ID`` file).
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from brats_fl.data.labels import REGIONS, annotation_mask
from brats_fl.data.layout import MODALITIES, SEG, Case

SCHEMES = ("equal", "unequal", "dirichlet", "hybrid", "natural", "csv")
#: The name of the pooled datalist used by the centralized baseline.
POOLED_SITE = "site-All"
_MAX_DRAWS = 1000


def site_names(n: int) -> list[str]:
    return [f"site-{i}" for i in range(1, n + 1)]


def case_strata(cases: Sequence[Case], attribute: str) -> list[str]:
    """The value of ``attribute`` for every case.

    ``size`` is computed: the tumour-volume tertile (small / medium / large) of the case's segmentation.
    Any other name is a column of name_mapping.csv (``Grade`` in BraTS, ``scanner`` in the phantom).
    """
    if attribute == "size":
        volumes = np.array([np.count_nonzero(np.asarray(nib.load(str(c.files[SEG])).dataobj)) for c in cases])
        edges = np.quantile(volumes, [1 / 3, 2 / 3])
        return [("small", "medium", "large")[int(np.searchsorted(edges, v, side="right"))] for v in volumes]
    missing = [c.case_id for c in cases if attribute not in c.attributes]
    if missing:
        known = sorted({k for c in cases for k in c.attributes})
        raise ValueError(
            f"attribute {attribute!r} is unknown for {len(missing)} case(s) (e.g. {missing[0]}); "
            f"name_mapping.csv columns: {known or 'none (no name_mapping.csv)'}; 'size' is always available"
        )
    return [c.attributes[attribute] for c in cases]


def _split_by_fractions(items: list, fractions: Sequence[float]) -> list[list]:
    bounds = np.round(np.cumsum(fractions) / np.sum(fractions) * len(items)).astype(int)
    starts = np.concatenate([[0], bounds[:-1]])
    return [items[s:e] for s, e in zip(starts, bounds, strict=True)]


def _dirichlet(
    strata: dict[str, list[Case]], sites: int, alpha: float, rng: np.random.Generator, min_cases: int
) -> list[list[Case]]:
    for _ in range(_MAX_DRAWS):
        parts: list[list[Case]] = [[] for _ in range(sites)]
        for members in strata.values():
            for k, chunk in enumerate(_split_by_fractions(members, rng.dirichlet([alpha] * sites))):
                parts[k].extend(chunk)
        if min(len(p) for p in parts) >= min_cases:
            return parts
    raise ValueError(
        f"no Dirichlet draw with alpha={alpha} gave every one of {sites} sites at least {min_cases} cases "
        f"in {_MAX_DRAWS} tries: raise alpha, lower the number of sites or add cases"
    )


def assign_sites(
    cases: Sequence[Case],
    sites: int,
    scheme: str,
    seed: int = 0,
    fractions: Sequence[float] | None = None,
    alpha: float = 0.5,
    attribute: str = "scanner",
    csv_path: Path | None = None,
    min_cases: int = 3,
) -> dict[str, list[Case]]:
    """Assign every case to exactly one site: ``{"site-1": [...], ...}``."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if sites < 1:
        raise ValueError(f"sites must be at least 1, got {sites}")
    rng = np.random.default_rng(seed)
    shuffled = [cases[i] for i in rng.permutation(len(cases))]
    names = site_names(sites)
    if scheme == "csv":
        return _from_csv(cases, csv_path)
    if scheme in ("equal", "unequal"):
        if scheme == "unequal" and fractions is None:
            fractions = list(range(sites, 0, -1))  # 3 sites: 1/2, 1/3, 1/6 of the cases
        fractions = fractions or [1.0] * sites
        if len(fractions) != sites or min(fractions) <= 0:
            raise ValueError(f"need {sites} positive fractions, got {list(fractions)}")
        parts = _split_by_fractions(shuffled, fractions)
    elif scheme == "natural":
        values = case_strata(shuffled, attribute)
        distinct = sorted(set(values))
        if len(distinct) != sites:
            raise ValueError(f"natural partition by {attribute!r} gives {len(distinct)} sites {distinct}, not {sites}")
        parts = [[c for c, v in zip(shuffled, values, strict=True) if v == d] for d in distinct]
    else:
        strata: dict[str, list[Case]] = defaultdict(list)
        for case, value in zip(shuffled, case_strata(shuffled, attribute), strict=True):
            strata[value].append(case)
        if scheme == "dirichlet":
            parts = _dirichlet(strata, sites, alpha, rng, min_cases)
        else:  # hybrid: one case of every stratum per site first, the rest by Dirichlet
            small = {s: len(m) for s, m in strata.items() if len(m) < sites}
            if small:
                raise ValueError(f"hybrid needs at least {sites} cases per {attribute} stratum; too few in {small}")
            parts = [[members[k] for members in strata.values()] for k in range(sites)]
            rest = {s: m[sites:] for s, m in strata.items()}
            for k, extra in enumerate(_dirichlet(rest, sites, alpha, rng, 0)):
                parts[k].extend(extra)
    return dict(zip(names, parts, strict=True))


def _from_csv(cases: Sequence[Case], csv_path: Path | None) -> dict[str, list[Case]]:
    if csv_path is None:
        raise ValueError("scheme 'csv' needs a partition file (--csv FILE with columns Partition_ID,Subject_ID)")
    by_id = {c.case_id: c for c in cases}
    with Path(csv_path).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"Partition_ID", "Subject_ID"} <= set(rows[0]):
        raise ValueError(f"{csv_path}: needs the columns Partition_ID,Subject_ID")
    unknown = [r["Subject_ID"] for r in rows if r["Subject_ID"] not in by_id]
    if unknown:
        raise ValueError(f"{csv_path}: {len(unknown)} subject(s) not in the data folder, e.g. {unknown[0]}")
    seen: set[str] = set()
    partitions: dict[str, list[Case]] = defaultdict(list)
    for row in rows:
        if row["Subject_ID"] in seen:
            raise ValueError(f"{csv_path}: subject {row['Subject_ID']} is listed twice")
        seen.add(row["Subject_ID"])
        partitions[row["Partition_ID"]].append(by_id[row["Subject_ID"]])
    ordered = sorted(partitions, key=lambda p: (len(p), p))
    return {f"site-{i}": partitions[p] for i, p in enumerate(ordered, start=1)}


def check_split(split: Sequence[float]) -> None:
    """Refuse a split that is not three fractions summing to 1: ``10 2 0`` would otherwise be rescaled quietly, and
    an empty part given a case anyway."""
    if len(split) != 3 or min(split) < 0 or max(split) > 1 or abs(sum(split) - 1) > 1e-6:
        values = " ".join(f"{v:g}" for v in split)
        raise ValueError(f"--split takes train/val/test fractions in [0, 1] that sum to 1, got {values}")


def split_site(cases: Sequence[Case], split: Sequence[float], rng: np.random.Generator) -> dict[str, list[Case]]:
    """Split one site's cases into training / validation / test. A part of fraction 0 stays empty, as asked; every
    other part gets a case when there are enough to go round (a site of 4 cases split 0.6 0.2 0.2 is 2/1/1)."""
    check_split(split)
    order = [cases[i] for i in rng.permutation(len(cases))]
    n = len(order)
    fractions = np.asarray(split, dtype=float)
    counts = np.floor(fractions / np.sum(fractions) * n).astype(int)
    if n >= np.count_nonzero(fractions):
        counts = np.where(fractions > 0, np.maximum(counts, 1), 0)
    # what rounding left goes to training, or to the first part asked for where training is not (an evaluation list)
    counts[np.flatnonzero(fractions)[0]] += n - counts.sum()
    train, val = order[: counts[0]], order[counts[0] : counts[0] + counts[1]]
    return {"training": train, "validation": val, "test": order[counts[0] + counts[1] :]}


def _entry(case: Case, root: Path) -> dict:
    return {
        "case_id": case.case_id,
        "image": [case.files[m].resolve().relative_to(root).as_posix() for m in MODALITIES],
        "label": case.files[SEG].resolve().relative_to(root).as_posix(),
        # the label convention follows from it; a 2024 post-treatment case is known only from this record
        "release": case.release,
    }


def write_datalists(
    root: Path,
    assignment: dict[str, list[Case]],
    out: Path,
    split: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    description: dict | None = None,
    annotated: dict[str, list[str]] | None = None,
) -> dict[str, Path]:
    """Write ``site-N.json`` per site and the pooled ``site-All.json``; paths are relative to ``root``.

    ``annotated`` hides labels to make partially annotated sites (SegViz): ``{"site-1": ["WT"]}`` records in
    every entry of site-1 (and in the pooled list) that only WT is annotated there; the data pipeline then
    never shows that site its other regions. A site not named annotates every region. Refuses to overwrite
    existing datalists: a partition is part of an experiment's record.
    """
    root = Path(root).resolve()
    out = Path(out)
    targets = [out / f"{name}.json" for name in [*assignment, POOLED_SITE]]
    unknown_sites = sorted(set(annotated or {}) - set(assignment))
    if unknown_sites:
        raise ValueError(f"annotations given for unknown site(s) {unknown_sites}; sites are {list(assignment)}")
    for regions in (annotated or {}).values():
        annotation_mask(regions)
    existing = [str(p) for p in targets if p.exists()]
    if existing:
        raise FileExistsError(f"datalist(s) exist already, not overwritten: {', '.join(existing)}")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pooled: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    written = {}
    for name, cases in assignment.items():
        splits = split_site(cases, split, rng)
        doc = {"site": name, **(description or {})}
        labelled = {"annotated": [r for r in REGIONS if r in annotated[name]]} if name in (annotated or {}) else {}
        for key, members in splits.items():
            doc[key] = [_entry(c, root) | labelled for c in members]
            pooled[key].extend(doc[key])
        written[name] = _dump(out / f"{name}.json", doc)
    written[POOLED_SITE] = _dump(out / f"{POOLED_SITE}.json", {"site": POOLED_SITE, **(description or {}), **pooled})
    return written


def _dump(path: Path, doc: dict) -> Path:
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path
