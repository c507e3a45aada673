"""How the phantom's tumours compare with published glioma figures, and with the generator they replaced.

    python benchmarks/phantom_stats.py --cases 40 [--shape 240 240 155] [--old-rev 84676e7] \
        [--stats-figure docs/figures/phantom_stats.png] [--before-after docs/figures/phantom_before_after.png]

Generates ``--cases`` cases with the reference knobs (clean scanner, 1 mm, annotation as the protocol says, BraTS
2020's LGG share) into a temporary folder, and, with ``--old-rev``, as many with the generator of that git revision
(``custom/brats_fl/data/phantom.py`` as it was). Per case: WT / TC / ET volumes (cm³), ET / TC and TC / WT, WT
sphericity and the number of WT components (``brats_fl.data.glioma.tumour_stats``). Prints a per-case CSV with
``--csv`` and a summary table (median [quartiles] or shares) next to the literature's figures, with generation time
per case. Figures: distributions against the literature, and axial slices of old and new tumours.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
from brats_fl.data.glioma import tumour_stats  # noqa: E402
from brats_fl.data.phantom import SiteKnobs, generate_cases  # noqa: E402

#: Published figures we found (docs/explanation/phantom.md cites each); None where no figure was found.
LITERATURE = {
    "lgg_share": (76 / 369, "BraTS 2020 training set: 76 LGG of 369 cases (name_mapping.csv)"),
    "multifocal_share": (
        0.172,
        "Haque et al., J Clin Neurosci 2020 (NCDB): 7,785 of 45,268 glioblastomas multifocal (17.2%)",
    ),
    "multifocal_range": ((0.02, 0.20), "Radiopaedia, 'multifocal glioblastoma': 2-20% of glioblastomas"),
}
KEYS = ("wt_cm3", "tc_cm3", "et_cm3", "et_over_tc", "tc_over_wt", "sphericity", "components", "core_components")


def _old_generator(rev: str):
    """The phantom module of git revision ``rev``, imported under another name."""
    repo = Path(__file__).resolve().parents[1]
    source = subprocess.run(
        ["git", "-C", str(repo), "show", f"{rev}:custom/brats_fl/data/phantom.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "old_phantom.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_phantom", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_phantom"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _stats(root: Path) -> list[dict]:
    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        img = nib.load(str(folder / f"{folder.name}_seg.nii.gz"))
        seg = np.asarray(img.dataobj)
        rows.append({"case": folder.name, **tumour_stats(seg, float(np.prod(img.header.get_zooms())))})
    return rows


def _summary(rows: list[dict]) -> dict[str, str]:
    out = {}
    for key in KEYS[:-2]:
        v = np.array([r[key] for r in rows], float)
        v = v[np.isfinite(v)]
        q = np.percentile(v, [25, 50, 75]) if v.size else [np.nan] * 3
        out[key] = f"{q[1]:.2f} [{q[0]:.2f}-{q[2]:.2f}]"
    out["no ET"] = f"{np.mean([r['et_cm3'] == 0 for r in rows]):.0%}"
    out["multifocal (TC parts > 1)"] = f"{np.mean([r['core_components'] > 1 for r in rows]):.0%}"
    out["WT parts > 1"] = f"{np.mean([r['components'] > 1 for r in rows]):.0%}"
    return out


def _largest_slice(seg: np.ndarray) -> int:
    return int(np.argmax((seg > 0).sum((0, 1))))


def _before_after(old: Path, new: Path, out: Path, count: int = 4) -> None:
    """Axial FLAIR slices through each tumour's largest cross-section, labels overlaid: old row above new."""
    colours = {2: (1.0, 0.85, 0.0), 1: (1.0, 0.2, 0.2), 4: (0.2, 0.6, 1.0)}
    fig, axes = plt.subplots(2, count, figsize=(2.6 * count, 5.6))
    for row, (root, title) in enumerate(((old, "old generator"), (new, "glioma generator"))):
        folders = sorted(p for p in root.iterdir() if p.is_dir())[:count]
        for ax, folder in zip(axes[row], folders, strict=False):
            seg = np.asarray(nib.load(str(folder / f"{folder.name}_seg.nii.gz")).dataobj)
            flair = np.asarray(nib.load(str(folder / f"{folder.name}_flair.nii.gz")).dataobj).astype(np.float32)
            z = _largest_slice(seg)
            base = flair[:, :, z].T / max(float(np.percentile(flair[flair > 0], 99.5)), 1.0)
            rgb = np.repeat(np.clip(base, 0, 1)[..., None], 3, axis=-1)
            for label, colour in colours.items():
                hit = np.equal(seg[:, :, z].T, label)
                rgb[hit] = 0.45 * rgb[hit] + 0.55 * np.array(colour)
            ax.imshow(rgb, origin="lower")
            ax.set_title(f"{title}\n{folder.name[-3:]}, z={z}", fontsize=8)
            ax.axis("off")
    fig.text(0.5, 0.01, "yellow: oedema (2), red: necrosis / non-enhancing core (1), blue: enhancing (4)", ha="center")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out, dpi=110)


