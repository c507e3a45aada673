"""The reference papers' tables from the published benchmark (issue 19, item 8): each paper's rows and columns,
brats-fl's numbers with 95 % confidence intervals over seeds and test cases, and the paper's own numbers beside them.

    python benchmarks/paper_tables.py --bench benchmarks/results/full --figures docs/figures

``--bench`` is a ``brats-fl benchmark --profile full`` folder; ``benchmarks/results/full`` holds the published one (the
summaries of its finished runs). Prints Markdown for

- reference 000 (the BraTS FedPer report): centralized training, FedAvg on equal (``iid``) and unequal (``quantity``,
  1/2, 1/3, 1/6) shares, FedPer on unequal shares; Dice per region, IoU and the sites' mean training loss in the last
  round (the report's "average client loss");
- reference 001 (HyperSeg): local training, FedAvg and the three HyperSeg variants on the four-site ``scanners``
  partition (a clean scanner, Gibbs ringing 0.5 and 0.2, k-space spikes);
- reference 004 (federated nnU-Net slides): centralized training against FedAvg with the nnU-Net recipe
  (``benchmarks/variants.py``'s ``central_nnunet`` and ``fedavg_nnunet``) and with the profile's Adam and Dice loss;
  and writes its server-side (the global model's validation Dice at the sites) and client-side (training loss)
  curves, mean over seeds with a min-max band, to ``--figures``.

Each table ends with paired tests of the rows that share test cases (Wilcoxon signed-rank on per-case Dice averaged
over the seeds both rows have, Holm-corrected within the table), the method of the benchmark's page. Rows whose runs
have not finished are left out. The numbers brats-fl prints are measured on the phantom cohort at the full profile's
budget (10 rounds of 1 epoch, 2 mm); the papers trained on BraTS or prostate MRI for longer, so the columns sit side
by side to show the shape of each result, not to match its values.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from brats_fl.results.benchmark_page import site_mean_curve
from brats_fl.results.figures import plot_band_curves
from brats_fl.results.stats import ALPHA, bootstrap_ci, case_means, compare, score_matrix
from statsmodels.stats.multitest import multipletests


@dataclass(frozen=True)
class Row:
    """One row of a paper's table: where its runs are in the benchmark folder, and the paper's own numbers."""

    label: str
    runs: str  # relative to the benchmark folder: runs/<partition>/<algorithm> or variants/<variant>
    partition: str
    paper: dict[str, str]


#: reference 000, its Table 1 and its text (centralized: the results section's 0.708; no IoU or loss given for it)
REF_000 = [
    Row("centralized, equal", "runs/iid/brats_central", "iid", {"Dice": "0.708"}),
    Row("FedAvg, equal", "runs/iid/brats_fedavg", "iid", {"Dice": "0.6941", "IoU": "0.5695", "client loss": "0.3096"}),
    Row("centralized, unequal", "runs/quantity/brats_central", "quantity", {}),
    Row("FedAvg, unequal", "runs/quantity/brats_fedavg", "quantity",
        {"Dice": "0.4648", "IoU": "0.3195", "client loss": "0.3054"}),
    Row("FedPer, unequal", "runs/quantity/brats_fedper", "quantity",
        {"Dice": "0.4640", "IoU": "0.4653", "client loss": "0.9941"}),
]  # fmt: skip
#: reference 001, four noisy scanners: its Table 4 (client-specific noise; no local or embedding row) and, where Table 4
#: has no row, Table 1 (% Dice, as the paper gives them)
REF_001 = [
    Row("local only", "runs/scanners/brats_local", "scanners", {"Dice": "37.20 (Table 1)"}),
    Row("FedAvg", "runs/scanners/brats_fedavg", "scanners", {"Dice": "62.20 (Fed SGD)"}),
    Row("HyperSeg Conv", "runs/scanners/brats_hyperseg_conv", "scanners", {"Dice": "64.11"}),
    Row("HyperSeg Conv + BN", "runs/scanners/brats_hyperseg_conv_bn", "scanners", {"Dice": "62.92"}),
    Row("HyperSeg Conv + BN + emb", "runs/scanners/brats_hyperseg_conv_bn_emb", "scanners",
        {"Dice": "58.69 (Table 1)"}),
]  # fmt: skip
#: reference 004, its results table (Dice; no loss or IoU given as numbers)
REF_004 = [
    Row("centralized, nnU-Net recipe", "variants/central_nnunet", "iid", {"Dice": "0.824"}),
    Row("FedAvg, nnU-Net recipe", "variants/fedavg_nnunet", "iid", {"Dice": "0.74"}),
    Row("centralized, Adam + Dice (profile)", "runs/iid/brats_central", "iid", {}),
    Row("FedAvg, Adam + Dice (profile)", "runs/iid/brats_fedavg", "iid", {}),
]
REGIONS = ("WT", "TC", "ET")


def load(bench: Path, row: Row) -> list[dict]:
    """The row's finished runs, by seed."""
    paths = sorted((bench / row.runs).glob("seed*/summary.json"), key=lambda p: int(p.parent.name[4:]))
    return [json.loads(p.read_text()) for p in paths]


def _matrix(runs: list[dict], key: str, cases: list[str]) -> np.ndarray:
    return score_matrix([{r["case_id"]: r[key] for r in run["per_case"] if key in r} for run in runs], cases)


def _cell(runs: list[dict], key: str, cases: list[str], digits: int = 3) -> str:
    ci = bootstrap_ci(_matrix(runs, key, cases))
    return "" if math.isnan(ci.estimate) else f"{ci.estimate:.{digits}f} [{ci.low:.{digits}f}, {ci.high:.{digits}f}]"


