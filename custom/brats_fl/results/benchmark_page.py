"""The benchmark's page, ``index.md`` and a self-contained ``index.html``, from the finished runs of a benchmark folder
(:mod:`brats_fl.results.benchmark`): per partition, each algorithm's scores with confidence intervals, its gap to
centralized training, paired tests against FedAvg and centralized training, the test cases a 0.02 Dice difference
needs, and learning curves with bands over seeds. Reads only ``summary.json`` and ``untrained.json`` files, so
it is rebuilt in a second after every run.
"""

from __future__ import annotations

import base64
import html
import json
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from brats_fl.results.benchmark import CENTRAL, ENTRIES, FEDAVG, PARTITIONS
from brats_fl.results.report import markdown_table
from brats_fl.results.stats import (
    ALPHA,
    LEVEL,
    PLATEAU_TOLERANCE,
    Comparison,
    Interval,
    bootstrap_ci,
    case_means,
    cases_needed,
    compare,
    quarter_gains,
    score_matrix,
    smoothed,
)
from brats_fl.seg.trainer import UNPROCESSED

REGIONS = ("WT", "TC", "ET", "mean")
UNTRAINED = "untrained model"
#: the smallest difference of mean Dice worth detecting, for the sample size
DELTA = 0.02
POWER = 0.8

#: a page is a list of blocks: ("h2"|"h3"|"p", text), ("table", header, rows), ("figure", caption, png path)
Block = tuple


def load_runs(out: Path) -> list[dict]:
    """Every finished run's summary, in the order of the profiles' partitions and algorithms, then by seed."""
    runs = [json.loads(p.read_text()) for p in Path(out).glob("runs/*/*/seed*/summary.json")]
    return sorted(runs, key=lambda r: (_rank(PARTITIONS, r["partition"]), _rank(ENTRIES, r["algorithm"]), r["seed"]))


def _rank(order: Sequence[str], name: str) -> tuple[int, str]:
    return (order.index(name) if name in order else len(order), name)


def _per_seed(rows_by_seed: Sequence[Sequence[dict]], key: str) -> list[dict[str, float]]:
    return [{r["case_id"]: r[key] for r in rows if key in r} for rows in rows_by_seed]


def _cell(interval: Interval, digits: int = 3) -> str:
    if math.isnan(interval.estimate):
        return ""
    return f"{interval.estimate:.{digits}f} [{interval.low:.{digits}f}, {interval.high:.{digits}f}]"


def _p(value: float) -> str:
    return "" if math.isnan(value) else "<0.001" if value < 0.001 else f"{value:.3f}"


