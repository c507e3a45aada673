"""``brats-fl phantom``, ``cohort``, ``partition``, ``check-data`` and ``prepare``: the data before any training.
Parsing imports neither torch nor FLARE; ``phantom`` and ``cohort`` import torch (through MONAI) when they run."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

#: the keys of ``brats_fl.data.cohorts.PARTITIONS`` (a test keeps them equal), so that parsing imports no data code
PARTITION_NAMES = ("iid", "quantity", "feature", "label", "mixed", "scanners")


def _cmd_phantom(args: argparse.Namespace) -> None:
    from brats_fl.data.layout import release
    from brats_fl.data.phantom import generate_cohort

    start = time.perf_counter()
    cases = generate_cohort(
        args.out,
        args.cases,
        args.sites,
        args.seed,
        shape=tuple(args.shape),
        profiles=args.profiles,
        release=args.release,
        cavity_share=args.cavity_share,
        hard=args.hard,
        workers=args.workers,
    )
    rel = release(args.release)
    print(f"wrote {len(cases)} phantom cases of {rel.description} to {args.out} in {time.perf_counter() - start:.1f} s")
    if rel.declared:
        # its names are another release's: only the user can say which release the folder holds
        print(f"named as another release: declare it, e.g. brats-fl check-data {args.out} --release {rel.name}")


def _cmd_cohort(args: argparse.Namespace) -> None:
    from brats_fl.data.cohorts import build_partition

    for name in args.names:
        start = time.perf_counter()
        config = build_partition(
            name, args.out, args.cases, seed=args.seed, shape=tuple(args.shape), split=tuple(args.split), hard=args.hard
        )
        record = json.loads((config.parent / "partition.json").read_text())
        for site, mix in record["site_mix"].items():
            doc = json.loads((config.parent / "datalists" / f"{site}.json").read_text())
            sizes = "/".join(str(len(doc[s])) for s in ("training", "validation", "test"))
            strata = ", ".join(f"{n} {k}" for k, n in mix.items() if n)
            print(f"{name} {site}: train/val/test {sizes} ({strata})")
        print(f"{name}: site configuration {config} ({time.perf_counter() - start:.0f} s)")


def _cmd_partition(args: argparse.Namespace) -> None:
    from brats_fl.data.layout import find_cases
    from brats_fl.data.partition import assign_sites, check_split, write_datalists

    check_split(args.split)
    annotated = dict(_site_regions(text) for text in args.annotate)
    cases = find_cases(args.data, args.release)
    assignment = assign_sites(
        cases,
        args.sites,
        args.scheme,
        seed=args.seed,
        fractions=args.fractions,
        alpha=args.alpha,
        attribute=args.attribute,
        csv_path=args.csv,
    )
    description = {"scheme": args.scheme, "seed": args.seed, "alpha": args.alpha, "attribute": args.attribute}
    written = write_datalists(args.data, assignment, args.out, args.split, args.seed, description, annotated=annotated)
    for name, path in written.items():
        doc = json.loads(path.read_text())
        sizes = "/".join(str(len(doc[s])) for s in ("training", "validation", "test"))
        print(f"{name}: train/val/test {sizes} -> {path}")
    empty = [s for s, fraction in zip(("validation", "test"), args.split[1:], strict=True) if not fraction]
    if empty:
        # honoured as asked (brats_fl.data.partition.split_site); say where that stops a run, not at the run alone
        print(
            f"no {' and no '.join(empty)} split, as asked: `brats-fl run` refuses these datalists, since every job "
            "scores each site's validation split every round and its test split after training"
        )


def _site_regions(text: str) -> tuple[str, list[str]]:
    """``site-1=WT,TC`` -> ("site-1", ["WT", "TC"])."""
    site, sep, regions = text.partition("=")
    if not sep or not regions:
        raise ValueError(f"--annotate takes SITE=REGION[,REGION...], e.g. site-1=WT, got {text!r}")
    return site, regions.split(",")


def _cmd_check(args: argparse.Namespace) -> int:
    from brats_fl.data.checks import check_cases_once, describe_grid
    from brats_fl.data.labels import convention
    from brats_fl.data.layout import find_cases, release

    cases = find_cases(args.data, args.release)
    rel = release(cases[0].release)
    labels = convention(rel.convention).describe()
    print(f"{len(cases)} case(s) named as {rel.description} ({rel.example}); labels {labels}")
    for case in cases:
        print(f"{case.case_id}: {describe_grid(case)}")
    problems = check_cases_once(cases, grid_required=not args.resample, passed=args.stamps)
    for p in problems:
        print(p)
    print(f"checked {len(cases)} case(s): {len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


def _cmd_prepare(args: argparse.Namespace) -> None:
    from brats_fl.cli.demo import prepare_data

    prepare_data(args.out, cases=args.cases, sites=args.sites, shape=tuple(args.shape), cli=args.cli, seed=args.seed)


def _release_option(parser: argparse.ArgumentParser) -> None:
    from brats_fl.data.layout import RELEASE_NAMES

    parser.add_argument(
        "--release",
        choices=RELEASE_NAMES,
        default=None,
        help="the BraTS release, where the file names cannot tell it: 2024-gli-post (named as 2023, 4 = resection "
        "cavity); default: read from the names",
    )


def _hard_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--hard",
        action="store_true",
        help="the phantom as hard as BraTS: labels vary as raters' do, partial volume, bias fields, faint "
        "non-enhancing tumour (docs/explanation/phantom.md); default the demo's phantom",
    )


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``phantom``, ``cohort``, ``partition``, ``check-data`` and ``prepare``."""
    from brats_fl.data.layout import PHANTOM_RELEASES

    p = sub.add_parser("phantom", help="write a synthetic BraTS-layout cohort")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cases", type=int, default=30)
    p.add_argument("--sites", type=int, default=3, help="number of scanner profiles")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155])
    p.add_argument("--profiles", nargs="+", default=None, help="scanner profiles site k uses in turn (default all)")
    p.add_argument(
        "--release",
        choices=PHANTOM_RELEASES,
        default="2020",
        help="write the cases with this BraTS release's folder and file names and label values",
    )
    p.add_argument(
        "--cavity-share",
        type=float,
        default=None,
        metavar="SHARE",
        help="2024-gli-post only: the share of cases with a resection cavity, label 4 (default: most; "
        "docs/explanation/phantom.md)",
    )
    _hard_option(p)
    p.add_argument(
        "--workers", type=int, default=os.cpu_count(), help="processes writing the cases (default: one per core)"
    )
    p.set_defaults(func=_cmd_phantom)

    p = sub.add_parser("cohort", help="phantom cohort + data checks + datalists + site configuration of a partition")
    p.add_argument("names", nargs="+", choices=PARTITION_NAMES, metavar="NAME", help=", ".join(PARTITION_NAMES))
    p.add_argument("--out", type=Path, required=True, help="cohorts and partitions go here; reused when complete")
    p.add_argument("--cases", type=int, required=True, help="cases in the cohort (at least 18)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155])
    p.add_argument("--split", type=float, nargs=3, default=[0.4, 0.1, 0.5], help="train/val/test fractions")
    _hard_option(p)
    p.set_defaults(func=_cmd_cohort)

    p = sub.add_parser("partition", help="write one datalist per site (and site-All.json)")
    p.add_argument("data", type=Path)
    p.add_argument("--sites", type=int, required=True)
    p.add_argument("--scheme", choices=["equal", "unequal", "dirichlet", "hybrid", "natural", "csv"], default="equal")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--fractions", type=float, nargs="+", default=None, help="unequal: share of each site")
    p.add_argument("--alpha", type=float, default=0.5, help="dirichlet/hybrid concentration")
    p.add_argument("--attribute", default="scanner", help="dirichlet/hybrid/natural: size, Grade, scanner, ...")
    p.add_argument("--csv", type=Path, default=None, help="csv: FeTS-style Partition_ID,Subject_ID file")
    p.add_argument("--split", type=float, nargs=3, default=[0.6, 0.2, 0.2], help="train/val/test fractions, sum 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--annotate",
        nargs="+",
        default=[],
        metavar="SITE=REGIONS",
        help="partial labels: e.g. site-1=WT site-2=TC site-3=ET,TC; unnamed sites annotate every region",
    )
    _release_option(p)
    p.set_defaults(func=_cmd_partition)

    p = sub.add_parser(
        "check-data",
        help="name the release, show each case's grid, check every case; one line per problem, exit 1 if any",
    )
    p.add_argument("data", type=Path)
    _release_option(p)
    p.add_argument(
        "--resample", action="store_true", help="the cases will be resampled (a job's --spacing): any grid is accepted"
    )
    p.add_argument(
        "--stamps",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep a stamp of each case that passes in DIR and skip the cases stamped there: a site's cache folder's "
        "'checked' folder spares the sites of the next run reading them again",
    )
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("prepare", help="phantom cohort + equal and unequal partitions for the simulated sites")
    p.add_argument("--out", type=Path, default=Path("data/phantom"))
    p.add_argument("--cases", type=int, default=30)
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155])
    p.set_defaults(func=_cmd_prepare)
