"""``benchmarks/paper_tables.py``: the reference papers' tables from a benchmark folder's summaries."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import benchmark_script

CASES = [f"case-{i:02d}" for i in range(24)]


@pytest.fixture(scope="module")
def tables():
    return benchmark_script("paper_tables")


def _write(folder: Path, seed: int, mean: float, loss: float | None) -> None:
    rng = np.random.default_rng(seed)
    rows = []
    for i, case in enumerate(CASES):
        dice = {r: float(np.clip(mean + 0.1 * np.sin(i) + rng.normal(0, 0.01), 0, 1)) for r in ("WT", "TC", "ET")}
        iou = {r: v / (2 - v) for r, v in dice.items()}
        rows.append({"case_id": case, "site": f"site-{i % 2 + 1}", **{f"dice_{r}": v for r, v in dice.items()},
                     **{f"iou_{r}": v for r, v in iou.items()}, "dice_mean": float(np.mean(list(dice.values()))),
                     "iou_mean": float(np.mean(list(iou.values())))})  # fmt: skip
    summary = {
        "seed": seed,
        "per_case": rows,
        "val_dice": {"site-1": [0.2, mean], "site-2": [0.4, mean]},
        "train_loss": {"site-1": [0.9, 0.5], "site-2": [0.7, 0.3]},
    }
    if loss is not None:  # a run of a brats-fl before the client loss was recorded has none
        summary["client_train_loss"] = loss
    (folder / f"seed{seed}").mkdir(parents=True)
    (folder / f"seed{seed}" / "summary.json").write_text(json.dumps(summary))


def _row(markdown: str, label: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if line.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_rows_carry_intervals_the_papers_numbers_and_tests(tables, tmp_path: Path):
    for seed in range(3):
        _write(tmp_path / "runs/iid/brats_central", seed, 0.8, 0.2 + 0.1 * seed)
        _write(tmp_path / "runs/iid/brats_fedavg", seed, 0.6, None)
    _write(tmp_path / "runs/quantity/brats_fedavg", 0, 0.5, 0.4)
    md = tables.table(tmp_path, tables.REF_000)
    central = _row(md, "centralized, equal")
    assert central[1] == "3" and central[-3:] == ["0.708", "", ""]
    estimate, low, high = (float(x) for x in re.findall(r"[0-9.]+", central[5]))
    assert low < estimate < high and estimate == pytest.approx(0.8, abs=0.01)
    assert central[7] == "0.300 (0.200–0.400)"
    fedavg = _row(md, "FedAvg, equal")
    assert fedavg[7] == "" and fedavg[-3:] == ["0.6941", "0.5695", "0.3096"]
    assert "FedPer, unequal" not in md and "centralized, unequal" not in md  # no runs: no row
    # rows on one partition are tested against each other, on the seeds both have; iid against quantity is not
    tests = [line for line in md.splitlines() if "(seeds 0" in line]
    assert len(tests) == 1
    cells = [c.strip() for c in tests[0].strip("|").split("|")]
    assert cells[0] == "centralized, equal (seeds 0, 1, 2)" and cells[3] == "+0.200" and cells[-1] == "better"


def test_curves_are_written_for_the_rows_that_ran(tables, tmp_path: Path):
    _write(tmp_path / "variants/fedavg_nnunet", 0, 0.7, 0.3)
    figures = tables.curves(tmp_path, tables.REF_004, tmp_path / "figures")
    assert [f.name for f in figures] == ["nnunet_server_side.png", "nnunet_client_side.png"]
    assert all(f.stat().st_size > 1000 for f in figures)
    assert tables.curves(tmp_path / "empty", tables.REF_004, tmp_path / "none") == []


def test_site_table_gives_each_sites_mean_over_seeds_and_each_seed(tables, tmp_path: Path):
    for seed in range(2):
        _write(tmp_path / "runs/scanners/brats_fedavg", seed, 0.5 + 0.1 * seed, None)
    row = _row(tables.site_table(tmp_path, tables.REF_001), "FedAvg")
    site_1 = [np.mean([0.5 + 0.1 * seed + 0.1 * np.sin(i) for i in range(0, 24, 2)]) for seed in range(2)]
    mean, per_seed = row[1].split(" ")
    assert float(mean) == pytest.approx(np.mean(site_1), abs=0.01)
    assert [float(v) for v in per_seed.strip("()").split("/")] == pytest.approx(site_1, abs=0.01)
    assert tables.site_table(tmp_path, tables.REF_000) == ""