def _loss(runs: list[dict]) -> str:
    """Mean over seeds of the sites' mean training loss in the last round, with the seeds' range."""
    losses = [r["client_train_loss"] for r in runs if r.get("client_train_loss") is not None]
    if not losses:
        return ""
    return f"{np.mean(losses):.3f} ({min(losses):.3f}–{max(losses):.3f})"


def table(bench: Path, rows: list[Row]) -> str:
    """The paper's table with brats-fl's numbers, then the paired tests of rows on the same partition."""
    header = ["", "seeds", *(f"Dice {r}" for r in REGIONS), "Dice mean", "IoU mean", "client loss (seeds' range)",
              "paper: Dice", "paper: IoU", "paper: client loss"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    found = {row.label: (row, runs) for row in rows if (runs := load(bench, row))}
    if not found:
        return "No run of this table has finished yet.\n"
    for row, runs in found.values():
        cases = sorted({c["case_id"] for run in runs for c in run["per_case"]})
        cells = [row.label, str(len(runs)), *(_cell(runs, f"dice_{r}", cases) for r in REGIONS),
                 f"**{_cell(runs, 'dice_mean', cases)}**", _cell(runs, "iou_mean", cases), _loss(runs),
                 *(row.paper.get(k, "") for k in ("Dice", "IoU", "client loss"))]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + tests(found)


def tests(found: dict[str, tuple[Row, list[dict]]]) -> str:
    """Every pair of rows on one partition, on the seeds both have; Holm over the table's tests."""
    per_case: dict[str, dict[str, float]] = {}
    pairs = []
    labels = list(found)
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            (row_a, runs_a), (row_b, runs_b) = found[a], found[b]
            if row_a.partition != row_b.partition:
                continue
            seeds = sorted({r["seed"] for r in runs_a} & {r["seed"] for r in runs_b})
            cases = sorted({c["case_id"] for run in runs_a for c in run["per_case"]})
            named = f"(seeds {', '.join(map(str, seeds))})"
            for label, runs in ((a, runs_a), (b, runs_b)):
                chosen = [r for r in runs if r["seed"] in seeds]
                per_case[f"{label} {named}"] = case_means(_matrix(chosen, "dice_mean", cases), cases)
            pairs.append((f"{a} {named}", f"{b} {named}"))
    if not pairs:
        return ""
    # compare() tests every algorithm against each reference; the pairs here are the rows on one partition, so each
    # pair is tested alone and the p-values Holm-corrected over the table together below
    results = [compare({a: per_case[a], b: per_case[b]}, [b])[0] for a, b in pairs]
    holm = multipletests([c.p for c in results], method="holm")[1]
    lines = ["| | against | cases | mean Dice difference | p (Wilcoxon) | p (Holm, this table) | verdict |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for c, q in zip(results, holm, strict=True):
        verdict = ("better" if c.mean_difference > 0 else "worse") if q < ALPHA else "not separated"
        p = "<0.001" if c.p < 0.001 else f"{c.p:.3f}"
        lines.append(f"| {c.algorithm} | {c.reference} | {c.cases} | {c.mean_difference:+.3f} | {p} | "
                     f"{'<0.001' if q < 0.001 else f'{q:.3f}'} | {verdict} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def site_table(bench: Path, rows: list[Row]) -> str:
    """Mean Dice per site, mean over seeds with each seed's value: where a personalised model gains or loses."""
    found = {row.label: runs for row in rows if (runs := load(bench, row))}
    if not found:
        return ""
    sites = sorted({c["site"] for runs in found.values() for run in runs for c in run["per_case"]})
    lines = ["| | " + " | ".join(sites) + " |", "|---|" + "---|" * len(sites)]
    for label, runs in found.items():
        cells = []
        for site in sites:
            per_seed = [np.mean([c["dice_mean"] for c in run["per_case"] if c["site"] == site]) for run in runs]
            cells.append(f"{np.mean(per_seed):.3f} ({'/'.join(f'{v:.2f}' for v in per_seed)})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def curves(bench: Path, rows: list[Row], figures: Path) -> list[Path]:
    """Reference 004's server-side curve (the global model's validation Dice at the sites, mean over sites) and
    client-side curve (the sites' training loss, mean over sites), per round, mean over seeds with a min-max band."""
    val, loss = {}, {}
    for row in rows:
        runs = load(bench, row)
        if not runs:
            continue
        val[row.label] = [site_mean_curve(r["val_dice"]) for r in runs]
        loss[row.label] = [site_mean_curve(r["train_loss"]) for r in runs if r.get("train_loss")]
    if not val:
        return []
    return [
        plot_band_curves(val, "Server side: the global model's validation Dice", figures / "nnunet_server_side.png"),
        plot_band_curves(
            {k: v for k, v in loss.items() if v},
            "Client side: training loss",
            figures / "nnunet_client_side.png",
            ylabel="Training loss\n(mean over sites)",
            top=2.0,
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", type=Path, required=True, help="a full-profile benchmark folder")
    parser.add_argument("--figures", type=Path, help="where to write reference 004's curves")
    args = parser.parse_args()
    print("## Reference 000: centralized, FedAvg and FedPer on equal and unequal shares\n")
    print(table(args.bench, REF_000))
    print("## Reference 001: local training, FedAvg and HyperSeg on four noisy scanners\n")
    print(table(args.bench, REF_001))
    print("Mean Dice per site, mean over seeds (each seed's):\n")
    print(site_table(args.bench, REF_001))
    print("## Reference 004: centralized against FedAvg with the nnU-Net recipe\n")
    print(table(args.bench, REF_004))
    if args.figures:
        for path in curves(args.bench, REF_004, args.figures):
            print(f"figure: {path}")


if __name__ == "__main__":
    main()
