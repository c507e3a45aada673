"""The ``brats-fl`` command: data preparation, checks, baselines, evaluation, prediction and the demo."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from brats_fl.data.checks import DataError, check_cases


def _cmd_phantom(args: argparse.Namespace) -> None:
    from brats_fl.data.phantom import generate_cohort

    start = time.perf_counter()
    cases = generate_cohort(args.out, cases=args.cases, sites=args.sites, seed=args.seed, shape=tuple(args.shape))
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
    written = write_datalists(
        args.data, assignment, args.out, split=args.split, seed=args.seed, description=description
    )
    for name, path in written.items():
        doc = json.loads(path.read_text())
        sizes = "/".join(str(len(doc[s])) for s in ("training", "validation", "test"))
        print(f"{name}: train/val/test {sizes} -> {path}")


def _cmd_check(args: argparse.Namespace) -> int:
    from brats_fl.data.layout import find_cases

    cases = find_cases(args.data)
    problems = check_cases(cases)
    for p in problems:
        print(p)
    print(f"checked {len(cases)} case(s): {len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


def _train_config(args: argparse.Namespace):
    from brats_fl.training import TrainConfig

    values = {
        "recipe": args.recipe,
        "patch_size": args.patch,
        "batch_size": args.batch,
        "seed": args.seed,
        "total_epochs": args.epochs,
        "threads": args.threads,
    }
    if args.channels:
        values["model"] = {"channels": args.channels, "strides": [2] * (len(args.channels) - 1)}
    if args.lr is not None:
        values["lr"] = args.lr
    return TrainConfig.from_dict(values)


def _cmd_train_central(args: argparse.Namespace) -> None:
    from brats_fl.data.datalist import load_datalist
    from brats_fl.data.loading import eval_loader, train_loader
    from brats_fl.report import format_table
    from brats_fl.training import Trainer, fit

    config = _train_config(args)
    datalist = load_datalist(args.datalist, args.data_root)
    trainer = Trainer(config)
    train = train_loader(
        datalist.items("training"), config.patch_size, config.batch_size, config.samples_per_case, config.seed
    )
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
    from brats_fl.report import format_table
    from brats_fl.training import TrainConfig, Trainer, load_model

    model = load_model(args.model)
    datalist = load_datalist(args.datalist, args.data_root)
    trainer = Trainer(
        TrainConfig(model=model.config(), patch_size=tuple(args.patch), threads=args.threads), model=model
    )
    metrics = trainer.evaluate(eval_loader(datalist.items(args.split)), per_case=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(metrics, indent=1))
    print(format_table([(f"{args.model.name} on {datalist.site} {args.split}", metrics)]))


def _cmd_predict(args: argparse.Namespace) -> None:
    from brats_fl.inference import predict_case

    path = predict_case(args.model, args.case, args.out, patch_size=tuple(args.patch), threads=args.threads)
    print(f"wrote {path}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from brats_fl.demo import run_demo

    run_demo(args.out, cases=args.cases, sites=args.sites, epochs=args.epochs, shape=tuple(args.shape))


def _add_training_options(p: argparse.ArgumentParser, epochs: int) -> None:
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--recipe", choices=["adam_dice", "nnunet"], default="adam_dice")
    p.add_argument("--lr", type=float, default=None, help="overrides the recipe's learning rate")
    p.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--channels", type=int, nargs="+", default=None, help="U-Net channels per level")
    p.add_argument("--val-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brats-fl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantom", help="write a synthetic BraTS-layout cohort")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cases", type=int, default=30)
    p.add_argument("--sites", type=int, default=3, help="number of scanner profiles")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155])
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
    p.set_defaults(func=_cmd_partition)

    p = sub.add_parser("check-data", help="check every case; one line per problem, exit 1 if any")
    p.add_argument("data", type=Path)
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("train-central", help="train one model on a (pooled) datalist")
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--datalist", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    _add_training_options(p, epochs=50)
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

    p = sub.add_parser("demo", help="phantom cohort -> training -> results table")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("--cases", type=int, default=30)
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155])
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (DataError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"brats-fl {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
