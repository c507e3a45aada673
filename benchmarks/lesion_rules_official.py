"""Cross-check of ``brats_fl.seg.lesions`` against the official BraTS lesion-wise code, rule by rule (issue 39, item 4).

    python benchmarks/lesion_rules_official.py --data data/les --cases 6 --out runs/lesion_check [--json FILE]

The official code is AGPL-licensed, so it is never a dependency of brats-fl: it runs in a scratch environment
outside the repository, which this script calls as a separate process (``--venv``, default ``/tmp/brats-eval``, with
``brats-evaluation``, ``medpy``, ``connected-components-3d``, ``nibabel`` and ``pandas`` installed) on checkouts of
``rachitsaluja/BraTS-2023-Metrics`` and ``rachitsaluja/BraTS-2024-Metrics`` (``--official``, default
``/tmp/brats-official``, one folder each); the 2023 code needs its own pins (pandas 1.3.4: it calls
``DataFrame.append`` and replaces values in a column of arrays, which later pandas refuse; numpy 1.24 for ``np.Inf``),
so it runs in a second environment (``--venv-2023``, default ``/tmp/brats-eval-2023``, Python 3.10 with the
repository's requirements.txt). Without them the script says so and exits 0.

For each of the first ``--cases`` cases of a phantom cohort in the 2023 names and labels (``brats-fl phantom
--release 2023``), it writes simple perturbed predictions of the true label map (dilated, eroded, speckled with small
false components and cut in two) and scores every (prediction, truth) pair per region (WT, TC, ET) by each rule, here
and with the official code: BraTS-2023-Metrics ``metrics.get_LesionWiseResults(..., "BraTS-GLI")``,
BraTS-2024-Metrics ``metrics_GLI.get_LesionWiseResults(..., "BraTS-GLI")`` and BraTS_evaluation's
``evaluate_single_exam`` with its bundled ``gli`` configuration (``sq_dsc``, ``sq_hd95``, ``tp``, ``fp``, ``fn``).
Prints a markdown table per rule: pairs compared, pairs whose counts (matched, false positives, false negatives)
agree, and the largest and mean absolute difference of lesion-wise Dice and HD95, and writes every figure as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

PERTURBATIONS = ("dilated", "eroded", "speckled", "cut")
REGION_KEYS = ("WT", "TC", "ET")


def _official(pairs: list[dict], rules: list[str], official: Path, workdir: Path) -> list[dict]:
    """Driver mode (run by a scratch environment's Python): the official figures of every pair by ``rules``."""
    import os

    def table(df) -> dict:
        rows = {r["Labels"]: r for r in df.to_dict("records")}
        return {
            k: {
                "dice": float(rows[k]["LesionWise_Score_Dice"]),
                "hd95": float(rows[k]["LesionWise_Score_HD95"]),
                "matched": int(rows[k]["Num_TP"]),
                "false_positives": int(rows[k]["Num_FP"]),
                "false_negatives": int(rows[k]["Num_FN"]),
            }
            for k in REGION_KEYS
        }

    def panoptica(found: dict) -> dict:
        out = {}
        for k in REGION_KEYS:
            r = found[k.lower()]
            out[k] = {
                "dice": float("nan") if r["sq_dsc"] is None else float(r["sq_dsc"]),
                "hd95": float("nan") if r["sq_hd95"] is None else float(r["sq_hd95"]),
                "matched": int(r["tp"]),
                "false_positives": int(r["fp"]),
                "false_negatives": int(r["fn"]),
            }
        return out

    scorers = {}
    for rule, folder, module in (
        ("2023", "BraTS-2023-Metrics", "metrics"),
        ("2024", "BraTS-2024-Metrics", "metrics_GLI"),
    ):
        if rule in rules:
            sys.path.insert(0, str(official / folder))
            scorers[rule] = __import__(module).get_LesionWiseResults
    if "2025" in rules:
        from brats_evaluation import config_path, evaluate_single_exam
        from panoptica import Panoptica_Evaluator

        evaluator = Panoptica_Evaluator.load_from_config(str(config_path("gli")))
    out = []
    for pair in pairs:
        found = {"name": pair["name"]}
        here = os.getcwd()
        os.chdir(workdir)  # the 2024 code writes its intermediate files under the working directory
        try:
            if "2023" in scorers:
                found["2023"] = table(scorers["2023"](pair["pred"], pair["truth"], "BraTS-GLI"))
            if "2024" in scorers:
                found["2024"] = table(scorers["2024"](pair["pred"], pair["truth"], "BraTS-GLI")[0])
        finally:
            os.chdir(here)
        if "2025" in rules:
            found["2025"] = panoptica(evaluate_single_exam(pair["pred"], pair["truth"], pair["name"], evaluator))
        out.append(found)
    return out


def _perturb(regions, kind: str, rng):
    """A prediction (region channels, REGIONS order) made from the truth's by one simple perturbation."""
    import numpy as np
    from brats_fl.data.labels import REGIONS
    from scipy import ndimage

    tc, wt, et = (REGIONS.index(r) for r in ("TC", "WT", "ET"))
    pred = regions.copy()
    if kind == "dilated":
        pred[wt] = ndimage.binary_dilation(regions[wt], iterations=2)
        pred[tc] = ndimage.binary_dilation(regions[tc], iterations=1)
        pred[et] = ndimage.binary_dilation(regions[et], iterations=1) & pred[tc]
    elif kind == "eroded":
        for c in range(3):
            pred[c] = ndimage.binary_erosion(regions[c], iterations=2)
    elif kind == "speckled":
        brain = np.argwhere(np.ones(regions.shape[1:], bool))
        for _ in range(12):  # small false components of every region, 1 to 64 voxels, anywhere
            x, y, z = brain[rng.integers(len(brain))]
            size = int(rng.integers(1, 5))
            box = (slice(x, x + size), slice(y, y + size), slice(z, z + size))
            depth = int(rng.integers(1, 4))  # WT only, WT and TC, or all three
            for c in (wt, tc, et)[:depth]:
                pred[c][box] = True
    elif kind == "cut":
        found = np.argwhere(regions[wt])
        if len(found):
            middle = int(np.median(found[:, 0]))
            pred[:, middle - 1 : middle + 2] = False  # a slab of 3 voxels through the tumour: two components
    return pred


def _ours(pred, truth, spacing) -> dict:
    from brats_fl.data.labels import REGIONS
    from brats_fl.seg.lesions import RULES, case_lesion_scores

    out = {}
    for rule in RULES:
        scores = case_lesion_scores(pred, truth, spacing, rule)
        out[rule] = {
            k: {
                "dice": scores[REGIONS.index(k)].dice,
                "hd95": scores[REGIONS.index(k)].hd95,
                "matched": scores[REGIONS.index(k)].matched,
                "false_positives": scores[REGIONS.index(k)].false_positives,
                "false_negatives": scores[REGIONS.index(k)].false_negatives,
            }
            for k in REGION_KEYS
        }
    return out


def _summary(results: list[dict]) -> dict:
    import math

    summary = {}
    for rule in ("2023", "2024", "2025"):
        rows = [(r["ours"][rule][k], r["official"][rule][k]) for r in results for k in REGION_KEYS]
        counts = ("matched", "false_positives", "false_negatives")
        same = [all(a[c] == b[c] for c in counts) for a, b in rows]
        # the official 2025 figure is NaN where a region is empty in both (ours: 1 and 0) or has no matched pair
        compared = [(a, b) for a, b in rows if not math.isnan(b["dice"])]
        dice = [abs(a["dice"] - b["dice"]) for a, b in compared]
        hd = [abs(a["hd95"] - b["hd95"]) for a, b in compared if math.isfinite(b["hd95"])]
        summary[rule] = {
            "region_pairs": len(rows),
            "counts_agree": sum(same),
            "dice_compared": len(dice),
            "dice_max_abs_diff": max(dice, default=0.0),
            "dice_mean_abs_diff": sum(dice) / len(dice) if dice else 0.0,
            "hd95_compared": len(hd),
            "hd95_max_abs_diff": max(hd, default=0.0),
            "hd95_mean_abs_diff": sum(hd) / len(hd) if hd else 0.0,
            "official_nan": len(rows) - len(compared),
        }
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/les"), help="a phantom cohort in the 2023 names")
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("runs/lesion_check"), help="predictions and scratch files")
    parser.add_argument("--venv", type=Path, default=Path("/tmp/brats-eval"), help="brats-evaluation, medpy")
    parser.add_argument(
        "--venv-2023", type=Path, default=Path("/tmp/brats-eval-2023"), help="Python 3.10, 2023's requirements.txt"
    )
    parser.add_argument("--official", type=Path, default=Path("/tmp/brats-official"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--driver", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rules", default="2023,2024,2025", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.driver:  # run by the scratch environment: official figures of the pairs listed in the file
        pairs = json.loads(args.driver.read_text())
        results = _official(pairs, args.rules.split(","), args.official.resolve(), args.out.resolve() / "official_tmp")
        print(json.dumps(results))
        return 0

    pythons = {"2023": args.venv_2023 / "bin" / "python", "2024,2025": args.venv / "bin" / "python"}
    needed = (*pythons.values(), args.official / "BraTS-2023-Metrics", args.official / "BraTS-2024-Metrics")
    missing = [p for p in needed if not p.exists()]
    if missing:
        print(f"skipped: the scratch environment or the official code is absent ({', '.join(map(str, missing))})")
        return 0

    import datetime
    import platform

    import nibabel as nib
    import numpy as np
    from brats_fl.data.labels import labels_to_regions, regions_to_labels
    from brats_fl.data.layout import find_cases

    rng = np.random.default_rng(args.seed)
    cases = find_cases(args.data)[: args.cases]
    (args.out / "pred").mkdir(parents=True, exist_ok=True)
    (args.out / "truth").mkdir(parents=True, exist_ok=True)
    (args.out / "official_tmp").mkdir(parents=True, exist_ok=True)
    pairs, ours = [], {}
    for case in cases:
        label = nib.load(str(case.files["seg"]))
        spacing = tuple(float(z) for z in label.header.get_zooms()[:3])
        truth = labels_to_regions(np.asarray(label.dataobj), case.convention).astype(bool)
        truth_file = args.out / "truth" / f"{case.case_id}.nii.gz"
        nib.save(nib.Nifti1Image(regions_to_labels(truth, case.convention), label.affine), str(truth_file))
        for kind in PERTURBATIONS:
            pred = _perturb(truth, kind, rng)
            name = f"{case.case_id}_{kind}"
            pred_file = args.out / "pred" / f"{name}.nii.gz"
            nib.save(nib.Nifti1Image(regions_to_labels(pred, case.convention), label.affine), str(pred_file))
            pairs.append({"name": name, "pred": str(pred_file.resolve()), "truth": str(truth_file.resolve())})
            ours[name] = _ours(pred, truth, spacing)
    listing = args.out / "pairs.json"
    listing.write_text(json.dumps(pairs))
    official: dict[str, dict] = {p["name"]: {} for p in pairs}
    for rules, python in pythons.items():
        command = [str(python), __file__, "--driver", str(listing), "--rules", rules, "--official", str(args.official)]
        found = subprocess.run([*command, "--out", str(args.out)], capture_output=True, text=True)
        if found.returncode:
            raise SystemExit(f"the official code ({rules}) failed:\n{found.stderr[-3000:]}")
        for r in json.loads(found.stdout.strip().splitlines()[-1]):
            official[r.pop("name")] |= r
    results = [
        {"name": p["name"], "ours": ours[p["name"]], "official": {k: official[p["name"]][k] for k in ours[p["name"]]}}
        for p in pairs
    ]
    summary = _summary(results)
    print(f"{len(cases)} cases x {len(PERTURBATIONS)} perturbations ({', '.join(PERTURBATIONS)}), 3 regions each\n")
    print("| rule | region pairs | counts agree | Dice compared | max abs diff Dice | mean abs diff Dice "
          "| HD95 compared | max abs diff HD95 (mm) | mean abs diff HD95 (mm) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for rule, s in summary.items():
        print(f"| {rule} | {s['region_pairs']} | {s['counts_agree']} | {s['dice_compared']} | "
              f"{s['dice_max_abs_diff']:.4f} | {s['dice_mean_abs_diff']:.4f} | {s['hd95_compared']} | "
              f"{s['hd95_max_abs_diff']:.2f} | {s['hd95_mean_abs_diff']:.2f} |")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"date": datetime.date.today().isoformat(), "machine": platform.platform(), "cases": len(cases)}
        args.json.write_text(json.dumps({"meta": meta, "summary": summary, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
