"""Lesion-wise Dice, HD95 and counts by the 2023, 2024 and 2025 rules against cases worked out by hand
(brats_fl.seg.lesions)."""

from __future__ import annotations

import numpy as np
import pytest
from brats_fl.seg.lesions import RULES, case_lesion_scores, lesion_scores, rule_for

PENALTY = RULES["2023"].hd95_penalty  # 374 mm, as BraTS-2023-Metrics charges a missed or invented lesion

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
    assert (scores.lesions, scores.matched, scores.false_positives, scores.false_negatives) == (2, 1, 1, 1)
    # (1 + 0 + 0) / 3 and (0 + 374 + 374) / 3: the voxel-wise Dice would be 2*64/(128+91)
    assert scores.dice == pytest.approx(1 / 3)
    assert scores.hd95 == pytest.approx(2 * PENALTY / 3)


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
    one_to_one = lesion_scores(pred, truth, rule="2025")  # no dilation: two lesions, one found exactly
    assert (one_to_one.lesions, one_to_one.matched, one_to_one.false_negatives) == (2, 1, 1)
    assert one_to_one.dice == 1.0  # the 2025 score is the matched pairs' mean; the miss is counted, not scored


def test_a_prediction_touching_the_dilated_lesion_is_its_match():
    truth = _cube(_empty(), 0)
    pred = _cube(_empty(), 6)  # two voxels beside the lesion: within its dilation, so matched, not a false positive
    scores = lesion_scores(pred, truth)
    assert (scores.matched, scores.false_positives, scores.dice) == (1, 0, 0.0)
    assert scores.hd95 == pytest.approx(6.0)  # every voxel of one cube is 6 mm from the other's on x


def test_empty_masks():
    lesion = _cube(_empty(), 0)
    perfect, nothing = lesion_scores(lesion, lesion), lesion_scores(_empty(), _empty())
    assert (perfect.dice, perfect.hd95, nothing.dice, nothing.hd95) == (1.0, 0.0, 1.0, 0.0)
    missed, invented = lesion_scores(_empty(), lesion), lesion_scores(lesion, _empty())
    assert (missed.dice, missed.hd95, missed.false_positives) == (0.0, PENALTY, 0)
    assert (invented.dice, invented.hd95, invented.false_positives) == (0.0, PENALTY, 1)


def test_refusals():
    with pytest.raises(ValueError, match="unknown lesion rule"):
        lesion_scores(_empty(), _empty(), rule="XYZ")
    with pytest.raises(ValueError, match="unknown region"):
        lesion_scores(_empty(), _empty(), region="NCR")
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
    assert (row["lesions_WT"], row["lesions_matched_WT"], row["lesions_fp_WT"], row["lesions_fn_WT"]) == (2, 1, 1, 1)
    assert row["lesion_rule"] == "2023"  # a case of no known release takes the first lesion-wise rule
    assert metrics.aggregate()["lesion_hd95_mean"] == pytest.approx(2 * PENALTY / 3)
    assert "lesions_fp_mean" not in metrics.aggregate() and metrics.aggregate()["lesions_fp_ET"] == 1.0
    plain = RegionMetrics()
    plain.update(torch.from_numpy(pred), torch.from_numpy(truth))
    assert not any(k.startswith("lesion") for k in plain.aggregate())


