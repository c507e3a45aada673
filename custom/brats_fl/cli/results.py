"""``brats-fl table``, ``report`` and ``compare``: finished runs (the work: ``brats_fl.results``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _cmd_compare(args: argparse.Namespace) -> None:
    from brats_fl.results.compare import compare_runs

    path = compare_runs(args.runs, args.external, args.out, threads=args.threads)
    print(path.read_text())
    print(f"written to {path} and {path.with_suffix('.json')}")


_WAYS = ("sent", "received")


def _cmd_table(args: argparse.Namespace) -> None:
    from brats_fl.results.report import INCOMPLETE, format_table, refuse_incomplete, summarise_run

    columns = ("client_loss", "worst_site_dice", "MB_sent_per_round", "MB_sent", "MB_received", "minutes", "privacy")
    rows, incomplete = [], []
    for run in args.runs:
        summary = summarise_run(run)
        refuse_incomplete(run, summary, args.include_incomplete)
        if not summary["complete"]:
            incomplete.append((run, summary["incomplete_reason"]))
        wall, traffic = summary["wall_time"], summary["traffic"]
        extra = {
            "client_loss": summary["client_train_loss"],
            "worst_site_dice": summary["test"]["worst_dice_mean"],
            "MB_sent_per_round": summary["bytes_sent_per_round"] / 2**20,
            # per site over the whole training, mean over sites
            **{f"MB_{way}": sum(t[way] for t in traffic.values()) / len(traffic) / 2**20 for way in _WAYS},
            "minutes": wall / 60 if wall else None,
            # the ledger's epsilon per site (brats_fl.server.privacy)
            "privacy": summary["privacy"]["guarantee"],
        }
        name = f"{summary['job']} ({Path(run).name})" + ("" if summary["complete"] else INCOMPLETE)
        if args.per_site:
            rows += [(f"{name} {site}", metrics) for site, metrics in summary["test_per_site"].items()]
            if summary["global_test_per_site"]:
                rows += [(f"{name} {s}, before fine-tuning", m) for s, m in summary["global_test_per_site"].items()]
        rows.append((f"{name}, worst site {summary['test']['worst_site']}", summary["test"] | extra))
    print(format_table(rows, extra=columns))
    for run, reason in incomplete:
        print(f"{run}: incomplete, {reason}")


def _cmd_report(args: argparse.Namespace) -> None:
    from brats_fl.results.report import write_report

    index = write_report(
        args.runs, args.out, args.cases, args.data_root, args.datalist, args.threads, args.include_incomplete
    )
    print(f"report of {len(args.runs)} run(s) written to {index.parent}; open {index}")


def _incomplete_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--include-incomplete",
        action="store_true",
        help="show runs that aborted, failed or were stopped (marked incomplete); by default they are refused",
    )


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``table``, ``report`` and ``compare``."""
    p = sub.add_parser("compare", help="SegViz tables: Dice (SD) per region, paired t-tests, external site")
    p.add_argument("runs", type=Path, nargs="+", help="finished brats_segviz_* runs")
    p.add_argument("--external", type=Path, required=True, help="a fully labelled BraTS-layout folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("table", help="results table of finished runs: each site's final model on its own test split")
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--per-site", action="store_true", help="a row per site, and the global model's where there is one")
    _incomplete_option(p)
    p.set_defaults(func=_cmd_table)

    p = sub.add_parser("report", help="results table, learning curves, per-site bars, overlays and index.html")
    p.add_argument("runs", type=Path, nargs="+", help="finished runs: simulator workspaces or downloaded results")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cases", nargs="+", default=None, help="test case ids to draw (default: one all runs test)")
    p.add_argument("--data-root", type=Path, default=None, help="downloaded results: where the cases are")
    p.add_argument("--datalist", type=Path, default=None, help="downloaded results: a datalist or a folder of them")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the overlays' inference")
    _incomplete_option(p)
    p.set_defaults(func=_cmd_report)
