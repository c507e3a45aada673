"""``brats-fl benchmark``: algorithms x partitions x seeds in FLARE's simulator, and the page that compares them
(the work: ``brats_fl.results.benchmark_run``); ``brats-fl tune``: one algorithm's hyperparameters tuned on validation
(``brats_fl.results.tune``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from brats_fl.settings.params import by_name


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from brats_fl.results.benchmark import PROFILES
    from brats_fl.results.benchmark_run import run_benchmark

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


def _cmd_tune(args: argparse.Namespace) -> int:
    from brats_fl.results.benchmark import PROFILES
    from brats_fl.results.tune import tune

    results = tune(PROFILES[args.profile], args.algorithm, args.partition, args.trials, args.out, args.storage)
    chosen = json.loads(results.read_text())["chosen"]
    print(f"tuning results: {results} and {results.with_suffix('.md')}")
    if not chosen:
        print("no trial completed: nothing chosen")
        return 1
    print(f"chosen (trial {chosen['number']}, validation Dice {chosen['validation_dice']:.4f}): {chosen['flags']}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``benchmark`` and ``tune``."""
    from brats_fl.results.benchmark import ALGORITHMS, ENTRIES, PARTITIONS, PROFILES

    p = sub.add_parser(
        "benchmark",
        help="compare the federated algorithms: algorithms x partitions x seeds in FLARE's simulator, one page",
        description="Runs every unfinished run of the profile's matrix (a finished run, one with summary.json, is "
        "kept; a half-finished one is cleared and re-run), rebuilding DIR/index.md and DIR/index.html after each.",
    )
    p.add_argument("--profile", choices=sorted(PROFILES), default="smoke", help="the matrix and the runs' settings")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the benchmark folder (resumable)")
    p.add_argument(
        "--algorithms", nargs="+", choices=ENTRIES, default=None, metavar="JOB", help="default: the profile's"
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

    p = sub.add_parser(
        "tune",
        help="tune one algorithm's hyperparameters on validation Dice with Optuna (docs/howto/tune.md)",
        description="Runs trials of the algorithm's study (the space brats_fl.jobs.space declares; 2 seeds a trial, "
        "pruned on the per-round validation Dice, never opening the test split) until the study holds --trials, "
        "counting every worker's, then writes DIR/tuned/<partition>/<algorithm>.json and .md.",
    )
    p.add_argument("--algorithm", choices=ALGORITHMS, required=True, metavar="JOB", help="the job to tune")
    p.add_argument("--profile", choices=sorted(PROFILES), default="smoke", help="the cohort and the runs' settings")
    p.add_argument("--partition", choices=PARTITIONS, default="iid", help="the partition tuned on; default iid")
    p.add_argument("--trials", type=int, required=True, metavar="N", help="trials in the study, all workers together")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the tuning folder (resumable)")
    p.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="a database URL Optuna accepts (e.g. postgresql://host/db), shared by the workers of one study; "
        "default sqlite in DIR",
    )
    p.set_defaults(func=_cmd_tune)
