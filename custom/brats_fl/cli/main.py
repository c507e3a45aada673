"""The ``brats-fl`` command: data preparation, checks, baselines, evaluation, prediction, reports and the demo."""

from __future__ import annotations

import argparse
import sys

from brats_fl.cli import benchmark, data, demo, jobs, ops, results, train


def build_parser() -> argparse.ArgumentParser:
    """Every command's options; building them imports no torch, monai or FLARE."""
    parser = argparse.ArgumentParser(prog="brats-fl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for area in (ops, data, train, jobs, results, benchmark, demo):
        area.add_commands(sub)
    # the command line itself, for the commands that run others as a user would type them (the demo's steps), which
    # cannot import this module: it imports them
    parser.set_defaults(cli=main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError, TimeoutError) as err:
        # brats_fl.data.checks.DataError is a RuntimeError
        print(f"brats-fl {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