def _scores_table(
    algorithms: dict[str, list[dict]], untrained: list[list[dict]], cases: list[str]
) -> tuple[list[str], list[list[str]]]:
    """A row per algorithm (and the untrained model): Dice and HD95 per region and lesion-wise (BraTS 2023) with CIs,
    worst site, gap to centralized training with CI, bytes sent per site, what the privacy ledger guarantees (each
    site's epsilon, or none) and wall time, each over the algorithm's seeds."""
    header = ["algorithm", "seeds", *(f"Dice {r}" for r in REGIONS), *(f"HD95 {r} (mm)" for r in REGIONS),
              "IoU mean", "lesion-wise Dice mean", "lesion-wise HD95 mean (mm)",
              "worst site (Dice)", "gap to central (Dice)", "client loss", "MB sent per site", "privacy (ledger)",
              "wall time (s)"]  # fmt: skip
    central = algorithms.get(CENTRAL)
    central_dice = score_matrix(_per_seed([r["per_case"] for r in central], "dice_mean"), cases) if central else None
    rows = []
    for name, seeds in [*algorithms.items(), (UNTRAINED, None)]:
        per_case = [s["per_case"] for s in seeds] if seeds else untrained
        if not per_case:
            continue
        cells = [name.removeprefix("brats_"), str(len(per_case))]
        for metric, digits in (("dice", 3), ("hd95", 2)):
            for region in REGIONS:
                matrix = score_matrix(_per_seed(per_case, f"{metric}_{region}"), cases)
                cells.append(_cell(bootstrap_ci(matrix), digits))
        for metric, digits in (("iou_mean", 3), ("lesion_dice_mean", 3), ("lesion_hd95_mean", 2)):
            cells.append(_cell(bootstrap_ci(score_matrix(_per_seed(per_case, metric), cases)), digits))
        if seeds is None:
            rows.append(cells + ["", "", "", "", "", ""])
            continue
        worst = Counter(s["test"]["worst_site"] for s in seeds).most_common(1)[0][0]
        worst_dice = np.mean([s["test"]["worst_dice_mean"] for s in seeds])
        dice = score_matrix(_per_seed(per_case, "dice_mean"), cases)
        gap = _cell(bootstrap_ci(dice, central_dice)) if central_dice is not None and name != CENTRAL else ""
        sent = np.mean([s["bytes_sent_per_site"] for s in seeds]) / 2**20
        wall = np.mean([s["wall_time"] for s in seeds])
        # a run of a brats-fl without the ledger recorded none
        privacy = "; ".join(sorted({s.get("privacy", "not recorded") for s in seeds}))
        # the sites' mean training loss in the last round (BraTS FedPer report's "client loss"); runs of a brats-fl
        # before it was recorded have none
        losses = [s["client_train_loss"] for s in seeds if s.get("client_train_loss") is not None]
        loss = f"{np.mean(losses):.3f}" if losses else ""
        rows.append(cells + [f"{worst} ({worst_dice:.3f})", gap, loss, f"{sent:.1f}", privacy, f"{wall:.0f}"])
    return header, rows


def _post_processing_table(
    algorithms: dict[str, list[dict]], cases: list[str]
) -> tuple[list[str], list[list[str]]] | None:
    """A row per algorithm whose runs post-processed their predictions (``min_volume``): voxel-wise and lesion-wise
    Dice per region without and with it, from the same predictions (``brats_fl.seg.trainer.Trainer.evaluate``), with
    the volumes its sites chose (mm³, WT/TC/ET; several where sites or seeds differ). None where no run did."""
    regions = REGIONS[:3]
    header = ["algorithm", "seeds", *(f"Dice {r}: without → with" for r in regions),
              *(f"lesion-wise Dice {r}: without → with" for r in regions),
              "volumes chosen (mm³, WT/TC/ET)"]  # fmt: skip
    rows = []
    for name, seeds in algorithms.items():
        processed = [s for s in seeds if any(f"{UNPROCESSED}dice_WT" in r for r in s["per_case"])]
        if not processed:
            continue
        per_case = [s["per_case"] for s in processed]
        cells = [name.removeprefix("brats_"), str(len(processed))]
        for metric in ("dice", "lesion_dice"):
            for region in regions:
                before, after = (
                    np.nanmean(score_matrix(_per_seed(per_case, f"{prefix}{metric}_{region}"), cases))
                    for prefix in (UNPROCESSED, "")
                )
                cells.append(f"{before:.3f} → {after:.3f}")
        volumes = sorted({"/".join(f"{v['volumes'][r]:g}" for r in regions)
                          for s in processed for v in (s.get("post_processing") or {}).values()})  # fmt: skip
        rows.append(cells + ["; ".join(volumes)])
    return (header, rows) if rows else None


def _tests_table(comparisons: list[Comparison]) -> tuple[list[str], list[list[str]]]:
    header = ["algorithm", "against", "cases", "mean Dice difference", "SD of differences", "p (Wilcoxon)",
              "p (Holm)", "verdict"]  # fmt: skip
    rows = [
        [
            c.algorithm.removeprefix("brats_"),
            c.reference.removeprefix("brats_"),
            str(c.cases),
            f"{c.mean_difference:+.3f}",
            "" if math.isnan(c.sd_difference) else f"{c.sd_difference:.3f}",
            _p(c.p),
            _p(c.p_holm),
            c.verdict,
        ]
        for c in comparisons
    ]
    return header, rows


