"""Reference 003 with seeds (issue 19, items 7 and 8): the SegViz paper's Tables 1 and 2 on partially annotated
phantom sites, every scheme run with seeds 0 .. N-1, with 95 % confidence intervals over seeds and cases and
Holm-corrected paired tests.

    python benchmarks/segviz_seeds.py run --out benchmarks/results/segviz --seeds 3
    python benchmarks/segviz_seeds.py table --out benchmarks/results/segviz

``run`` builds the data once (kept and reused), then runs each unfinished (seed, scheme) pair with ``brats-fl run``
and scores each finished seed with ``brats-fl compare``; a finished run or comparison is kept and skipped, a
half-finished one is cleared and re-run. ``table`` prints the two tables as Markdown from the comparisons found.

The data are the single-seed section of docs/history.md ("SegViz: partial labels"), with more held-out cases: a
96x96x72 phantom cohort of 45 cases on three scanners, 15 per site split 7 / 4 / 4 (train / validation / test),
site-1 annotating WT only, site-2 TC only, site-3 ET only (``brats-fl partition --annotate``), and an external site of
40 fully labelled ``low_field`` cases. Training is that section's budget (10 rounds x 10 local epochs, multi-head
U-Net 16-32-64, 32^3 patches half centred on the annotated tumour), at the current defaults otherwise (fine-tuning at
a tenth of the training rate). Each run leaves FLARE's cross-site evaluation out: ``brats-fl compare`` scores every
site's model on the held-out and external cases itself.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
from brats_fl.data.labels import DISPLAY_ORDER
from brats_fl.results.compare import BASELINE, CENTRAL, SCHEMES
from brats_fl.results.stats import ALPHA, bootstrap_ci, case_means, paired_differences, score_matrix, wilcoxon_p
from statsmodels.stats.multitest import multipletests

#: the SegViz jobs, in the order they run for each seed
JOBS = tuple(SCHEMES)
#: every run's options, as in the single-seed tables
COMMON = ["--rounds", "10", "--local-epochs", "10", "--patch", "32", "32", "32", "--channels", "16", "32", "64",
          "--fg-ratio", "0.5", "--cross-site", "none"]  # fmt: skip
SPLITS = {"in_federation": "In-federation validation + test cases", "external": "External site (low_field)"}


def _cli(*args: str) -> None:
    subprocess.run(["brats-fl", *args], check=True)


def prepare(out: Path) -> Path:
    """Cohort, external site, partial-label datalists and the site configuration; built once, returns the latter."""
    data = out / "data"
    config = data / "site_config.json"
    if config.is_file():
        return config
    shutil.rmtree(data, ignore_errors=True)
    shape = ["--shape", "96", "96", "72"]
    _cli("phantom", "--out", str(data / "cohort"), "--cases", "45", "--sites", "3", "--seed", "3", *shape)
    _cli("phantom", "--out", str(data / "external"), "--cases", "40", "--sites", "1", "--seed", "4",
         "--profiles", "low_field", *shape)  # fmt: skip
    _cli("partition", str(data / "cohort"), "--sites", "3", "--scheme", "natural", "--attribute", "scanner",
         "--split", "0.4", "0.3", "0.3", "--out", str(data / "datalists"),
         "--annotate", "site-1=WT", "site-2=TC", "site-3=ET")  # fmt: skip
    doc = {"data_root": str(data / "cohort"), "datalist_dir": str(data / "datalists"), "threads": 1,
           "state_dir": str(data / "site_state")}  # fmt: skip
    config.write_text(json.dumps(doc, indent=1))
    return config


def _finished(workspace: Path) -> bool:
    return any(workspace.glob("**/summary.json"))


def run(out: Path, seeds: int) -> None:
    """Every unfinished run, seed by seed, and each seed's comparison once its four runs have finished."""
    config = prepare(out)
    for seed in range(seeds):
        folder = out / f"seed{seed}"
        if (folder / "comparison.json").is_file():
            continue  # scored: its runs are not needed again (and not kept in the repository)
        workspaces = [folder / "runs" / job for job in JOBS]
        for job, workspace in zip(JOBS, workspaces, strict=True):
            if _finished(workspace):
                continue
            shutil.rmtree(workspace, ignore_errors=True)
            _cli("run", job, *COMMON, "--seed", str(seed), "--site-config", str(config), "--workspace", str(workspace))
        _cli("compare", *map(str, workspaces), "--external", str(out / "data" / "external"), "--out", str(folder))


