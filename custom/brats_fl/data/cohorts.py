"""Named partitions of phantom cohorts over three sites (four for ``scanners``), for benchmarks of federated algorithms
under one kind of skew each.

Every partition draws its cases from a cohort: a list of strata (``SiteKnobs``, one per kind of hospital) and the
pattern by which case i falls into a stratum. Partitions with the same images share one cohort on disk: ``iid``,
``quantity`` and ``mixed`` deal the same FeTS-like cohort out differently. Layout under ``out``::

    cohorts/<cohort>/          BraTS 2020 case folders, name_mapping.csv, phantom.json, cohort.json (complete);
                               <cohort>-hard/ for the phantom as hard as BraTS (``hard``)
    <partition>/datalists/     site-1..3.json and site-All.json
    <partition>/site_config.json, partition.json (written last: the partition is complete)
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from brats_fl.data.checks import DataError, check_cases
from brats_fl.data.layout import find_cases
from brats_fl.data.partition import check_split, write_datalists
from brats_fl.data.phantom import SiteKnobs, generate_cases

#: sites of every partition but ``scanners``
SITES = 3
#: Case i of a block of six goes to site (or stratum) QUANTITY[i]: shares 1/2, 1/3, 1/6.
QUANTITY = (0, 0, 0, 1, 1, 2)
EVEN = (0, 1, 2)
EVEN_4 = (0, 1, 2, 3)
#: The smallest site of a quantity partition needs three cases, one per split.
MIN_CASES = 3 * len(QUANTITY)

#: FeTS-like hospitals: every knob differs (scanner, acquisition, biology, annotation); they also differ in size.
HOSPITALS = (
    SiteKnobs("hospital-A", scanner="clean", size_scale=1.1, lgg_share=0.10),
    SiteKnobs("hospital-B", scanner="gibbs_strong", slice_mm=5, annotation_mm=1),
    SiteKnobs("hospital-C", scanner="low_field_spike", size_scale=0.85, lgg_share=0.45, slice_mm=3, annotation_mm=-1),
)
#: Feature skew: scanner and acquisition differ, biology and annotation do not.
SCANNERS = (
    SiteKnobs("clean-1mm", scanner="clean"),
    SiteKnobs("gibbs-5mm", scanner="gibbs_strong", slice_mm=5),
    SiteKnobs("lowfield-spike", scanner="low_field_spike"),
)
#: Label skew: the same scanner and biology, annotators who trace as the protocol says, looser, or tighter.
#: Tighter stops at 1 mm: eroding 2 mm deletes thin enhancing rims, which changes the labels' meaning, not style.
ANNOTATORS = (
    SiteKnobs("protocol"),
    SiteKnobs("looser-2mm", annotation_mm=2),
    SiteKnobs("tighter-1mm", annotation_mm=-1),
)
#: HyperSeg's client-specific noise (reference 001, Appendix D): one clean site, Gibbs ringing of strength 0.5 and
#: 0.2, k-space spikes of log-intensity 13 (the phantom's scanner profiles of those names); nothing else differs.
NOISY_SCANNERS = (
    SiteKnobs("clean", scanner="clean"),
    SiteKnobs("gibbs-0.5", scanner="gibbs_strong"),
    SiteKnobs("gibbs-0.2", scanner="gibbs_weak"),
    SiteKnobs("kspace-spike", scanner="spike"),
)


@dataclass(frozen=True)
class Partition:
    """A cohort (strata and the pattern that puts case i in stratum ``pattern[i % len]``) and how its cases go to
    the sites: ``deal=None`` makes stratum k site k; otherwise cases are dealt to sites by ``deal`` so that every
    site gets the same mix of strata."""

    name: str
    cohort: str
    strata: tuple[SiteKnobs, ...]
    pattern: tuple[int, ...]
    deal: tuple[int, ...] | None
    description: str

    @property
    def n_sites(self) -> int:
        return len(set(self.deal if self.deal is not None else self.pattern))

    def knobs(self, cases: int) -> list[SiteKnobs]:
        """Each case's knobs, in case order."""
        return [self.strata[self.pattern[i % len(self.pattern)]] for i in range(cases)]

    def sites(self, cases: int) -> list[int]:
        """Each case's site (0-based), in case order.

        Dealt sites shift by one every block of ``pattern``: each block then gives every site its exact share,
        and over ``len(deal)`` blocks every site gets every stratum in the same proportion.
        """
        if self.deal is None:
            return [self.pattern[i % len(self.pattern)] for i in range(cases)]
        block = len(self.pattern)
        return [self.deal[(i + i // block) % len(self.deal)] for i in range(cases)]


PARTITIONS: dict[str, Partition] = {
    "iid": Partition(
        "iid", "fets", HOSPITALS, QUANTITY, EVEN, "equal shares; every site the same mix of the three hospitals"
    ),
    "quantity": Partition(
        "quantity", "fets", HOSPITALS, QUANTITY, QUANTITY, "shares 1/2, 1/3, 1/6; every site the same mix"
    ),
    "feature": Partition(
        "feature", "feature", SCANNERS, EVEN, None, "equal shares; scanner and slice thickness differ per site"
    ),
    "label": Partition("label", "label", ANNOTATORS, EVEN, None, "equal shares; annotation style differs per site"),
    "mixed": Partition(
        "mixed",
        "fets",
        HOSPITALS,
        QUANTITY,
        None,
        "FeTS-like: one hospital per site, shares 1/2, 1/3, 1/6; scanner, acquisition, biology, annotation differ",
    ),
    "scanners": Partition(
        "scanners",
        "scanners",
        NOISY_SCANNERS,
        EVEN_4,
        None,
        "four sites in equal shares, one noisy scanner each (HyperSeg's clean, Gibbs 0.5, Gibbs 0.2, k-space spikes)",
    ),
}


def _differences(found: dict, wanted: dict) -> str:
    keys = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
    return ", ".join(f"{k} {found.get(k)!r} there, {wanted.get(k)!r} asked" for k in keys)


def _cohort(
    partition: Partition,
    out: Path,
    cases: int,
    seed: int,
    shape: Sequence[int],
    log: Callable[[str], None],
    hard: bool = False,
) -> Path:
    """The partition's cohort under ``out/cohorts``: reused when complete with the same settings, else generated
    into ``<name>.partial`` and renamed when done, so an interrupted run never leaves a cohort that looks complete.
    ``hard``: the phantom as hard as BraTS (``brats_fl.data.phantom.generate_cases``), in a folder of its own."""
    root = out / "cohorts" / (f"{partition.cohort}-hard" if hard else partition.cohort)
    spec = {
        "cohort": partition.cohort,
        "cases": cases,
        "seed": seed,
        "shape": list(shape),
        "strata": [asdict(k) for k in partition.strata],
        "pattern": list(partition.pattern),
    } | ({"hard": True} if hard else {})
    marker = root / "cohort.json"
    if marker.is_file():
        found = json.loads(marker.read_text())
        if found != spec:
            raise FileExistsError(
                f"{root} holds cohort {partition.cohort!r} made with other settings ({_differences(found, spec)}); "
                "not overwritten: use another --out or remove it"
            )
        log(f"reusing cohort {root} ({cases} cases)")
        return root
    if root.exists():
        raise FileExistsError(f"{root} exists but is not a complete phantom cohort (no cohort.json); remove it")
    partial = root.with_name(root.name + ".partial")
    if partial.exists():
        log(f"{partial}: half-written cohort from an interrupted run; removing it and generating again")
        shutil.rmtree(partial)
    log(f"generating cohort {partition.cohort!r}: {cases} cases of {tuple(shape)} voxels into {root}")
    generate_cases(partial, partition.knobs(cases), seed, tuple(shape), hard=hard, workers=os.cpu_count())
    (partial / "cohort.json").write_text(json.dumps(spec, indent=1) + "\n")
    partial.rename(root)
    return root


def build_partition(
    name: str,
    out: Path,
    cases: int,
    seed: int = 0,
    shape: tuple[int, int, int] = (240, 240, 155),
    split: tuple[float, float, float] = (0.4, 0.1, 0.5),
    log: Callable[[str], None] = print,
    hard: bool = False,
) -> Path:
    """Generate (if not yet complete) the cohort of partition `name` under out/, run the data checks, write the
    datalists (site-1..N.json and site-All.json via brats_fl.data.partition.write_datalists) and a site
    configuration JSON (format: brats_fl.site.config, keys data_root, datalist_dir, threads=1, state_dir) and
    return the site configuration's path. Resumable: a complete partition is reused, a half-written one is
    refused or rebuilt with a clear message.

    The test split is half the cases by default: a benchmark needs about 50 pooled test cases to resolve a Dice
    difference of 0.02. ``log`` receives one line per step. ``hard``: the phantom as hard as BraTS, whose labels
    vary as raters' do (``brats_fl.data.phantom.generate_cases``); off, the cohort is the demo's.
    """
    if name not in PARTITIONS:
        raise ValueError(f"unknown partition {name!r}; choose one of {', '.join(PARTITIONS)}")
    if cases < MIN_CASES:
        raise ValueError(f"need at least {MIN_CASES} cases so that the smallest site has one per split, got {cases}")
    check_split(split)
    partition = PARTITIONS[name]
    out = Path(out)
    folder = out / name
    config = folder / "site_config.json"
    done = folder / "partition.json"
    record = {
        "partition": name,
        "description": partition.description,
        "cohort": partition.cohort,
        "cases": cases,
        "seed": seed,
        "shape": list(shape),
        "split": list(split),
    } | ({"hard": True} if hard else {})
    if done.is_file():
        found = json.loads(done.read_text())
        kept = {k: found.get(k) for k in record}
        if kept != record:
            raise FileExistsError(
                f"{folder} holds another partition ({_differences(kept, record)}); not overwritten: "
                "use another --out or remove it"
            )
        log(f"reusing partition {folder}")
        return config
    if folder.exists():
        # only what this function writes goes: a benchmark keeps its own files beside them (the untrained model's
        # scores, committed with the results, while the cohort and datalists are not)
        log(f"{folder}: half-written partition (no partition.json); writing its datalists and configuration again")
        shutil.rmtree(folder / "datalists", ignore_errors=True)
        config.unlink(missing_ok=True)
    root = _cohort(partition, out, cases, seed, shape, log, hard)
    found_cases = find_cases(root)
    problems = check_cases(found_cases)
    if problems:
        raise DataError(problems)
    sites = partition.sites(cases)
    names = [f"site-{k + 1}" for k in range(partition.n_sites)]
    assignment = {n: [c for c, s in zip(found_cases, sites, strict=True) if s == k] for k, n in enumerate(names)}
    description = {"partition": name, "cohort": partition.cohort, "seed": seed}
    write_datalists(root, assignment, folder / "datalists", split, seed, description)
    strata = partition.knobs(cases)
    mix = {
        n: {k.name: sum(1 for s, kn in zip(sites, strata, strict=True) if s == i and kn == k) for k in partition.strata}
        for i, n in enumerate(names)
    }
    doc = {
        "data_root": Path(os.path.relpath(root, folder)).as_posix(),
        "datalist_dir": "datalists",
        "threads": 1,
        "state_dir": "state",
    }
    config.write_text(json.dumps(doc, indent=1) + "\n")
    record |= {"site_mix": mix, "strata": [asdict(k) for k in partition.strata]}
    done.write_text(json.dumps(record, indent=1) + "\n")
    log(f"wrote partition {name!r} to {folder}: site configuration {config}")
    return config