def sample_size_text(comparisons: list[Comparison], cases: int) -> str:
    """How many test cases a difference of ``DELTA`` needs, from the spread of the measured paired differences."""
    sds = sorted(c.sd_difference for c in comparisons if not math.isnan(c.sd_difference) and c.sd_difference > 0)
    if not sds:
        return f"Sample size: no paired differences to measure their spread yet; this partition has {cases} test cases."
    median, largest = float(np.median(sds)), sds[-1]
    need, need_most = cases_needed(median, DELTA, ALPHA, POWER), cases_needed(largest, DELTA, ALPHA, POWER)
    return (
        f"Sample size: the per-case Dice differences of the {len(sds)} comparisons above have a median SD of "
        f"{median:.3f} (largest {largest:.3f}). To detect a mean Dice difference of {DELTA} at p < {ALPHA} "
        f"(two-sided) with {POWER:.0%} power, a paired comparison needs {need} test cases ({need_most} at the "
        f"largest SD; paired t-test power analysis, statsmodels TTestPower). This partition has {cases} test cases."
    )


def partition_blocks(name: str, runs: list[dict], untrained: list[list[dict]], figures: Path) -> list[Block]:
    """One partition's section: scores, paired tests, sample size and learning curves."""
    from brats_fl.results.figures import plot_band_curves

    algorithms: dict[str, list[dict]] = {}
    for run in runs:
        algorithms.setdefault(run["algorithm"], []).append(run)
    cases = sorted({row["case_id"] for run in runs for row in run["per_case"]})
    # the tests pair seeds as well as cases: an algorithm with more finished seeds than another is compared on the
    # seeds both have, else seed-to-seed spread would pass for a difference between algorithms
    common = sorted(set.intersection(*({s["seed"] for s in seeds} for seeds in algorithms.values())))
    per_case = {
        alg: case_means(
            score_matrix(_per_seed([s["per_case"] for s in seeds if s["seed"] in common], "dice_mean"), cases), cases
        )
        for alg, seeds in algorithms.items()
    }
    comparisons = compare(per_case, [FEDAVG, CENTRAL])
    seeds_text = f"On seed(s) {', '.join(map(str, common))}, the seeds every algorithm of this partition has finished."
    curves = {
        alg.removeprefix("brats_"): [site_mean_curve(s["val_dice"]) for s in seeds] for alg, seeds in algorithms.items()
    }
    figure = plot_band_curves(curves, f"{name}: validation Dice, mean over seeds, band min-max",
                              figures / f"curves_{name}.png")  # fmt: skip
    per_round = bytes_per_round(algorithms)
    by_bytes = plot_band_curves(
        curves, f"{name}: validation Dice against MiB sent per site", figures / f"curves_bytes_{name}.png",
        x_per_round=per_round, xlabel="MiB sent per site (each round's share of the run's traffic)",
    )  # fmt: skip
    silent = sorted(set(curves) - set(per_round))
    post = _post_processing_table(algorithms, cases)
    post_blocks: list[Block] = [("h3", "Post-processing"), ("p", POST_PROCESSING), ("table", *post)] if post else []
    return [
        ("h2", f"Partition: {name}"),
        ("p", f"{len(cases)} pooled test cases; {len(algorithms)} algorithm(s)."),
        ("h3", "Scores"),
        ("table", *_scores_table(algorithms, untrained, cases)),
        *post_blocks,
        ("h3", "Paired tests"),
        ("p", seeds_text),
        ("table", *_tests_table(comparisons)),
        ("p", sample_size_text(comparisons, len(cases))),
        ("h3", "Learning curves"),
        ("figure", f"{name}: validation Dice per round (mean over sites), mean over seeds with min-max band", figure),
        ("p", RISING),
        ("table", *rising_table(curves)),
        ("figure", f"{name}: the same curves against the bytes each site sent{_left_out(silent)}", by_bytes),
    ]


