"""How much two raters of the hard phantom agree, per region, against BraTS's raters (issue 38, item 5).

    python benchmarks/phantom_raters.py --cases 12 [--shape 240 240 155] [--seed 0] [--json out.json] \
        [--figure docs/figures/phantom_raters.png]

Generates ``--cases`` cases of the benchmark's FeTS-like cohort (the three hospitals of ``brats_fl.data.cohorts``,
in the ``iid`` partition's order) as the hard phantom with two raters (``generate_cases(hard=True, raters=2)``) into
a temporary folder, and scores rater 2's label map against rater 1's (the case's own label file) with Dice per
region, WT, TC and ET. A region that neither rater labels (ET of a non-enhancing case) has no Dice and is left out
of that region's mean. Prints per-case Dice and the summary (mean, SD, median, range) beside Menze et al.'s
inter-rater Dice (IEEE TMI 2015), and draws, with ``--figure``, an axial slice of three cases with both raters'
outlines.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from brats_fl.data.cohorts import PARTITIONS  # noqa: E402
from brats_fl.data.labels import REGIONS, labels_to_regions  # noqa: E402
from brats_fl.data.layout import find_cases  # noqa: E402
from brats_fl.data.phantom import generate_cases, rater_file  # noqa: E402

#: Menze et al., "The Multimodal Brain Tumor Image Segmentation Benchmark (BRATS)", IEEE TMI 34(10), 2015: the
#: agreement of the expert raters with one another, Dice in the range of 74 % to 85 % over the sub-regions
MENZE_RANGE = (0.74, 0.85)


def dice(a: np.ndarray, b: np.ndarray) -> float | None:
    """Dice of two masks; None when both are empty (no region to agree on)."""
    total = int(a.sum()) + int(b.sum())
    return None if total == 0 else 2 * int(np.logical_and(a, b).sum()) / total


def score(cases: list) -> list[dict]:
    """Each case's Dice of rater 2 against rater 1 per region (the regions' order of ``REGIONS``)."""
    rows = []
    for case in cases:
        first = np.asarray(nib.load(str(case.files["seg"])).dataobj)
        second = np.asarray(nib.load(str(rater_file(Path(case.files["seg"]), 2))).dataobj)
        ones, twos = labels_to_regions(first), labels_to_regions(second)
        rows.append({"case_id": case.case_id} | {r: dice(ones[i] > 0, twos[i] > 0) for i, r in enumerate(REGIONS)})
    return rows


def summary(rows: list[dict]) -> dict[str, dict[str, float]]:
    out = {}
    for region in REGIONS:
        values = np.array([r[region] for r in rows if r[region] is not None])
        out[region] = {
            "cases": int(values.size),
            "mean": float(values.mean()),
            "sd": float(values.std(ddof=1)),
            "median": float(np.median(values)),
            "min": float(values.min()),
            "max": float(values.max()),
        }
    return out


def figure(cases: list, path: Path) -> None:
    """An axial slice through the tumour of three cases: FLARE and T1ce with rater 1 (solid) and rater 2 (dashed)."""
    shown = cases[:3]
    fig, axes = plt.subplots(2, len(shown), figsize=(2.6 * len(shown), 5.2))
    for column, case in enumerate(shown):
        first = np.asarray(nib.load(str(case.files["seg"])).dataobj)
        second = np.asarray(nib.load(str(rater_file(Path(case.files["seg"]), 2))).dataobj)
        z = int(np.argmax((first > 0).sum((0, 1))))
        box = tuple(slice(max(i.min() - 12, 0), i.max() + 13) for i in np.nonzero(first[..., z] > 0))
        for row, modality in enumerate(("flair", "t1ce")):
            image = np.asarray(nib.load(str(case.files[modality])).dataobj)[..., z][box]
            ax = axes[row, column]
            ax.imshow(np.rot90(image), cmap="gray")
            for seg, style in ((first, "solid"), (second, "dashed")):
                regions = labels_to_regions(seg[..., z][box][None])[:, 0]  # one slice as a 1 x X x Y volume
                for i, colour in zip(range(3), ("yellow", "red", "cyan"), strict=True):
                    ax.contour(np.rot90(regions[i] > 0), levels=[0.5], colors=colour, linestyles=style, linewidths=0.8)
            ax.set_axis_off()
            ax.set_title(f"{case.case_id[-3:]} {modality}", fontsize=8)
    fig.suptitle("rater 1 solid, rater 2 dashed; TC yellow, WT red, ET cyan", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--shape", type=int, nargs=3, default=(240, 240, 155))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write per-case Dice and the summary here")
    parser.add_argument("--figure", type=Path, help="a PNG of three cases with both raters' outlines")
    args = parser.parse_args()
    if args.cases < 10:
        parser.error("--cases: at least 10, for a mean worth comparing")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "cases"
        start = time.perf_counter()
        knobs = PARTITIONS["iid"].knobs(args.cases)
        generate_cases(root, knobs, args.seed, tuple(args.shape), hard=True, raters=2)
        seconds = (time.perf_counter() - start) / args.cases
        cases = find_cases(root)
        rows = score(cases)
        if args.figure:
            figure(cases, args.figure)
    result = {
        "cases": args.cases,
        "shape": list(args.shape),
        "seed": args.seed,
        "seconds_per_case": round(seconds, 1),
        "menze_range": MENZE_RANGE,
        "summary": summary(rows),
        "per_case": rows,
    }
    for row in rows:
        print(row["case_id"], *(f"{r} {'-' if row[r] is None else f'{row[r]:.3f}'}" for r in REGIONS))
    print(f"inter-rater Dice over {args.cases} cases of {tuple(args.shape)} ({seconds:.1f} s per case to generate):")
    for region, s in result["summary"].items():
        print(f"  {region}: mean {s['mean']:.3f} (SD {s['sd']:.3f}), median {s['median']:.3f}, "
              f"range {s['min']:.3f}-{s['max']:.3f}, {s['cases']} cases")  # fmt: skip
    print(f"Menze et al. (IEEE TMI 2015): inter-rater Dice {MENZE_RANGE[0]:.2f} to {MENZE_RANGE[1]:.2f} by sub-region")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
