"""``brats-fl benchmark``: algorithms x partitions x seeds in FLARE's simulator, and the page that compares them
(the work: ``brats_fl.results.benchmark``)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from brats_fl.jobs.params import by_name


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from brats_fl.results.benchmark import PROFILES, run_benchmark

    profile = PROFILES[args.profile]
    if args.lesion_rule is not None:  # every run scores its test cases by this rule (issue 39, item 4)
        profile = dataclasses.replace(profile, params={**profile.params, "lesion_rule": args.lesion_rule})
    page, failed = run_benchmark(
        profile,
        args.out,
        algorithms=args.algorithms,
        partitions=args.partitions,
        seeds=args.seeds,
        parallel=args.parallel,
        page_only=args.page_only,
    )
    print(f"benchmark page: {page} and {page.with_suffix('.html')}")
    if failed:
        print(f"{failed} run(s) failed; run the same command again to retry them (finished runs are kept)")
    return 1 if failed else 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``benchmark``."""
    from brats_fl.results.benchmark import ALGORITHMS, PARTITIONS, PROFILES

    p = sub.add_parser(
        "benchmark",
        help="compare the federated algorithms: algorithms x partitions x seeds in FLARE's simulator, one page",
        description="Runs every unfinished run of the profile's matrix (a finished run, one with summary.json, is "
        "kept; a half-finished one is cleared and re-run), rebuilding DIR/index.md and DIR/index.html after each.",
    )
    p.add_argument("--profile", choices=sorted(PROFILES), default="smoke", help="the matrix and the runs' settings")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the benchmark folder (resumable)")
    p.add_argument(
        "--algorithms", nargs="+", choices=ALGORITHMS, default=None, metavar="JOB", help="default: the profile's"
    )
    p.add_argument(
        "--partitions", nargs="+", choices=PARTITIONS, default=None, metavar="NAME", help="default: the profile's"
    )
    p.add_argument("--seeds", type=int, default=None, metavar="N", help="seeds 0..N-1; default: the profile's")
    p.add_argument(
        "--parallel", type=int, default=None, metavar="N", help="runs at once; default cores // cores per run, >= 1"
    )
    by_name("lesion_rule").add_to(p, default=None)
    p.add_argument("--page-only", action="store_true", help="rebuild the page from the finished runs; run nothing")
    p.set_defaults(func=_cmd_benchmark)
