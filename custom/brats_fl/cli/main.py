"""The ``brats-fl`` command: data preparation, checks, baselines, evaluation, prediction, reports and the demo."""

from __future__ import annotations

import argparse
import filecmp
import json
import sys
import time
from pathlib import Path

from brats_fl.data.checks import DataError, check_cases
from brats_fl.jobs.catalogue import JobParams
from brats_fl.ops.deploy import add_commands
from brats_fl.seg.trainer import add_arguments
from brats_fl.transfer.filters import PRIVACY, QUANTIZATION


def _cmd_phantom(args: argparse.Namespace) -> None:
    from brats_fl.data.phantom import generate_cohort

    start = time.perf_counter()
    cases = generate_cohort(
        args.out, args.cases, args.sites, args.seed, shape=tuple(args.shape), profiles=args.profiles
    )
    print(f"wrote {len(cases)} phantom cases to {args.out} in {time.perf_counter() - start:.1f} s")


def _cmd_partition(args: argparse.Namespace) -> None:
    from brats_fl.data.layout import find_cases
    from brats_fl.data.partition import assign_sites, write_datalists

    cases = find_cases(args.data)
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
    annotated = dict(_site_regions(text) for text in args.annotate)
    written = write_datalists(args.data, assignment, args.out, args.split, args.seed, description, annotated=annotated)
    for name, path in written.items():
        doc = json.loads(path.read_text())
        sizes = "/".join(str(len(doc[s])) for s in ("training", "validation", "test"))
        print(f"{name}: train/val/test {sizes} -> {path}")


def _site_regions(text: str) -> tuple[str, list[str]]:
    """``site-1=WT,TC`` -> ("site-1", ["WT", "TC"])."""
    site, sep, regions = text.partition("=")
    if not sep or not regions:
        raise ValueError(f"--annotate takes SITE=REGION[,REGION...], e.g. site-1=WT, got {text!r}")
    return site, regions.split(",")


def _cmd_compare(args: argparse.Namespace) -> None:
    from brats_fl.results.compare import compare_runs

    path = compare_runs(args.runs, args.external, args.out, threads=args.threads)
    print(path.read_text())
    print(f"written to {path} and {path.with_suffix('.json')}")


