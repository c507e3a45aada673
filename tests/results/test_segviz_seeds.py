"""``benchmarks/segviz_seeds.py``: reference 003's tables over seeds from ``brats-fl compare``'s per-seed output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import benchmark_script

CASES = [f"case-{i:02d}" for i in range(12)]
#: scheme -> the mean Dice its synthetic cases scatter around
MEANS = {"Baseline (single-task)": 0.3, "Central (naive pooling)": 0.3, "FedAvg": 0.6, "FedAvg + FT": 0.3}


@pytest.fixture(scope="module")
def segviz():
    return benchmark_script("segviz_seeds")


def _comparison(seed: int, cases: dict[str, list[str]] | None = None) -> dict:
    rng = np.random.default_rng(seed)
    scores = {}
    for scheme, mean in MEANS.items():
        regions = {}
        for region in ("WT", "TC", "ET"):
            names = (cases or {}).get(scheme, CASES)
            regions[region] = {c: float(mean + 0.05 * np.sin(i) + rng.normal(0, 0.01)) for i, c in enumerate(names)}
        scores[scheme] = {"in_federation": regions, "external": regions}
    return scores


def _write(out: Path, seed: int, doc: dict) -> None:
    (out / f"seed{seed}").mkdir(parents=True)
    (out / f"seed{seed}" / "comparison.json").write_text(json.dumps(doc))


def _rows(markdown: str, first: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith(f"| {first} |")]  # fmt: skip


def test_intervals_over_seeds_and_holm_corrected_verdicts(segviz, tmp_path: Path):
    for seed in range(3):
        _write(tmp_path, seed, _comparison(seed))
    md = segviz.table(tmp_path)
    assert md.startswith("Seeds: 3.")
    fedavg = _rows(md, "FedAvg")
    # one row per split, then its tests: 3 regions x (baseline, central) per split
    estimate, low, high = map(float, fedavg[0][1].replace("[", "").replace("]", "").replace(",", "").split())
    assert low < estimate < high and abs(estimate - 0.6) < 0.05
    verdicts = [r for r in fedavg if len(r) == 7]
    assert len(verdicts) == 12 and {r[-1] for r in verdicts} == {"better"}
    # the baseline's mean, apart by noise alone: not separated
    near = [r for r in _rows(md, "FedAvg + FT") if len(r) == 7 and r[1] == "Baseline (single-task)"]
    assert near and {r[-1] for r in near} == {"not separated"}
    # the two references are tested against each other once per region and split, not once each way
    assert len(_rows(md, "Baseline (single-task)")) == 2 + 6 and len(_rows(md, "Central (naive pooling)")) == 2


def test_schemes_scored_on_other_cases_are_refused(segviz, tmp_path: Path):
    _write(tmp_path, 0, _comparison(0, {"FedAvg": [c + "x" for c in CASES]}))
    with pytest.raises(ValueError, match="FedAvg and Baseline"):
        segviz.table(tmp_path)


def test_no_seed_yet(segviz, tmp_path: Path):
    assert segviz.table(tmp_path).startswith("No seed")


def test_run_skips_a_scored_seed_and_runs_and_scores_the_next(segviz, tmp_path: Path, monkeypatch):
    """A seed whose comparison is kept is not run again: its runs are not in the repository, only its scores."""
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(segviz, "_cli", lambda *args: calls.append(args))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "site_config.json").write_text("{}")
    _write(tmp_path, 0, _comparison(0))
    segviz.run(tmp_path, 2)
    assert [c[0] for c in calls] == ["run"] * len(segviz.JOBS) + ["compare"]
    assert all(c[c.index("--seed") + 1] == "1" for c in calls[:-1])
    assert calls[-1][-1] == str(tmp_path / "seed1")
