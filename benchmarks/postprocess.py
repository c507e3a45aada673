"""What connected-component post-processing does to test scores, voxel- and lesion-wise (issue 39, item 5).

    python benchmarks/postprocess.py --model runs/central/best_model.pt --data-root DATA --datalist LIST [--json FILE]
    python benchmarks/postprocess.py --speckled 0 --data-root DATA --datalist LIST   # no model: see below

The volumes are chosen per region on the datalist's validation split as ``--min-volume auto`` chooses them at a site
(``brats_fl.seg.postprocess.choose_min_volumes``); the test split is then scored without and with the removal of
smaller predicted components, by every lesion-wise rule (2023, 2024, 2025). Prints per rule and region the voxel-wise
Dice, the lesion-wise Dice and the mean false-positive lesions per case, without -> with, and writes them as JSON with
the date and machine.

``--speckled SEED`` replaces the model by the truth with small false components added (12 per case, 1 to 64 voxels,
``benchmarks/lesion_rules_official.py``'s ``speckled`` perturbation): a check of the choice and the removal on
predictions whose only errors are specks, not a measurement of a trained model.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import numpy as np
import torch
from brats_fl.data.datalist import load_datalist
from brats_fl.data.labels import DISPLAY_ORDER
from brats_fl.data.loading import ANNOTATED, eval_loader
from brats_fl.seg.lesions import RULES
from brats_fl.seg.metrics import RegionMetrics
from brats_fl.seg.postprocess import Choice, choose_min_volumes, remove_small_components
from monai.data import MetaTensor


def _speckled(truth: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    from lesion_rules_official import _perturb  # the script's own folder is on the path

    return torch.stack([torch.from_numpy(_perturb(t.bool().numpy(), "speckled", rng)) for t in truth]).float()


def _predictions(loader, trainer, rng):
    """(prediction, truth, spacing, release, annotated) of every case, from the model or speckled truth."""
    for batch in loader:
        label = batch["label"]
        spacing = [tuple(map(float, p)) for p in label.pixdim] if isinstance(label, MetaTensor) else None
        truth = torch.as_tensor(label).float()
        if trainer is None:
            pred = _speckled(truth, rng)
        else:
            pred = (torch.sigmoid(trainer.infer(batch["image"])) > 0.5).float().cpu()
        yield pred, truth, spacing, batch["release"], batch[ANNOTATED]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path)
    source.add_argument("--speckled", type=int, metavar="SEED")
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--datalist", type=Path, required=True)
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    rng = np.random.default_rng(args.speckled or 0)
    trainer = None
    if args.model:
        from brats_fl.seg.inference import load_for_inference

        trainer = load_for_inference(args.model, tuple(args.patch), args.threads)
    grid = trainer is None or trainer.config.spacing is None
    datalist = load_datalist(args.datalist, args.data_root, grid_required=grid)
    val, test = eval_loader(datalist.items("validation")), eval_loader(datalist.items("test"))
    if trainer is not None:
        volumes, notes = choose_min_volumes(trainer, val)
    else:
        choice = Choice()
        for pred, truth, spacing, releases, annotated in _predictions(val, None, rng):
            for b in range(pred.shape[0]):
                choice.add(pred[b].bool().numpy(), truth[b].bool().numpy(), spacing[b] if spacing else (1.0,) * 3,
                           annotated[b].bool().tolist(), releases[b])  # fmt: skip
        volumes, notes = choice.volumes()
    print(f"volumes chosen on {len(datalist.items('validation'))} validation cases: {volumes} mm³ {notes or ''}")

    scores = {(rule, post): RegionMetrics(lesion_wise=True, lesion_rule=rule) for rule in RULES for post in (0, 1)}
    for pred, truth, spacing, releases, annotated in _predictions(test, trainer, rng):
        cleaned = remove_small_components(pred, spacing, volumes)
        for (_, post), metrics in scores.items():
            metrics.update(cleaned if post else pred, truth, annotated, spacing=spacing, releases=list(releases))
    table = {f"{rule}/{'with' if post else 'without'}": m.aggregate() for (rule, post), m in scores.items()}
    cases = int(next(iter(table.values()))["cases"])
    print(f"\n{cases} test cases; without -> with post-processing\n")
    print("| rule | region | voxel Dice | lesion-wise Dice | false-positive lesions per case |")
    print("|---|---|---|---|---|")
    for rule in RULES:
        a, b = table[f"{rule}/without"], table[f"{rule}/with"]
        for r in DISPLAY_ORDER:
            print(f"| {rule} | {r} | {a[f'dice_{r}']:.3f} -> {b[f'dice_{r}']:.3f} | "
                  f"{a[f'lesion_dice_{r}']:.3f} -> {b[f'lesion_dice_{r}']:.3f} | "
                  f"{a[f'lesions_fp_{r}']:.2f} -> {b[f'lesions_fp_{r}']:.2f} |")  # fmt: skip
    if args.json:
        meta = {"date": datetime.date.today().isoformat(), "machine": platform.platform(), "model": str(args.model),
                "speckled": args.speckled, "datalist": str(args.datalist)}  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "volumes": volumes, "notes": notes, "scores": table}, indent=1))


if __name__ == "__main__":
    main()
