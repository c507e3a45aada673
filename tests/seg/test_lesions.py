"""Lesion-wise Dice and HD95 against cases worked out by hand (brats_fl.seg.lesions)."""

from __future__ import annotations

import numpy as np
import pytest
from brats_fl.seg.lesions import lesion_scores
from brats_fl.seg.metrics import HD95_UNDEFINED

SHAPE = (40, 20, 20)


def _cube(mask: np.ndarray, x: int, size: int = 4) -> np.ndarray:
    mask[x : x + size, 5 : 5 + size, 5 : 5 + size] = True
    return mask


def _empty() -> np.ndarray:
    return np.zeros(SHAPE, bool)


def test_a_missed_lesion_and_a_false_positive_each_count_as_zero():
    truth = _cube(_cube(_empty(), 0), 20)  # two lesions of 64 voxels, far apart
    pred = _cube(_cube(_empty(), 0), 33, size=3)  # the first exactly, and a blob where there is none
    scores = lesion_scores(pred, truth)
    assert (scores.lesions, scores.detected, scores.false_positives) == (2, 1, 1)
    # (1 + 0 + 0) / 3 and (0 + 373.13 + 373.13) / 3: the voxel-wise Dice would be 2*64/(128+91)
    assert scores.dice == pytest.approx(1 / 3)
    assert scores.hd95 == pytest.approx(2 * HD95_UNDEFINED / 3)


def test_lesions_of_at_most_50_mm3_are_left_out_with_their_match():
    truth = _cube(_cube(_empty(), 0), 20, size=3)  # 64 voxels and 27 voxels
    pred = _cube(_empty(), 0)  # misses the small one
    scores = lesion_scores(pred, truth)
    assert (scores.lesions, scores.dice, scores.hd95, scores.false_positives) == (1, 1.0, 0.0, 0)
    # found, the small lesion is no false positive either
    assert lesion_scores(truth, truth).false_positives == 0
    # at 0.5 mm slices the large one is 32 mm3: nothing is left to score, and nothing was wrong
    assert lesion_scores(pred, truth, spacing=(1.0, 1.0, 0.5)) == lesion_scores(_empty(), _empty())


def test_nearby_components_are_one_lesion_within_the_dilation():
    truth = _cube(_cube(_empty(), 0), 7)  # x 0-3 and 7-10: three voxels apart
    pred = _cube(_empty(), 0)
    glioma = lesion_scores(pred, truth)  # dilated 3 times, one lesion of 128 voxels, half found
    assert glioma.lesions == 1 and glioma.dice == pytest.approx(2 * 64 / (128 + 64))
    metastases = lesion_scores(pred, truth, rule="MET")  # dilated once: two lesions, one found exactly
    assert metastases.lesions == 2 and metastases.dice == pytest.approx(0.5)
    assert metastases.hd95 == pytest.approx(HD95_UNDEFINED / 2)


def test_a_prediction_touching_the_dilated_lesion_is_its_match():
    truth = _cube(_empty(), 0)
    pred = _cube(_empty(), 6)  # two voxels beside the lesion: within its dilation, so matched, not a false positive
    scores = lesion_scores(pred, truth)
    assert (scores.detected, scores.false_positives, scores.dice) == (1, 0, 0.0)
    assert scores.hd95 == pytest.approx(6.0)  # every voxel of one cube is 6 mm from the other's on x


def test_empty_masks():
    lesion = _cube(_empty(), 0)
    perfect, nothing = lesion_scores(lesion, lesion), lesion_scores(_empty(), _empty())
    assert (perfect.dice, perfect.hd95, nothing.dice, nothing.hd95) == (1.0, 0.0, 1.0, 0.0)
    missed, invented = lesion_scores(_empty(), lesion), lesion_scores(lesion, _empty())
    assert (missed.dice, missed.hd95, missed.false_positives) == (0.0, HD95_UNDEFINED, 0)
    assert (invented.dice, invented.hd95, invented.false_positives) == (0.0, HD95_UNDEFINED, 1)


def test_refusals():
    with pytest.raises(ValueError, match="unknown lesion rule"):
        lesion_scores(_empty(), _empty(), rule="XYZ")
    with pytest.raises(ValueError, match="differ in shape"):
        lesion_scores(np.zeros((4, 4, 4), bool), _empty())


def test_region_metrics_report_lesion_wise_scores_beside_the_voxel_wise_ones():
    import torch
    from brats_fl.seg.metrics import RegionMetrics

    truth = np.stack([_cube(_cube(_empty(), 0), 20)] * 3)[None]  # every region: two lesions
    pred = np.stack([_cube(_cube(_empty(), 0), 33, size=3)] * 3)[None]  # one found, one false positive
    metrics = RegionMetrics(lesion_wise=True)
    metrics.update(torch.from_numpy(pred), torch.from_numpy(truth))
    row = metrics.per_case()[0]
    assert row["lesion_dice_WT"] == pytest.approx(1 / 3) and row["dice_WT"] == pytest.approx(2 * 64 / (128 + 91))
    assert metrics.aggregate()["lesion_hd95_mean"] == pytest.approx(2 * HD95_UNDEFINED / 3)
    plain = RegionMetrics()
    plain.update(torch.from_numpy(pred), torch.from_numpy(truth))
    assert not any(k.startswith("lesion") for k in plain.aggregate())


@pytest.mark.parametrize("seed", range(3))
def test_scoring_within_the_lesions_box_changes_nothing(seed: int, monkeypatch: pytest.MonkeyPatch):
    """Lesions are scored in the box around prediction and truth (``_crop``); scored on the whole volume, as the
    definition reads, every figure is the same, lesions at the volume's edge included."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    truth = ndimage.binary_dilation(rng.random((48, 40, 32)) > 0.999, iterations=3)
    pred = ndimage.binary_dilation(truth ^ (rng.random(truth.shape) > 0.9997), iterations=1)
    truth[24:] = False  # the truth in one half, with a lesion at the volume's edge; a false positive at another edge
    truth[0, :3, :3] = pred[0, :3, :3] = pred[-2:, -2:, -4:] = True
    boxed = lesion_scores(pred, truth, spacing=(1.0, 1.2, 1.5))
    monkeypatch.setattr("brats_fl.seg.lesions._crop", lambda p, t, margin: (p, t))
    whole = lesion_scores(pred, truth, spacing=(1.0, 1.2, 1.5))
    assert boxed == whole and whole.lesions >= 2 and whole.false_positives >= 1
