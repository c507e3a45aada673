"""Metrics against values computed by hand on tiny masks, and the BraTS conventions for empty masks."""

import pytest
import torch
from brats_fl.data.labels import REGIONS
from brats_fl.seg.metrics import HD95_UNDEFINED, RegionMetrics


def _masks():
    pred = torch.zeros(1, 3, 10, 10, 10)
    truth = torch.zeros(1, 3, 10, 10, 10)
    tc, wt, et = (REGIONS.index(r) for r in ("TC", "WT", "ET"))
    # WT: truth 2x2x2 = 8 voxels, prediction shifted by one voxel along z -> overlap 4
    truth[0, wt, 2:4, 2:4, 2:4] = 1
    pred[0, wt, 2:4, 2:4, 3:5] = 1
    # TC: prediction empty, truth not -> Dice 0, HD95 undefined
    truth[0, tc, 5:7, 5:7, 5:7] = 1
    # ET: both empty -> Dice 1, IoU 1, HD95 0
    return pred, truth


def test_hand_computed_values():
    m = RegionMetrics()
    m.update(*_masks())
    out = m.aggregate()
    assert out["dice_WT"] == pytest.approx(2 * 4 / (8 + 8))  # 0.5
    assert out["iou_WT"] == pytest.approx(4 / 12)
    assert out["hd95_WT"] == pytest.approx(1.0)  # every surface voxel is at most one voxel from the other
    assert out["dice_TC"] == 0.0 and out["iou_TC"] == 0.0 and out["hd95_TC"] == HD95_UNDEFINED
    assert out["dice_ET"] == 1.0 and out["iou_ET"] == 1.0 and out["hd95_ET"] == 0.0
    assert out["dice_mean"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert out["cases"] == 1


def test_spacing_scales_hd95():
    m = RegionMetrics(spacing=(1.0, 1.0, 2.5))
    m.update(*_masks())
    assert m.aggregate()["hd95_WT"] == pytest.approx(2.5)


def test_means_over_cases_and_per_case_rows():
    m = RegionMetrics()
    pred, truth = _masks()
    m.update(torch.cat([pred, truth]), torch.cat([truth, truth]))
    rows = m.per_case()
    assert rows[0]["dice_WT"] == pytest.approx(0.5) and rows[1]["dice_WT"] == 1.0
    assert m.aggregate()["dice_WT"] == pytest.approx(0.75)


def test_no_case_is_an_error():
    with pytest.raises(ValueError, match="no case"):
        RegionMetrics().aggregate()


def test_unannotated_regions_are_not_scored():
    m = RegionMetrics()
    pred, truth = _masks()
    wt_only = torch.tensor([[1.0 if r == "WT" else 0.0 for r in REGIONS]])
    m.update(pred, truth, wt_only)  # only WT annotated: TC's miss and ET's empty match do not count
    m.update(pred, truth)  # the same case, fully annotated
    out = m.aggregate()
    assert out["dice_WT"] == pytest.approx(0.5)
    assert out["dice_TC"] == 0.0 and out["dice_ET"] == 1.0  # from the second case only
    assert out["dice_mean"] == pytest.approx((0.5 + 0.5 + 0.0 + 1.0) / 4)
    first, second = m.per_case()
    assert set(first) == {"dice_WT", "iou_WT", "hd95_WT"}  # no ET volumes either: its labels do not cover ET
    assert len(second) == 9 + 2 and {"volume_ET", "volume_truth_ET"} <= set(second)
    only = RegionMetrics()
    only.update(pred, truth, wt_only)
    assert "dice_TC" not in only.aggregate() and only.aggregate()["dice_mean"] == pytest.approx(0.5)