def _seed_scores(out: Path) -> list[dict]:
    paths = sorted(out.glob("seed*/comparison.json"), key=lambda p: int(p.parent.name[4:]))
    return [json.loads(p.read_text()) for p in paths]


def table(out: Path) -> str:
    """Mean Dice per region with its 95 % CI over seeds and cases, per scheme and split; then every scheme against the
    single-task baseline and the naive central model (Wilcoxon on per-case Dice averaged over seeds, Holm-corrected
    within each split's table)."""
    seeds = _seed_scores(out)
    if not seeds:
        return "No seed has finished yet.\n"
    schemes = list(seeds[0])
    parts = [f"Seeds: {len(seeds)}.", ""]
    for split, title in SPLITS.items():
        matrices: dict[tuple[str, str], tuple[np.ndarray, list[str]]] = {}
        rows = []
        for scheme in schemes:
            cells = [scheme]
            for region in DISPLAY_ORDER:
                per_seed = [s[scheme][split].get(region, {}) for s in seeds]
                cases = sorted(per_seed[0])
                matrix = score_matrix(per_seed, cases)
                matrices[scheme, region] = (matrix, cases)
                ci = bootstrap_ci(matrix)
                cells.append(f"{ci.estimate:.3f} [{ci.low:.3f}, {ci.high:.3f}]")
            rows.append(cells)
        n_cases = "/".join(str(len(matrices[schemes[0], r][1])) for r in DISPLAY_ORDER)
        parts += [f"### {title} ({n_cases} cases for {'/'.join(DISPLAY_ORDER)})", "",
                  "| Scheme | " + " | ".join(f"{r} Dice [95 % CI]" for r in DISPLAY_ORDER) + " |",
                  "|---|" + "---|" * len(DISPLAY_ORDER)]  # fmt: skip
        parts += ["| " + " | ".join(cells) + " |" for cells in rows]
        tests, pairs = [], set()
        for scheme in schemes:
            for reference in (BASELINE, CENTRAL):
                if scheme == reference or reference not in schemes or {scheme, reference} in pairs:
                    continue
                pairs.add(frozenset((scheme, reference)))
                for region in DISPLAY_ORDER:
                    (a, cases), (b, theirs) = matrices[scheme, region], matrices[reference, region]
                    if cases != theirs:
                        raise ValueError(f"{split} {region}: {scheme} and {reference} were scored on other cases")
                    difference = paired_differences(case_means(a, cases), case_means(b, cases))
                    tests.append((scheme, reference, region, float(np.mean(difference)), wilcoxon_p(difference)))
        holm = multipletests([t[4] for t in tests], method="holm")[1]
        header = ("Scheme", "against", "region", "mean Dice difference", "p (Wilcoxon)", "p (Holm, this table)",
                  "verdict")  # fmt: skip
        parts += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for (scheme, reference, region, diff, p), q in zip(tests, holm, strict=True):
            verdict = ("better" if diff > 0 else "worse") if q < ALPHA else "not separated"
            parts.append(f"| {scheme} | {reference} | {region} | {diff:+.3f} | {_p(p)} | {_p(q)} | {verdict} |")
        parts.append("")
    return "\n".join(parts)


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("run", "table"))
    parser.add_argument("--out", type=Path, required=True, help="the folder of data, runs and comparisons")
    parser.add_argument("--seeds", type=int, default=3, help="run: seeds 0 .. N-1")
    args = parser.parse_args()
    out = args.out.resolve()
    if args.command == "run":
        run(out, args.seeds)
    print(table(out))


if __name__ == "__main__":
    main()