RISING = (
    "Still rising? The gain of each algorithm's validation curve (mean over seeds, smoothed over three rounds) over "
    f"the last quarter of its rounds: at {PLATEAU_TOLERANCE} or more it is still rising when the budget ends, the "
    "rule that sets the budget on centralized training's curve (benchmarks/plateau.py, brats_fl.results.stats.plateau)."
    " An algorithm still rising is compared before its plateau: its row tells about the budget, not the algorithm."
)


def rising_table(curves: dict[str, list[list[float]]]) -> tuple[list[str], list[list[str]]]:
    """Per algorithm: its rounds, the gain of its mean curve over their last quarter, and whether it still rises."""
    rows = []
    for alg, seeds in curves.items():
        mean = smoothed(site_mean_curve(dict(enumerate(seeds))))  # the mean over seeds, each counting where it ran
        longest = len(mean) if seeds else 0
        gains = quarter_gains(np.arange(1, longest + 1), mean) if longest >= 4 else {}
        if not gains:
            rows.append([alg, str(longest), "", "too few rounds to tell"])
            continue
        gain = gains[longest]
        rows.append([alg, str(longest), f"{gain:+.3f}", "still rising" if gain >= PLATEAU_TOLERANCE else "flat"])
    return ["algorithm", "rounds", "gain over the last quarter", "at the end"], rows


def _left_out(silent: list[str]) -> str:
    return f" ({', '.join(silent)}: nothing sent, not drawn)" if silent else ""


def bytes_per_round(algorithms: dict[str, list[dict]]) -> dict[str, float]:
    """Per algorithm that sent anything: MiB a site sent per round (pass, for the sequential jobs), the run's traffic
    per site over its curve's rounds, mean over seeds. Every round of a job sends the same payload, so the share is
    each round's; an algorithm whose sites sent nothing (local-only) is left out."""
    shares = {}
    for alg, seeds in algorithms.items():
        rounds = [max(1, len(site_mean_curve(s["val_dice"]))) for s in seeds]
        sent = [s["bytes_sent_per_site"] / 2**20 / n for s, n in zip(seeds, rounds, strict=True)]
        if np.mean(sent) > 0:
            shares[alg.removeprefix("brats_")] = float(np.mean(sent))
    return shares


def site_mean_curve(per_site: dict[str, list[float]]) -> list[float]:
    """A run's curve (one value per site per round) as the mean over its sites per round; a site with fewer rounds
    counts in the rounds it has."""
    longest = max((len(v) for v in per_site.values()), default=0)
    table = np.full((max(len(per_site), 1), max(longest, 1)), np.nan)
    for i, values in enumerate(per_site.values()):
        table[i, : len(values)] = values
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a round no site has is NaN
        return [float(v) for v in np.nanmean(table, axis=0)]


METHODS = (
    f"Scores: the mean over every pooled test case of a partition and every seed, each case scored by the model its "
    f"site ends with (its personal layers and fine-tuning included). Brackets: {LEVEL:.0%} confidence intervals from "
    f"a two-way bootstrap that resamples seeds and test cases independently (both vary; the cases are the same in "
    f"every seed). Gap to central: the difference of mean Dice to centralized training, with cases paired and seeds "
    f"resampled on both sides. Paired tests: Wilcoxon signed-rank on per-case mean Dice averaged over seeds, paired "
    f"by case id, against FedAvg and against centralized training; all p-values of a partition are Holm-corrected "
    f'together; "better" or "worse" only where the corrected p is below {ALPHA}, otherwise "not separated". '
    f"HD95 follows the BraTS convention (373.13 mm where exactly one of prediction and truth is empty). The untrained "
    f"model is the profile's U-Net at seed 0's initialisation, scored by Dice and IoU on the same cases (its HD95 "
    f"says nothing: it predicts about half the head): every algorithm has to beat it."
)


