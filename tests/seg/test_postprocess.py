"""A small predicted enhancing tumour becomes necrotic core, below a threshold chosen on validation cases."""

from __future__ import annotations

import pytest
import torch
from brats_fl.data.labels import REGIONS
from brats_fl.seg.metrics import HD95_UNDEFINED, RegionMetrics
from brats_fl.seg.postprocess import choose_et_min_volume, drop_small_et, et_dice_at

ET, TC = REGIONS.index("ET"), REGIONS.index("TC")


def _case(et_pred: int, et_true: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A core of 1000 voxels in both; ``et_pred`` / ``et_true`` voxels of it enhancing."""
    pred, truth = torch.zeros(1, 3, 20, 10, 10), torch.zeros(1, 3, 20, 10, 10)
    for t, et in ((pred, et_pred), (truth, et_true)):
        t[0, :2] = 1  # TC and WT: the whole grid
        t[0, ET].view(-1)[:et] = 1
    return pred, truth


def test_a_small_et_in_a_low_grade_case_becomes_core():
    pred, truth = _case(et_pred=30, et_true=0)
    raw, cleaned = RegionMetrics(), RegionMetrics()
    raw.update(pred, truth)
    cleaned.update(drop_small_et(pred, [(1.0, 1.0, 1.0)], 50.0), truth)
    assert (raw.per_case()[0]["dice_ET"], raw.per_case()[0]["hd95_ET"]) == (0.0, HD95_UNDEFINED)
    assert (cleaned.per_case()[0]["dice_ET"], cleaned.per_case()[0]["hd95_ET"]) == (1.0, 0.0)
    assert cleaned.per_case()[0]["dice_TC"] == 1.0  # the voxels stay tumour core
    # in mm³: at 2 mm voxels the same 30 voxels are 240 mm³, above the threshold
    assert drop_small_et(pred, [(2.0, 2.0, 2.0)], 50.0)[0, ET].sum() == 30


def test_the_threshold_is_the_best_on_the_validation_rows_and_the_smallest_on_a_tie():
    rows = [
        {"dice_ET": 0.0, "volume_ET": 80.0, "volume_truth_ET": 0.0},  # a low-grade case with a false ET
        {"dice_ET": 0.9, "volume_ET": 400.0, "volume_truth_ET": 380.0},
        {"dice_ET": 0.6, "volume_ET": 150.0, "volume_truth_ET": 120.0},  # a small true ET
    ]
    assert et_dice_at(rows, 0.0) == pytest.approx(0.5)
    assert et_dice_at(rows, 100.0) == pytest.approx((1.0 + 0.9 + 0.6) / 3)
    assert et_dice_at(rows, 200.0) == pytest.approx((1.0 + 0.9 + 0.0) / 3)
    assert choose_et_min_volume(rows) == 100.0  # 100 and any value up to 150 tie; the smallest candidate wins
    assert choose_et_min_volume(rows[1:]) == 0.0  # nothing to gain: the rule stays off
    with pytest.raises(ValueError, match="no case with an ET score"):
        choose_et_min_volume([{"dice_WT": 1.0, "volume_ET": 0.0, "volume_truth_ET": 0.0}])


def test_metrics_rows_carry_the_et_volumes_in_mm3():
    pred, truth = _case(et_pred=30, et_true=12)
    metrics = RegionMetrics()
    metrics.update(pred, truth, spacing=[(1.0, 1.0, 2.0)])
    row = metrics.per_case()[0]
    assert (row["volume_ET"], row["volume_truth_ET"]) == (60.0, 24.0)