@pytest.mark.parametrize(("seed", "rule"), [(0, "2023"), (1, "2024"), (2, "2025")])
def test_scoring_within_the_lesions_box_changes_nothing(seed: int, rule: str, monkeypatch: pytest.MonkeyPatch):
    """Lesions are scored in the box around prediction and truth (``_box``); scored on the whole volume, as the
    definition reads, every figure is the same, lesions at the volume's edge included."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    truth = ndimage.binary_dilation(rng.random((48, 40, 32)) > 0.999, iterations=3)
    pred = ndimage.binary_dilation(truth ^ (rng.random(truth.shape) > 0.9997), iterations=1)
    truth[24:] = False  # the truth in one half, with a lesion at the volume's edge; a false positive at another edge
    truth[0, :3, :3] = pred[0, :3, :3] = pred[-3:, -3:, -4:] = True
    boxed = lesion_scores(pred, truth, spacing=(1.0, 1.2, 1.5), rule=rule)
    monkeypatch.setattr("brats_fl.seg.lesions._box", lambda masks, margin: (slice(None),) * 3)
    whole = lesion_scores(pred, truth, spacing=(1.0, 1.2, 1.5), rule=rule)
    assert boxed == whole and whole.lesions >= 2


def test_the_rule_follows_the_release_unless_one_is_named():
    assert [rule_for("auto", r) for r in ("2020", "2023", "2024-gli-post", None)] == ["2023", "2023", "2024", "2023"]
    assert rule_for("2025", "2020") == "2025"
    with pytest.raises(ValueError, match="unknown lesion rule"):
        rule_for("2022", None)
    with pytest.raises(ValueError, match="no lesion rule for release"):
        rule_for("auto", "1999")
    from brats_fl.seg.metrics import RegionMetrics

    with pytest.raises(ValueError, match="unknown lesion rule"):
        RegionMetrics(lesion_wise=True, lesion_rule="2019")
    import torch

    case = torch.from_numpy(np.stack([_cube(_empty(), 0)] * 3)[None])
    by_release, named = RegionMetrics(lesion_wise=True), RegionMetrics(lesion_wise=True, lesion_rule="2025")
    by_release.update(case, case, releases=["2024-gli-post"])
    named.update(case, case, releases=["2024-gli-post"])
    assert (by_release.per_case()[0]["lesion_rule"], named.per_case()[0]["lesion_rule"]) == ("2024", "2025")


def test_2024_removes_small_predicted_lesions_and_merges_nearby_ones():
    truth = _cube(_empty(), 0)
    pred = _cube(_cube(_empty(), 0), 6, size=2)  # the lesion, and 8 voxels two voxels beside it
    pred[30:32, 5:7, 5:7] = True  # a speck of 8 voxels far away
    of_2023, of_2024 = lesion_scores(pred, truth), lesion_scores(pred, truth, rule="2024")
    # 2023: the near speck is part of the match, the far one a false positive
    assert (of_2023.matched, of_2023.false_positives) == (1, 1)
    assert of_2023.dice == pytest.approx(2 * 64 / (64 + 72) / 2)
    # 2024: the near speck merges with the lesion; the far one (at most 20 voxels) is removed before matching
    assert (of_2024.matched, of_2024.false_positives) == (1, 0)
    assert of_2024.dice == pytest.approx(2 * 64 / (64 + 72))
    assert of_2024.hd95 < RULES["2024"].hd95_penalty
    # a true lesion of 27 mm3 counts in 2024 (above 20 mm3), not in 2023 (at most 50 mm3)
    small = _cube(_empty(), 0, size=3)
    assert (lesion_scores(small, small).lesions, lesion_scores(small, small, rule="2024").lesions) == (0, 1)


def test_2024_merges_enhancing_lesions_that_touch_one_core():
    """Two enhancing rims 4 voxels apart (beyond the dilation of 3) on one necrotic core: one ET lesion in 2024."""
    shape = (3, *SHAPE)
    truth = np.zeros(shape, bool)
    tc, wt, et = (("TC", "WT", "ET").index(r) for r in ("TC", "WT", "ET"))
    truth[et, 0:4, 5:9, 5:9] = truth[et, 12:16, 5:9, 5:9] = True
    truth[tc, 0:16, 5:9, 5:9] = truth[wt, 0:16, 5:9, 5:9] = True  # the core between them: x 4 to 11
    pred = truth.copy()
    pred[et, 12:16] = False  # the second rim missed
    by_2023, by_2024 = (
        case_lesion_scores(pred, truth, (1.0, 1.0, 1.0), "2023"),
        case_lesion_scores(pred, truth, (1.0, 1.0, 1.0), "2024"),
    )
    assert (by_2023[et].lesions, by_2023[et].matched, by_2023[et].dice) == (2, 1, 0.5)
    assert (by_2024[et].lesions, by_2024[et].matched) == (1, 1)
    assert by_2024[et].dice == pytest.approx(2 * 64 / (128 + 64))
    assert by_2024[tc].dice == by_2023[tc].dice == 1.0


def test_2025_matches_one_to_one_on_dice():
    truth = _cube(_empty(), 0, size=6)  # 216 voxels
    pred = _cube(_empty(), 0, size=6)
    pred[3, :, :] = False  # cut in two: x 0-2 (108 voxels) and x 4-5 (72 voxels)
    scores = lesion_scores(pred, truth, rule="2025")
    # the larger part is the lesion's one match; the other, overlapping it too, is a false positive
    assert (scores.lesions, scores.matched, scores.false_positives, scores.false_negatives) == (1, 1, 1, 0)
    assert scores.dice == pytest.approx(2 * 108 / (216 + 108))
    # 2023 takes every component touching the lesion as its match: no false positive
    assert lesion_scores(pred, truth).false_positives == 0
    missed = lesion_scores(_empty(), truth, rule="2025")
    assert (missed.dice, missed.hd95, missed.false_negatives) == (0.0, RULES["2025"].hd95_penalty, 1)
    assert lesion_scores(_empty(), _empty(), rule="2025").dice == 1.0
