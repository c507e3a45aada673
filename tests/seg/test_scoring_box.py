"""Scoring a case on the box around its tumour (``tumour_box``) gives the scores of the whole volume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from brats_fl.seg.metrics import RegionMetrics
from brats_fl.seg.trainer import BOX_MARGIN, tumour_box


def _ball(shape, centre, radius) -> torch.Tensor:
    grid = np.indices(shape).astype(np.float32)
    dist = np.sqrt(sum((grid[i] - centre[i]) ** 2 for i in range(3)))
    return torch.as_tensor(dist < radius)


def _case(seed: int, shape=(60, 56, 44)) -> tuple[torch.Tensor, torch.Tensor]:
    """Nested true regions (WT > TC > ET) and a prediction that misses part of them and adds far-off specks."""
    rng = np.random.default_rng(seed)
    centre = rng.uniform(20, 40, 3)
    truth = torch.stack([_ball(shape, centre, r) for r in (7.0, 11.0, 4.0)])  # TC, WT, ET (REGIONS order)
    pred = torch.stack([_ball(shape, centre + rng.normal(0, 1.5, 3), r) for r in (6.0, 12.0, 3.0)])
    for _ in range(3):  # false-positive specks far from the tumour: separate lesions, long surface distances
        x, y, z = (int(v) for v in rng.integers(2, np.array(shape) - 3))
        pred[:, x : x + 2, y : y + 2, z : z + 2] = True
    return pred.float(), truth.float()


def _scores(pred: torch.Tensor, truth: torch.Tensor, spacing) -> dict:
    metrics = RegionMetrics(lesion_wise=True)
    metrics.update(pred[None], truth[None], spacing=[spacing])
    return metrics.per_case()[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_the_box_gives_every_score_of_the_whole_volume(seed: int):
    pred, truth = _case(seed)
    spacing = (1.0, 1.2, 2.0)
    box = tumour_box(pred, truth)
    boxed = _scores(pred[None][box][0], truth[None][box][0], spacing)
    whole = _scores(pred, truth, spacing)
    assert boxed.keys() == whole.keys()
    for key, value in whole.items():
        assert boxed[key] == pytest.approx(value, abs=1e-6), key
    # and the box is smaller than the volume, or it would test nothing
    assert pred[None][box].numel() < pred[None].numel()


def test_the_box_holds_every_tumour_voxel_with_its_margin():
    pred, truth = torch.zeros(3, 40, 40, 40), torch.zeros(3, 40, 40, 40)
    truth[1, 10:15, 20:22, 30:31] = 1
    pred[0, 12:13, 5:6, 18:19] = 1
    box = tumour_box(pred, truth)
    low = (10, 5, 18)
    high = (15, 22, 31)
    wanted = [slice(max(0, lo - BOX_MARGIN), min(40, hi + BOX_MARGIN)) for lo, hi in zip(low, high, strict=True)]
    assert box[2:] == tuple(wanted)


def test_a_case_without_tumour_scores_as_an_empty_case():
    empty = torch.zeros(3, 30, 30, 30)
    box = tumour_box(empty, empty)
    boxed = _scores(empty[None][box][0], empty[None][box][0], (1.0, 1.0, 1.0))
    assert boxed == _scores(empty, empty, (1.0, 1.0, 1.0))


@pytest.mark.parametrize("rule", ["2023", "2024", "2025"])
def test_lesion_wise_scores_without_distances_are_the_same_dice_and_counts(rule: str):
    """What the post-processing's choice and the scores without post-processing use: no HD95, the rest alike."""
    pred, truth = _case(3)
    full, cheap = (
        RegionMetrics(lesion_wise=True, lesion_rule=rule),
        RegionMetrics(lesion_wise=True, distances=False, lesion_rule=rule),
    )
    for metrics in (full, cheap):
        metrics.update(pred[None], truth[None], spacing=[(1.0, 1.0, 1.0)])
    with_distances, without = full.per_case()[0], cheap.per_case()[0]
    assert not any("hd95" in key for key in without)
    assert {k: v for k, v in with_distances.items() if "hd95" not in k} == without
    # the specks are counted, except by the 2024 rule, which drops predicted lesions of at most 20 voxels itself
    assert without["lesions_fp_WT"] > 0 or rule == "2024"
