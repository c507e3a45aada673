"""``brats-fl run``, ``export-jobs`` and ``resume-job``: the FLARE jobs (the work: ``brats_fl.jobs``). The options
of ``run`` come from the parameter schema (``brats_fl.settings.params``)."""

from __future__ import annotations

import argparse
import filecmp
import json
import time
from dataclasses import asdict
from pathlib import Path

from brats_fl.settings.params import PRESETS, add_run_options, from_cli

VERBOSE_HELP = (
    "stream FLARE's log to the terminal instead of a live progress display; the log is always written to the workspace"
)


def _cmd_run(args: argparse.Namespace) -> None:
    # the run's start, before torch, MONAI and FLARE are imported: what a run costs includes them
    launched = time.time()
    from brats_fl.jobs.catalogue import HyperNetParams, JobParams, refuse_unused
    from brats_fl.jobs.simulate import run_simulation
    from brats_fl.results.cost import PHASES, run_cost
    from brats_fl.results.report import format_table, post_processing_lines, summarise_run

    options = vars(args)
    refuse_unused(args.job, options)
    job, hypernetwork = from_cli(options)
    params = JobParams(**PRESETS.get(args.preset, {}) | job, hypernetwork=HyperNetParams(**hypernetwork))
    workspace = args.workspace or Path("runs") / f"{args.job}-{time.strftime('%Y%m%d-%H%M%S')}"
    start = time.perf_counter()
    run_dir = run_simulation(
        args.job, params, args.site_config, workspace, progress=True, verbose=args.verbose, numerics_mode=args.numerics
    )
    wall_time = time.perf_counter() - start
    summary = summarise_run(run_dir) | {"job": args.job, "params": asdict(params), "wall_time": wall_time}
    # from the command's start (the imports included) to the summary
    cost = run_cost(run_dir, launched, time.time())
    summary["cost"] = cost
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"\n{args.job}: each site's final model on its own test split, {wall_time:.0f} s ({run_dir})")
    if cost:
        phases = ", ".join(f"{k.replace('_', ' ')} {cost[k]:.0f} s" for k in PHASES)
        print(f"training {cost['training']:.0f} s of {cost['wall']:.0f} s; the rest {cost['fixed']:.0f} s: {phases}")
    rows = [*summary["test_per_site"].items(), ("pooled", summary["test"])]
    if summary["global_test"]:
        rows.append(("pooled, before fine-tuning", summary["global_test"]))
    print(format_table(rows, extra=("lesion_dice_mean", "lesion_hd95_mean", "val_loss")))
    for line in post_processing_lines(summary):
        print(line)


def _cmd_export_jobs(args: argparse.Namespace) -> int:
    import tempfile

    from brats_fl.jobs.export import export_jobs

    if args.bundle:
        for path in export_jobs(args.bundle, bundle=True):
            print(f"exported {path}, carrying the package in app/custom/")
        return 0
    if not args.check:
        for path in export_jobs(args.out):
            print(f"exported {path}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = export_jobs(Path(tmp))
        pairs = [(p, args.out / p.name) for p in fresh]
        stale = [new.name for new, old in pairs if not old.is_dir() or _differs(filecmp.dircmp(new, old))]
    for name in stale:
        print(f"{args.out / name}: missing or differs from a fresh export; run `brats-fl export-jobs`")
    return 1 if stale else 0


def _differs(cmp: filecmp.dircmp) -> bool:
    """True if two exported job folders differ in any file name or content (compared byte by byte)."""
    _, mismatch, errors = filecmp.cmpfiles(cmp.left, cmp.right, cmp.common_files, shallow=False)
    ignored = {"__pycache__"}
    only = [n for n in cmp.left_only + cmp.right_only if n not in ignored]
    return bool(only or mismatch or errors) or any(_differs(sub) for n, sub in cmp.subdirs.items() if n not in ignored)


def _cmd_resume_job(args: argparse.Namespace) -> int:
    from brats_fl.jobs.resume import resume_job, resumes_after

    out, _ = resume_job(args.job, args.checkpoint, args.out)
    where = resumes_after(args.checkpoint)
    print(f"wrote {out}: submit it to continue {args.job.name} after {where}, every site from the state it kept")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``run``, ``export-jobs`` and ``resume-job``."""
    p = sub.add_parser("export-jobs", help="write every job definition into jobs/ (or --check that it is current)")
    p.add_argument("--out", type=Path, default=Path("jobs"))
    p.add_argument("--check", action="store_true", help="exit 1 if the folders differ from a fresh export")
    p.add_argument(
        "--bundle",
        type=Path,
        default=None,
        metavar="DIR",
        help="instead, write jobs that carry the package (custom code, needs the byoc right) into DIR, outside jobs/",
    )
    p.set_defaults(func=_cmd_export_jobs)

    p = sub.add_parser("resume-job", help="the job that continues an interrupted run (see brats_fl.jobs.resume)")
    p.add_argument("job", type=Path, help="the job folder that was submitted")
    p.add_argument("--checkpoint", type=Path, required=True, help="the run's last FL_global_model.pt from its server")
    p.add_argument("--out", type=Path, required=True, help="new folder for the resumed job")
    p.set_defaults(func=_cmd_resume_job)

    p = sub.add_parser("run", help="run a job in FLARE's simulator and print its test table")
    p.add_argument("job", help="a job of brats_fl.jobs.catalogue, e.g. brats_fedavg")
    add_run_options(p)
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="named settings under the options given: brats18 is NVFlare's BraTS18 example "
        "(docs/explanation/networks.md)",
    )
    p.add_argument("--site-config", type=Path, default=Path("site_configs/simulation.json"), help="the sites' data")
    p.add_argument("--workspace", type=Path, default=None, help="default: runs/<job>-<time>")
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    p.add_argument(
        "--numerics",
        choices=("portable", "native"),
        default="portable",
        help="portable: the sites' CPU kernels are pinned to AVX2, so that a seed gives the same model on every such "
        "machine (brats_fl.settings.numerics); native: the fastest this CPU has",
    )
    p.set_defaults(func=_cmd_run)