POST_PROCESSING = (
    "The scores above are after post-processing (min_volume: predicted components smaller than a volume per region "
    "removed, the volumes chosen on validation, pooled over sites where a site's split is too small; "
    "docs/explanation/metrics.md). Here each test case's predictions are also scored as they were, mean Dice over "
    "cases and seeds without → with; lesion-wise by the cases' rule."
)


def page_blocks(out: Path) -> list[Block]:
    """Every section of the page."""
    runs = load_runs(out)
    figures = Path(out) / "figures"
    blocks: list[Block] = [("h2", "Method"), ("p", METHODS)]
    for partition in dict.fromkeys(r["partition"] for r in runs):
        path = Path(out) / "partitions" / partition / "untrained.json"
        untrained = list(json.loads(path.read_text()).values()) if path.is_file() else []
        blocks += partition_blocks(partition, [r for r in runs if r["partition"] == partition], untrained, figures)
    if runs:
        first = runs[0]
        machine = ", ".join(f"{k} {v}" for k, v in first["machine"].items())
        versions = ", ".join(f"{k} {v}" for k, v in first["versions"].items())
        rows = [[f"{r['partition']}/{r['algorithm']}/seed{r['seed']}", f"{r['test']['dice_mean']:.4f}",
                 r["global_model"]["weights_sha256"], f"{r['wall_time']:.0f}"] for r in runs]  # fmt: skip
        blocks += [
            ("h2", "Runs"),
            (
                "p",
                f"Machine: {machine}. Versions: {versions}. The weights' SHA-256 is the final global model's "
                f"(FL_global_model.pt): equal hashes on two machines mean the very same training.",
            ),
            ("table", ["run", "pooled Dice", "weights sha256", "wall time (s)"], rows),
        ]
    return blocks


def _markdown(blocks: list[Block], out: Path) -> str:
    parts = ["# brats-fl benchmark"]
    for kind, *rest in blocks:
        if kind in ("h2", "h3"):
            parts.append(f"{'#' * int(kind[1])} {rest[0]}")
        elif kind == "p":
            parts.append(rest[0])
        elif kind == "table":
            parts.append(markdown_table(*rest))
        else:
            parts.append(f"![{rest[0]}]({Path(rest[1]).relative_to(out).as_posix()})")
    return "\n\n".join(parts) + "\n"


_CSS = """body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #bbb;padding:3px 6px;text-align:right}
td:first-child,th:first-child{text-align:left}img{max-width:100%}figcaption{font-size:13px;color:#444}"""


def _html(blocks: list[Block]) -> str:
    """One file, figures embedded, so that it can be mailed or archived whole."""
    parts = []
    for kind, *rest in blocks:
        if kind in ("h2", "h3", "p"):
            parts.append(f"<{kind}>{html.escape(rest[0])}</{kind}>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(c)}</th>" for c in rest[0])
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rest[1])
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        else:
            data = base64.b64encode(Path(rest[1]).read_bytes()).decode()
            caption = html.escape(rest[0])
            parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{caption}">'
                         f"<figcaption>{caption}</figcaption></figure>")  # fmt: skip
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>brats-fl benchmark</title>'
        f"<style>{_CSS}</style></head><body><h1>brats-fl benchmark</h1>{''.join(parts)}</body></html>\n"
    )


def write_page(out: Path) -> Path:
    """Write ``index.md`` and ``index.html`` into ``out`` from its finished runs; returns ``index.md``."""
    out = Path(out)
    blocks = page_blocks(out)
    (out / "index.html").write_text(_html(blocks))
    index = out / "index.md"
    index.write_text(_markdown(blocks, out))
    return index