def _cmd_check(args: argparse.Namespace) -> int:
    from brats_fl.data.layout import find_cases

    cases = find_cases(args.data)
    problems = check_cases(cases)
    for p in problems:
        print(p)
    print(f"checked {len(cases)} case(s): {len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


def _cmd_train_central(args: argparse.Namespace) -> None:
    from brats_fl.data.datalist import load_datalist
    from brats_fl.data.loading import eval_loader
    from brats_fl.results.report import format_table
    from brats_fl.seg.trainer import Trainer, config_from_args, fit, make_train_loader

    config = config_from_args(args, total_epochs=args.epochs)
    datalist = load_datalist(args.datalist, args.data_root)
    trainer = Trainer(config)
    train = make_train_loader(datalist.items("training"), config)
    val = eval_loader(datalist.items("validation"))
    (args.out).mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(
        json.dumps({"train": config.to_dict(), "epochs": args.epochs, "datalist": str(args.datalist)}, indent=1)
    )
    start = time.perf_counter()
    fit(trainer, train, val, args.epochs, args.out, val_every=args.val_every)
    test_items = datalist.items("test")
    if test_items:
        metrics = trainer.evaluate(eval_loader(test_items))
        (args.out / "test_metrics.json").write_text(json.dumps(metrics, indent=1))
        print(f"\ntest split of {datalist.path.name}, last model, {time.perf_counter() - start:.0f} s:")
        print(format_table([("central", metrics)]))


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from brats_fl.data.datalist import load_datalist
    from brats_fl.data.loading import eval_loader
    from brats_fl.results.report import format_table
    from brats_fl.seg.inference import load_for_inference

    datalist = load_datalist(args.datalist, args.data_root)
    trainer = load_for_inference(args.model, tuple(args.patch), args.threads)
    metrics = trainer.evaluate(eval_loader(datalist.items(args.split)), per_case=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(metrics, indent=1))
    print(format_table([(f"{args.model.name} on {datalist.site} {args.split}", metrics)]))


def _cmd_predict(args: argparse.Namespace) -> None:
    from brats_fl.seg.inference import predict_case

    path = predict_case(args.model, args.case, args.out, patch_size=tuple(args.patch), threads=args.threads)
    print(f"wrote {path}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from brats_fl.cli.demo import run_demo

    run_demo(args.workspace, cases=args.cases, sites=args.sites, shape=tuple(args.shape), rounds=args.rounds)


def _cmd_prepare(args: argparse.Namespace) -> None:
    from brats_fl.cli.demo import prepare_data

    prepare_data(args.out, cases=args.cases, sites=args.sites, shape=tuple(args.shape), seed=args.seed)


def _cmd_export_jobs(args: argparse.Namespace) -> int:
    import tempfile

    from brats_fl.jobs.export import export_jobs

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


def _cmd_resume_job(args: argparse.Namespace) -> int:
    from brats_fl.jobs.resume import resume_job

    out, done = resume_job(args.job, args.checkpoint, args.out)
    print(f"wrote {out}: submit it to continue {args.job.name} after round {done}, every site from the state it kept")
    return 0


def _differs(cmp) -> bool:
    """True if two exported job folders differ in any file name or content (compared byte by byte)."""
    _, mismatch, errors = filecmp.cmpfiles(cmp.left, cmp.right, cmp.common_files, shallow=False)
    ignored = {"__pycache__"}
    only = [n for n in cmp.left_only + cmp.right_only if n not in ignored]
    return bool(only or mismatch or errors) or any(_differs(sub) for n, sub in cmp.subdirs.items() if n not in ignored)


def _cmd_run(args: argparse.Namespace) -> None:
    from brats_fl.jobs.catalogue import HyperNetParams, JobParams
    from brats_fl.jobs.simulate import run_simulation
    from brats_fl.results.report import format_table, summarise_run

    params = JobParams(
        rounds=args.rounds,
        local_epochs=args.local_epochs,
        sites=args.sites,
        patch_size=tuple(args.patch),
        channels=tuple(args.channels),
        lr=args.lr,
        recipe=args.recipe,
        batch_size=args.batch,
        fg_ratio=args.fg_ratio,
        seed=args.seed,
        personal=args.personal,
        finetune_epochs=args.finetune_epochs,
        resume_from=str(args.resume_from.resolve()) if args.resume_from else None,
        transfer=args.transfer,
        passes=args.passes,
        visit_epochs=args.visit_epochs,
        order=args.order,
        assignment_timeout=args.assignment_timeout,
        visit_timeout=args.visit_timeout,
        clients_per_round=args.clients_per_round,
        norm_ratio=args.norm_ratio,
        min_good=args.min_good,
        min_responses=args.min_responses,
        round_wait=args.round_wait,
        privacy=args.privacy,
        privacy_args=dict(_privacy_arg(text) for text in args.privacy_arg),
        quantize=args.quantize,
        audit_transfer=args.audit_transfer,
        hypernetwork=HyperNetParams(
            depth=args.hn_depth,
            width=args.hn_width,
            embedding_dim=args.embedding_dim,
            optimizer=args.hn_optimizer,
            lr=args.hn_lr,
            warmup_rounds=args.warmup_rounds,
        ),
    )
    workspace = args.workspace or Path("runs") / f"{args.job}-{time.strftime('%Y%m%d-%H%M%S')}"
    start = time.perf_counter()
    run_dir = run_simulation(args.job, params, args.site_config, workspace)
    wall_time = time.perf_counter() - start
    summary = summarise_run(run_dir) | {"job": args.job, "params": vars(params), "wall_time": wall_time}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"\n{args.job}: each site's final model on its own test split, {wall_time:.0f} s ({run_dir})")
    rows = [*summary["test_per_site"].items(), ("pooled", summary["test"])]
    if summary["global_test"]:
        rows.append(("pooled, before fine-tuning", summary["global_test"]))
    print(format_table(rows, extra=("val_loss",)))


def _privacy_arg(text: str) -> tuple[str, object]:
    """``epsilon=0.1`` -> ("epsilon", 0.1); a value that is not JSON stays a string (``exclude_vars=^net``)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"--privacy-arg takes KEY=VALUE, e.g. fraction=0.1, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


_WAYS = ("sent", "received")


def _cmd_table(args: argparse.Namespace) -> None:
    from brats_fl.results.report import format_table, summarise_run

    columns = ("client_loss", "worst_site_dice", "MB_sent_per_round", "MB_sent", "MB_received", "minutes")
    rows = []
    for run in args.runs:
        summary = summarise_run(run)
        wall, traffic = summary["wall_time"], summary["traffic"]
        extra = {
            "client_loss": summary["client_train_loss"],
            "worst_site_dice": summary["test"]["worst_dice_mean"],
            "MB_sent_per_round": summary["bytes_sent_per_round"] / 2**20,
            # per site over the whole training, mean over sites
            **{f"MB_{way}": sum(t[way] for t in traffic.values()) / len(traffic) / 2**20 for way in _WAYS},
            "minutes": wall / 60 if wall else None,
        }
        name = f"{summary['job']} ({Path(run).name})"
        if args.per_site:
            rows += [(f"{name} {site}", metrics) for site, metrics in summary["test_per_site"].items()]
            if summary["global_test_per_site"]:
                rows += [(f"{name} {s}, before fine-tuning", m) for s, m in summary["global_test_per_site"].items()]
        rows.append((f"{name}, worst site {summary['test']['worst_site']}", summary["test"] | extra))
    print(format_table(rows, extra=columns))


def _cmd_report(args: argparse.Namespace) -> None:
    from brats_fl.results.report import write_report

    index = write_report(args.runs, args.out, args.cases, args.data_root, args.datalist, args.threads)
    print(f"report of {len(args.runs)} run(s) written to {index.parent}; open {index}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brats-fl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_commands(sub)

    p = sub.add_parser("phantom", help="write a synthetic BraTS-layout cohort")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cases", type=int, default=30)
    p.add_argument("--sites", type=int, default=3, help="number of scanner profiles")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155])
    p.add_argument("--profiles", nargs="+", default=None, help="scanner profiles site k uses in turn (default all)")
    p.set_defaults(func=_cmd_phantom)

    p = sub.add_parser("partition", help="write one datalist per site (and site-All.json)")
    p.add_argument("data", type=Path)
    p.add_argument("--sites", type=int, required=True)
    p.add_argument("--scheme", choices=["equal", "unequal", "dirichlet", "hybrid", "natural", "csv"], default="equal")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--fractions", type=float, nargs="+", default=None, help="unequal: share of each site")
    p.add_argument("--alpha", type=float, default=0.5, help="dirichlet/hybrid concentration")
    p.add_argument("--attribute", default="scanner", help="dirichlet/hybrid/natural: size, Grade, scanner, ...")
    p.add_argument("--csv", type=Path, default=None, help="csv: FeTS-style Partition_ID,Subject_ID file")
    p.add_argument("--split", type=float, nargs=3, default=[0.6, 0.2, 0.2], help="train/val/test fractions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--annotate",
        nargs="+",
        default=[],
        metavar="SITE=REGIONS",
        help="partial labels: e.g. site-1=WT site-2=TC site-3=ET,TC; unnamed sites annotate every region",
    )
    p.set_defaults(func=_cmd_partition)

    p = sub.add_parser("compare", help="SegViz tables: Dice (SD) per region, paired t-tests, external site")
    p.add_argument("runs", type=Path, nargs="+", help="finished brats_segviz_* runs")
    p.add_argument("--external", type=Path, required=True, help="a fully labelled BraTS-layout folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("check-data", help="check every case; one line per problem, exit 1 if any")
    p.add_argument("data", type=Path)
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("train-central", help="train one model on a (pooled) datalist")
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--datalist", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--val-every", type=int, default=5)
    add_arguments(p)
    p.set_defaults(func=_cmd_train_central)

    p = sub.add_parser("evaluate", help="score a model on a datalist split")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--datalist", type=Path, required=True)
    p.add_argument("--split", choices=["training", "validation", "test"], default="test")
    p.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64], help="sliding-window size")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", help="write a 0/1/2/4 label map for one case")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--case", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64], help="sliding-window size")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("prepare", help="phantom cohort + equal and unequal partitions for the simulated sites")
    p.add_argument("--out", type=Path, default=Path("data/phantom"))
    p.add_argument("--cases", type=int, default=30)
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155])
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("export-jobs", help="write every job definition into jobs/ (or --check that it is current)")
    p.add_argument("--out", type=Path, default=Path("jobs"))
    p.add_argument("--check", action="store_true", help="exit 1 if the folders differ from a fresh export")
    p.set_defaults(func=_cmd_export_jobs)

    p = sub.add_parser("resume-job", help="the job that continues an interrupted run (see brats_fl.jobs.resume)")
    p.add_argument("job", type=Path, help="the job folder that was submitted")
    p.add_argument("--checkpoint", type=Path, required=True, help="the run's last FL_global_model.pt from its server")
    p.add_argument("--out", type=Path, required=True, help="new folder for the resumed job")
    p.set_defaults(func=_cmd_resume_job)

    defaults = JobParams()
    p = sub.add_parser("run", help="run a job in FLARE's simulator and print its test table")
    p.add_argument("job")
    p.add_argument("--sites", type=int, default=defaults.sites)
    p.add_argument("--rounds", type=int, default=defaults.rounds)
    p.add_argument("--local-epochs", type=int, default=defaults.local_epochs)
    p.add_argument("--patch", type=int, nargs=3, default=list(defaults.patch_size))
    p.add_argument("--channels", type=int, nargs="+", default=list(defaults.channels))
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--recipe", default=defaults.recipe)
    p.add_argument("--batch", type=int, default=defaults.batch_size)
    p.add_argument("--fg-ratio", type=float, default=defaults.fg_ratio, help="share of patches centred on tumour")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--personal", default=None, help="keys kept at each site: none, all, head:N, norm, head:N+norm")
    p.add_argument("--finetune-epochs", type=int, default=None, help="local epochs after federated training")
    p.add_argument("--transfer", choices=["full", "diff"], default=defaults.transfer)
    p.add_argument("--resume-from", type=Path, default=None, help="continue from a run's FL_global_model.pt")
    p.add_argument("--passes", type=int, default=None, help="sequential jobs: trips around the sites")
    p.add_argument("--visit-epochs", type=int, default=None, help="sequential jobs: local epochs per visit")
    p.add_argument("--order", choices=["fixed", "shuffle"], default=defaults.order, help="sequential jobs: visit order")
    p.add_argument("--assignment-timeout", type=int, default=defaults.assignment_timeout, help="seconds")
    p.add_argument("--visit-timeout", type=int, default=defaults.visit_timeout, help="seconds")
    hn = defaults.hypernetwork
    p.add_argument("--hn-depth", type=int, default=hn.depth, help="hyperseg jobs: linear layers of the hypernetwork")
    p.add_argument("--hn-width", type=int, default=hn.width, help="hyperseg jobs: units per hidden layer")
    p.add_argument("--embedding-dim", type=int, default=hn.embedding_dim, help="hyperseg _emb job: site embedding")
    p.add_argument("--hn-optimizer", choices=["adam", "sgd"], default=hn.optimizer)
    p.add_argument("--hn-lr", type=float, default=hn.lr, help="hyperseg jobs: the hypernetwork's learning rate")
    p.add_argument("--warmup-rounds", type=int, default=hn.warmup_rounds, help="hyperseg jobs: FedAvg rounds first")
    p.add_argument("--clients-per-round", type=int, default=None, help="segviz jobs: sites sampled per round")
    p.add_argument("--norm-ratio", type=float, default=defaults.norm_ratio, help="refuse updates this far above median")
    p.add_argument("--min-good", type=int, default=defaults.min_good, help="stop if fewer good updates in a round")
    p.add_argument("--min-responses", type=int, default=None, help="FedAvg jobs: sites that must answer a round (all)")
    p.add_argument(
        "--round-wait",
        type=int,
        default=defaults.round_wait,
        help="with --min-responses: seconds to wait for the other sites once that many have answered",
    )
    p.add_argument("--privacy", choices=["none", *PRIVACY], default=defaults.privacy, help="see docs/privacy.md")
    p.add_argument("--privacy-arg", nargs="+", default=[], metavar="KEY=VALUE", help="e.g. fraction=0.1 epsilon=0.1")
    p.add_argument("--quantize", choices=["none", *QUANTIZATION], default=defaults.quantize, help="models on the wire")
    p.add_argument("--audit-transfer", action="store_true", help="each site records what it sends and receives")
    p.add_argument("--site-config", type=Path, default=Path("site_configs/simulation.json"))
    p.add_argument("--workspace", type=Path, default=None, help="default: runs/<job>-<time>")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("table", help="results table of finished runs: each site's final model on its own test split")
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--per-site", action="store_true", help="a row per site, and the global model's where there is one")
    p.set_defaults(func=_cmd_table)

    p = sub.add_parser("report", help="results table, learning curves, per-site bars, overlays and index.html")
    p.add_argument("runs", type=Path, nargs="+", help="finished runs: simulator workspaces or downloaded results")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cases", nargs="+", default=None, help="test case ids to draw (default: one all runs test)")
    p.add_argument("--data-root", type=Path, default=None, help="downloaded results: where the cases are")
    p.add_argument("--datalist", type=Path, default=None, help="downloaded results: a datalist or a folder of them")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the overlays' inference")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("demo", help="phantom cohort -> FedAvg in FLARE's simulator -> results table and report")
    p.add_argument("--workspace", type=Path, default=Path("runs/demo"))
    p.add_argument("--cases", type=int, default=30)
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--rounds", type=int, default=defaults.rounds)
    p.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155])
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (DataError, FileNotFoundError, FileExistsError, ValueError, RuntimeError, TimeoutError) as err:
        print(f"brats-fl {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
