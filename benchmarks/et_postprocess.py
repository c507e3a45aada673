"""What ET post-processing does to a benchmark's scores (issue 20, item 6): each finished run, with and without it.

    python benchmarks/et_postprocess.py --bench runs/bench [--partitions iid] [--json runs/et_postprocess.json]

For every finished run of a ``brats-fl benchmark`` folder and each of its sites, the model the site ended with
(``personalised_model.pt``) is scored on the site's validation split, and the threshold that a job with
``--et-min-volume auto`` would choose there is chosen the same way (``brats_fl.seg.postprocess``). The site's test
cases, as the run scored them without post-processing (the run's ``summary.json``), are then rescored with that
threshold: post-processing only clears the ET of a case whose predicted ET is smaller than it, so a cleared case's
ET Dice becomes 1 where its truth has no ET and 0 where it has, and its ET HD95 0 or 373.13 mm (BraTS's values);
every other score is unchanged. Prints, per algorithm, the mean ET Dice and HD95 without and with it, the paired
difference with its 95 % CI over seeds and cases and the Wilcoxon p, the thresholds chosen and the cases changed,
and, as an upper bound of what any threshold could do, the candidate best on the test cases themselves, as JSON
with the date and machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
from collections import defaultdict
from pathlib import Path

from brats_fl.data.datalist import load_datalist
from brats_fl.data.loading import eval_loader
from brats_fl.results import benchmark as bench
from brats_fl.results.stats import bootstrap_ci, score_matrix, wilcoxon_p
from brats_fl.seg.inference import load_for_inference
from brats_fl.seg.metrics import HD95_UNDEFINED
from brats_fl.seg.postprocess import CANDIDATES, choose_et_min_volume, et_dice_after, et_dice_at


def _site_dirs(summary_file: Path) -> dict[str, Path]:
    """Each site's output folder of a run (beside the server's run folder in the simulator's workspace)."""
    job_root = bench.server_run(summary_file).parents[1]
    return {p.parents[1].name: p for p in job_root.glob("site-*/simulate_job/brats_fl")}


def _threshold(site_dir: Path, params: dict, cache: Path) -> float:
    """The ET threshold a job with ``--et-min-volume auto`` chooses at this site: best on its validation split."""
    data = json.loads((site_dir / "site.json").read_text())["data"]
    datalist = load_datalist(Path(data["datalist"]), Path(data["data_root"]), grid_required=False)
    trainer = load_for_inference(site_dir / "personalised_model.pt", patch_size=tuple(params["patch_size"]))
    val = eval_loader(datalist.items("validation"), cache, spacing=params["spacing"])
    return choose_et_min_volume(trainer.evaluate(val, per_case=True, distances=False)["per_case"])


def _post(row: dict, threshold: float) -> tuple[float, float]:
    """A test case's ET Dice and HD95 had its predicted ET below ``threshold`` been cleared."""
    if row["volume_ET"] >= threshold:
        return row["dice_ET"], row["hd95_ET"]
    return et_dice_after(row, threshold), 0.0 if row["volume_truth_ET"] == 0 else HD95_UNDEFINED


def rescore(bench_dir: Path, partitions: list[str]) -> dict:
    """Every finished run's ET scores without and with post-processing, grouped by partition and algorithm."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for path in sorted(bench_dir.glob("runs/*/*/seed*/summary.json")):
        summary = json.loads(path.read_text())
        if summary["partition"] not in partitions:
            continue
        sites = _site_dirs(path)
        thresholds = {site: _threshold(d, summary["params"], bench_dir / "cache") for site, d in sites.items()}
        rows = [r for r in summary["per_case"] if "dice_ET" in r]
        post = [_post(r, thresholds[r["site"]]) for r in rows]
        groups[(summary["partition"], summary["algorithm"])].append(
            {
                "seed": summary["seed"],
                "thresholds_mm3": thresholds,
                "cases_changed": sum(p[0] != r["dice_ET"] for p, r in zip(post, rows, strict=True)),
                # an upper bound, not a method: the candidate best on the test cases themselves
                "best_on_test": max((round(et_dice_at(rows, t), 12), -t) for t in CANDIDATES),
                "dice": {r["case_id"]: r["dice_ET"] for r in rows},
                "dice_post": {r["case_id"]: p[0] for p, r in zip(post, rows, strict=True)},
                "hd95": {r["case_id"]: r["hd95_ET"] for r in rows},
                "hd95_post": {r["case_id"]: p[1] for p, r in zip(post, rows, strict=True)},
            }
        )
    out = {}
    for (partition, algorithm), seeds in groups.items():
        cases = sorted(seeds[0]["dice"])

        def matrix(key: str, seeds: list[dict] = seeds, cases: list[str] = cases):
            return score_matrix([s[key] for s in seeds], cases)

        def interval(a, b=None) -> list[float]:
            ci = bootstrap_ci(a, b)
            return [round(ci.estimate, 4), round(ci.low, 4), round(ci.high, 4)]

        before, after = matrix("dice"), matrix("dice_post")
        out[f"{partition}/{algorithm}"] = {
            "seeds": len(seeds),
            "cases": len(cases),
            "et_dice": interval(before),
            "et_dice_post": interval(after),
            # the same run with and without: seeds paired as well as cases
            "et_dice_difference": interval(after - before),
            "p_wilcoxon": wilcoxon_p((after - before).mean(axis=0)),
            "et_hd95_mm": interval(matrix("hd95")),
            "et_hd95_post_mm": interval(matrix("hd95_post")),
            "thresholds_mm3": [s["thresholds_mm3"] for s in seeds],
            "cases_changed": [s["cases_changed"] for s in seeds],
            "best_on_test": [{"threshold_mm3": -s["best_on_test"][1], "et_dice": s["best_on_test"][0]} for s in seeds],
        }
    return {"date": datetime.date.today().isoformat(), "machine": bench.machine(), "runs": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", type=Path, required=True, help="a brats-fl benchmark folder with finished runs")
    parser.add_argument("--partitions", nargs="+", default=list(bench.PARTITIONS))
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    result = rescore(args.bench.resolve(), args.partitions)
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
