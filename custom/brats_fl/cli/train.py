"""``brats-fl train-central``, ``evaluate``, ``predict`` and ``export-bundle``: one model, outside FLARE (the work:
``brats_fl.seg``)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from brats_fl.settings.params import SITE_ONLY, by_name, parse_min_volume


def add_training_options(parser: argparse.ArgumentParser) -> None:
    """The training options, from the jobs' parameter schema; the learning rate, momentum, channels and normalisation
    default to the recipe's and the model's (``brats_fl.seg.trainer.config_from_args``). With no server here, a poly
    recipe decays the rate per epoch over ``--epochs``."""
    for name in ("recipe", "patch_size", "spacing", "amp", "batch_size", "fg_ratio", "seed"):
        param = by_name(name)
        param.add_to(parser, default=param.default)
    by_name("lr").add_to(parser, default=None)
    by_name("momentum").add_to(parser, default=None)
    by_name("network").add_to(parser, default=by_name("network").default)
    by_name("channels").add_to(parser, default=None)
    by_name("norm").add_to(parser, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--multi-head", action="store_true", help=SITE_ONLY["multi_head"][1])
    parser.add_argument("--partial-labels", choices=["ignore", "background"], default=None, help="unannotated regions")


def _cmd_train_central(args: argparse.Namespace) -> None:
    from brats_fl.data.datalist import load_datalist
    from brats_fl.data.loading import eval_loader
    from brats_fl.results.report import format_table
    from brats_fl.seg.trainer import Trainer, config_from_args, fit, make_train_loader

    config = config_from_args(args, total_epochs=args.epochs)
    datalist = load_datalist(args.datalist, args.data_root, grid_required=config.spacing is None)
    if not datalist.items("validation"):
        raise ValueError(f"{args.datalist}: no validation case; every epoch is scored on it and the best model kept")
    trainer = Trainer(config)
    train = make_train_loader(datalist.items("training"), config)
    # scored every epoch at the training grid (cheap), as a site scores its rounds; the test split on its own grid
    val = eval_loader(datalist.items("validation"), spacing=config.spacing)
    (args.out).mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(
        json.dumps({"train": config.to_dict(), "epochs": args.epochs, "datalist": str(args.datalist)}, indent=1)
    )
    start = time.perf_counter()
    fit(trainer, train, val, args.epochs, args.out, val_every=args.val_every)
    test_items = datalist.items("test")
    if test_items:
        metrics = _scored(args, trainer, datalist, test_items)
        (args.out / "test_metrics.json").write_text(json.dumps(metrics, indent=1))
        print(f"\ntest split of {datalist.path.name}, last model, {time.perf_counter() - start:.0f} s:")
        print(format_table([("central", metrics)]))


def _scored(args: argparse.Namespace, trainer, datalist, items: list[dict]) -> dict:
    """``items`` scored per case by ``--lesion-rule``, after the post-processing ``--min-volume`` asks for (auto:
    chosen on the datalist's validation split, as a job's site chooses), recorded as ``min_volume``."""
    from brats_fl.data.labels import REGIONS
    from brats_fl.data.loading import eval_loader
    from brats_fl.seg.postprocess import choose_min_volumes

    volumes, notes = parse_min_volume(args.min_volume), {}
    validation = datalist.items("validation")
    if volumes == "auto" and validation:
        volumes, notes = choose_min_volumes(trainer, eval_loader(validation), args.lesion_rule)
    elif volumes == "auto":  # nothing to choose on: as a split too small to choose
        volumes = dict.fromkeys(REGIONS, 0.0)
        notes = dict.fromkeys(REGIONS, f"{datalist.path.name} has no validation case: every component kept")
    metrics = trainer.evaluate(
        eval_loader(items), per_case=True, min_volume=None if volumes == "none" else volumes,
        lesion_rule=args.lesion_rule,
    )  # fmt: skip
    if volumes != "none":
        metrics["min_volume"] = {"volumes": volumes} | ({"notes": notes} if notes else {})
        print(f"post-processing: components below {volumes} mm³ removed" + (f" ({notes})" if notes else ""))
    return metrics


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from brats_fl.data.datalist import load_datalist
    from brats_fl.results.report import format_table
    from brats_fl.seg.inference import load_for_inference

    trainer = load_for_inference(args.model, tuple(args.patch), args.threads)
    datalist = load_datalist(args.datalist, args.data_root, grid_required=trainer.config.spacing is None)
    metrics = _scored(args, trainer, datalist, datalist.items(args.split))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(metrics, indent=1))
    print(format_table([(f"{args.model.name} on {datalist.site} {args.split}", metrics)]))


def _cmd_predict(args: argparse.Namespace) -> None:
    from brats_fl.seg.inference import input_cases, predict_case, predict_cases

    volumes = parse_min_volume(args.min_volume)
    if volumes == "auto":
        raise SystemExit("predict --min-volume: auto chooses on a validation split, which predict has none of; give "
                         "volumes (chosen by evaluate --min-volume auto or recorded in a run)")  # fmt: skip
    settings = {"threads": args.threads, "min_volume": None if volumes == "none" else volumes, "tta": args.tta}
    if args.case is not None:
        if args.data_root is not None or args.split is not None:
            raise ValueError("--data-root and --split are for --input DATALIST, not --case")
        path = predict_case(args.model, args.case, args.out, tuple(args.patch), **settings)
        print(f"wrote {path}")
        return
    cases = input_cases(args.input, args.data_root, args.split or "test")
    written = predict_cases(args.model, cases, args.out, tuple(args.patch), **settings)
    print(f"wrote {len(written)} label map(s) to {args.out}")


def _cmd_export_bundle(args: argparse.Namespace) -> None:
    from brats_fl.seg.bundle import export_bundle

    out = export_bundle(args.run, args.out, args.site)
    print(f"wrote {out}: python -m monai.bundle run --config_file {out}/configs/inference.json --bundle_root {out} ")
    print("  --dataset_dir CASES --output_dir OUT")


_MODEL_HELP = (
    "a saved model: a site's personalised_model.pt, a central run's, or the FL_global_model.pt of a job without "
    "personal layers, in its server app folder (brats_fl.seg.inference.untrained_layers)"
)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``train-central``, ``evaluate``, ``predict`` and ``export-bundle``."""
    p = sub.add_parser("train-central", help="train one model on a (pooled) datalist")
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--datalist", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--val-every", type=int, default=5)
    by_name("min_volume").add_to(p, default=by_name("min_volume").default)
    by_name("lesion_rule").add_to(p, default="auto")
    add_training_options(p)
    p.set_defaults(func=_cmd_train_central)

    p = sub.add_parser("evaluate", help="score a model on a datalist split")
    p.add_argument("--model", type=Path, required=True, help=_MODEL_HELP)
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--datalist", type=Path, required=True)
    p.add_argument("--split", choices=["training", "validation", "test"], default="test")
    p.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64], help="sliding-window size")
    p.add_argument("--json", type=Path, default=None)
    by_name("min_volume").add_to(p, default=by_name("min_volume").default)
    by_name("lesion_rule").add_to(p, default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", help="write the label map of one case, or of every case of a folder or datalist")
    p.add_argument("--model", type=Path, nargs="+", required=True, help=f"{_MODEL_HELP}; several: their ensemble")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--case", type=Path, help="one case folder; --out is then the label map's file")
    source.add_argument(
        "--input",
        type=Path,
        metavar="FOLDER_OR_DATALIST",
        help="a folder of case folders, or a datalist (with --data-root, --split); --out is then a folder that "
        "receives <case id>.nii.gz, each in its release's labels",
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data-root", type=Path, default=None, help="the data root of a datalist's relative paths")
    p.add_argument("--split", choices=["training", "validation", "test"], default=None, help="a datalist's (test)")
    p.add_argument(
        "--tta", action="store_true", help="average over the 8 flips of the three axes (nnU-Net's mirroring)"
    )
    by_name("min_volume").add_to(p, default="none")
    p.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64], help="sliding-window size")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("export-bundle", help="write a finished run's model as a MONAI bundle")
    p.add_argument("run", type=Path, help="a brats-fl run folder, or a train-central output folder (its best model)")
    p.add_argument("--site", default=None, help="that site's own final model instead of the server's global model")
    p.add_argument("--out", type=Path, required=True, help="new folder: configs/metadata.json, inference.json, models/")
    p.set_defaults(func=_cmd_export_bundle)
