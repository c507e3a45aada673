"""Compare schemes case by case, as the SegViz paper's Tables 1 and 2: mean Dice (SD) per region on the
in-federation cases and on an external, fully labelled site, with paired t-tests against the baselines.

Which model predicts a region: the models of the sites that annotate it (each site's final model: the
federated one with its personal layers, or its fine-tuned one). For FedAvg these are copies of the global
model; for FedBN each carries its site's normalisation; for the local baseline each site's own single-task
model; for the central model the one pooled model. A region annotated at several sites is scored with each of
their models and the Dice averaged per case. In-federation cases are the validation and test splits of the
annotating sites (never used for training or model selection by the SegViz jobs); external cases are scored on
every region.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from brats_fl.data.datalist import load_datalist
from brats_fl.data.labels import DISPLAY_ORDER
from brats_fl.data.layout import MODALITIES, SEG, find_cases
from brats_fl.data.loading import eval_loader
from brats_fl.jobs.registry import JOBS
from brats_fl.protocol import SITE_FOLDER, SITE_MODEL_FILE, SITE_RECORD
from brats_fl.results.report import markdown_table
from brats_fl.seg.model import fingerprint
from brats_fl.seg.trainer import TrainConfig, Trainer, load_model

#: scheme names of the SegViz jobs, as in the paper's tables (``brats_fl.jobs.registry.Job.scheme``)
SCHEMES = {name: job.scheme for name, job in JOBS.items() if job.scheme}
BASELINE, CENTRAL = SCHEMES["brats_segviz_local"], SCHEMES["brats_segviz_central"]


@dataclass
class SiteModels:
    """One site of a run: the regions it annotates, its in-federation cases, its model per stage."""

    site: str
    annotated: list[str]
    cases: list[dict]
    train: dict
    models: dict[str, Path] = field(default_factory=dict)


def run_sites(run: Path) -> tuple[str, list[SiteModels]]:
    """The job name and the sites of a finished simulator run (a ``brats-fl run`` workspace or its job folder)."""
    records = sorted(Path(run).glob(f"**/site-*/simulate_job/{SITE_FOLDER}/{SITE_RECORD}"))
    if not records:
        raise FileNotFoundError(f"{run}: no site records (site-*/simulate_job/brats_fl/site.json) below this folder")
    job = records[0].parents[3].name
    sites = []
    for record in records:
        doc = json.loads(record.read_text())
        datalist = load_datalist(Path(doc["data"]["datalist"]), Path(doc["data"]["data_root"]), check=False)
        held_out = datalist.items("validation") + datalist.items("test")
        entry = SiteModels(doc["site"], doc.get("annotated") or datalist.annotated(), held_out, doc["train"])
        final, before = record.parent / SITE_MODEL_FILE, record.parent / "before_finetune_model.pt"
        if not final.is_file():
            raise FileNotFoundError(f"{final}: the site kept no final model; did the run finish?")
        # with fine-tuning, the model before it is the scheme itself and the final one "+ FT"
        entry.models = {"": before, " + FT": final} if before.is_file() else {"": final}
        sites.append(entry)
    return job, sites


def external_items(folder: Path) -> list[dict]:
    """Every case of a fully labelled BraTS-layout folder, as evaluation items."""
    cases = find_cases(folder)
    if not cases:
        raise FileNotFoundError(f"{folder}: no BraTS case folder found")
    return [{"case_id": c.case_id, "image": [c.files[m] for m in MODALITIES], "label": c.files[SEG]} for c in cases]


class Scorer:
    """Per-case Dice of models on item lists; a model evaluated once per item list (FedAvg's copies are equal)."""

    def __init__(self, threads: int | None = None):
        self.threads = threads
        self._done: dict[tuple[str, str], dict[str, dict[str, float]]] = {}

    def dice(self, model_file: Path, train: dict, items: list[dict], tag: str) -> dict[str, dict[str, float]]:
        """``{case_id: {region: dice}}`` for the regions each item annotates."""
        model = load_model(model_file)
        key = (fingerprint(model.state_dict()), tag)
        if key not in self._done:
            config = TrainConfig.from_dict({**train, "model": model.config(), "threads": self.threads})
            # Dice alone: the tables compare nothing else, and surface distances cost most of a case's scoring
            trainer = Trainer(config, model=model)
            rows = trainer.evaluate(eval_loader(items), per_case=True, distances=False)["per_case"]
            self._done[key] = {
                r["case_id"]: {g: r[f"dice_{g}"] for g in DISPLAY_ORDER if f"dice_{g}" in r} for r in rows
            }
        return self._done[key]


def scheme_scores(run: Path, external: list[dict], scorer: Scorer) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """``{scheme: {"in_federation"|"external": {region: {case_id: dice}}}}`` for one run."""
    job, sites = run_sites(run)
    if job not in SCHEMES:
        raise ValueError(f"{run}: job {job!r} is not a SegViz job ({sorted(SCHEMES)})")
    out: dict = {}
    for suffix in sites[0].models:
        scores: dict[str, dict[str, dict[str, list[float]]]] = {"in_federation": {}, "external": {}}
        for site in sites:
            model = site.models[suffix]
            own = scorer.dice(model, site.train, site.cases, f"{site.site}-held-out")
            ext = scorer.dice(model, site.train, external, "external")
            for region in site.annotated:
                for split, per_case in (("in_federation", own), ("external", ext)):
                    for case, values in per_case.items():
                        if region in values:
                            scores[split].setdefault(region, {}).setdefault(case, []).append(values[region])
        out[SCHEMES[job] + suffix] = {
            split: {r: {c: float(np.mean(v)) for c, v in cases.items()} for r, cases in regions.items()}
            for split, regions in scores.items()
        }
    return out


def paired_p(a: dict[str, float], b: dict[str, float]) -> float | None:
    """Two-sided paired t-test over the cases both schemes scored; None with fewer than 2 pairs or no spread."""
    common = sorted(set(a) & set(b))
    x, y = np.array([a[c] for c in common]), np.array([b[c] for c in common])
    if len(common) < 2 or np.allclose(x - y, (x - y)[0]):
        return None
    return float(stats.ttest_rel(x, y).pvalue)


def comparison_table(scores: dict, split: str) -> tuple[list[str], list[list[str]]]:
    """Mean Dice (SD) per region; p-values of paired t-tests against the baseline and the central model."""
    header = [
        "Scheme",
        *(f"{r} Dice (SD)" for r in DISPLAY_ORDER),
        *(f"p vs baseline / central {r}" for r in DISPLAY_ORDER),
    ]
    rows = []
    for scheme, splits in scores.items():
        per_region = splits[split]
        cells = []
        for region in DISPLAY_ORDER:
            values = list(per_region.get(region, {}).values())
            cells.append(
                f"{np.mean(values):.3f} ({np.std(values, ddof=1) if len(values) > 1 else 0:.3f})" if values else "-"
            )
        tests = []
        for region in DISPLAY_ORDER:
            mine = per_region.get(region, {})
            parts = []
            for other in (BASELINE, CENTRAL):
                theirs = scores.get(other, {}).get(split, {}).get(region, {})
                p = paired_p(mine, theirs) if other != scheme else None
                parts.append("-" if p is None else "<0.001" if p < 0.001 else f"{p:.3f}")
            tests.append(" / ".join(parts))
        rows.append([scheme, *cells, *tests])
    return header, rows


def compare_runs(runs: Sequence[Path], external: Path, out: Path, threads: int | None = None) -> Path:
    """Score every run's schemes, write ``comparison.json`` and ``comparison.md`` into ``out``; returns the latter."""
    items = external_items(external)
    scorer = Scorer(threads)
    scores: dict = {}
    for run in runs:
        scores |= scheme_scores(Path(run), items, scorer)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(scores, indent=1))
    n_ext = len(items)
    parts = []
    for split, title in (
        ("in_federation", "In-federation validation + test cases"),
        ("external", f"External site ({n_ext} cases, every region)"),
    ):
        parts += [f"### {title}", "", markdown_table(*comparison_table(scores, split)), ""]
    path = out / "comparison.md"
    path.write_text("\n".join(parts))
    return path