def _stats_figure(sets: dict[str, list[dict]], out: Path) -> None:
    """Distributions per cohort; the literature's shares drawn as lines where a figure exists."""
    fig, axes = plt.subplots(2, 4, figsize=(15, 6.5))
    for ax, key in zip(axes.ravel(), KEYS[:-1], strict=False):
        data = [np.array([r[key] for r in rows], float) for rows in sets.values()]
        data = [d[np.isfinite(d)] for d in data]
        ax.boxplot(data, tick_labels=list(sets), showfliers=True)
        ax.set_title(key)
    ax = axes.ravel()[-1]
    names = list(sets)
    no_et = [np.mean([r["et_cm3"] == 0 for r in rows]) for rows in sets.values()]
    multi = [np.mean([r["core_components"] > 1 for r in rows]) for rows in sets.values()]
    x = np.arange(len(names))
    ax.bar(x - 0.2, no_et, 0.4, label="share without ET")
    ax.bar(x + 0.2, multi, 0.4, label="share multifocal")
    ax.axhline(LITERATURE["lgg_share"][0], color="C0", ls="--", lw=1, label="BraTS 2020 LGG share")
    ax.axhline(LITERATURE["multifocal_share"][0], color="C1", ls="--", lw=1, label="NCDB multifocal GBM")
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--old-rev", default=None, help="git revision of the generator to compare with")
    parser.add_argument("--csv", type=Path, default=None, help="per-case statistics")
    parser.add_argument("--stats-figure", type=Path, default=None)
    parser.add_argument("--before-after", type=Path, default=None)
    args = parser.parse_args()
    shape = tuple(args.shape)
    work = Path(tempfile.mkdtemp())
    timings, sets = {}, {}
    if args.old_rev:
        old = _old_generator(args.old_rev)
        start = time.perf_counter()
        old.generate_cohort(work / "old", args.cases, 1, args.seed, shape=shape)
        timings["old"] = (time.perf_counter() - start) / args.cases
        sets["old"] = _stats(work / "old")
    start = time.perf_counter()
    generate_cases(work / "new", [SiteKnobs("reference")] * args.cases, args.seed, shape)
    timings["new"] = (time.perf_counter() - start) / args.cases
    sets["new"] = _stats(work / "new")
    if args.csv:
        with args.csv.open("w") as fh:
            fh.write("cohort,case," + ",".join(KEYS) + "\n")
            for name, rows in sets.items():
                fh.writelines(f"{name},{r['case']}," + ",".join(f"{r[k]:.4g}" for k in KEYS) + "\n" for r in rows)
    summaries = {name: _summary(rows) for name, rows in sets.items()}
    columns = list(next(iter(summaries.values())))
    print(f"{args.cases} cases per cohort, grid {shape}; medians [quartiles]")
    print("| cohort | s/case | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 2) + "|")
    for name, summary in summaries.items():
        print(f"| {name} | {timings[name]:.1f} | " + " | ".join(summary[c] for c in columns) + " |")
    for key, (value, source) in LITERATURE.items():
        print(f"literature {key}: {value} ({source})")
    if args.stats_figure:
        _stats_figure(sets, args.stats_figure)
    if args.before_after and "old" in sets:
        _before_after(work / "old", work / "new", args.before_after)
    print(f"cases left in {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
