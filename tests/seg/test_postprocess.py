"""Predicted components smaller than a volume per region are removed, nested, with volumes chosen on validation cases
(brats_fl.seg.postprocess) and set by the job parameter min_volume (brats_fl.settings.params.parse_min_volume)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from brats_fl.data.labels import REGIONS
from brats_fl.seg.lesions import AUTO, RULES
from brats_fl.seg.metrics import RegionMetrics
from brats_fl.seg.postprocess import MIN_CASES, Choice, remove_small_components
from brats_fl.settings.params import LESION_RULE_NAMES, REGION_NAMES, parse_min_volume

TC, WT, ET = (REGIONS.index(r) for r in ("TC", "WT", "ET"))
SHAPE = (30, 12, 12)


def _tumour() -> torch.Tensor:
    """One case (1, 3, X, Y, Z): a tumour of 6^3 voxels with a core of 4^3 and an enhancing part of 3^3."""
    pred = torch.zeros(1, 3, *SHAPE)
    pred[0, WT, 0:6, 0:6, 0:6] = 1
    pred[0, TC, 1:5, 1:5, 1:5] = 1
    pred[0, ET, 1:4, 1:4, 1:4] = 1
    return pred


def test_small_components_go_and_the_regions_stay_nested():
    pred = _tumour()
    pred[0, :, 20:22, 0:2, 0:2] = 1  # a speck of 8 voxels in every region, far from the tumour
    # ET: the tumour's 27 enhancing voxels and the speck's 8 are below 30 mm³; they stay core
    out = remove_small_components(pred, [(1.0, 1.0, 1.0)], {"ET": 30.0})
    assert out[0, ET].sum() == 0 and torch.equal(out[0, TC], pred[0, TC]) and torch.equal(out[0, WT], pred[0, WT])
    # WT: the speck goes from every region, the tumour (216 voxels) stays whole
    out = remove_small_components(pred, [(1.0, 1.0, 1.0)], {"WT": 10.0})
    assert torch.equal(out, _tumour())
    # TC: the speck leaves the core and its ET with it, and stays oedema
    out = remove_small_components(pred, [(1.0, 1.0, 1.0)], {"TC": 10.0})
    assert out[0, TC, 20:22].sum() == out[0, ET, 20:22].sum() == 0 and out[0, WT, 20:22].sum() == 8
    # volumes are in mm³: at 2 mm voxels the speck is 64 mm³
    assert remove_small_components(pred, [(2.0, 2.0, 2.0)], {"WT": 50.0})[0, WT, 20:22].sum() == 8
    assert torch.equal(remove_small_components(pred, None, {}), pred)


def test_the_removal_pays_in_lesion_wise_dice():
    truth = _tumour()
    pred = truth.clone()
    pred[0, :, 20:22, 0:2, 0:2] = 1
    before, after = RegionMetrics(lesion_wise=True), RegionMetrics(lesion_wise=True)
    before.update(pred, truth)
    after.update(remove_small_components(pred, None, {"WT": 10.0}), truth)
    assert before.aggregate()["lesions_fp_WT"] == 1 and before.aggregate()["lesion_dice_WT"] == pytest.approx(0.5)
    assert after.aggregate()["lesions_fp_WT"] == 0 and after.aggregate()["lesion_dice_WT"] == 1.0


def _case(speck: bool, true_speck: bool) -> tuple[np.ndarray, np.ndarray]:
    truth = _tumour()[0].bool().numpy()
    pred = truth.copy()
    if true_speck:
        truth[:, 20:23, 0:3, 0:3] = True  # a small true lesion of 27 voxels
        pred[:, 20:23, 0:3, 0:3] = True
    if speck:
        pred[:, 25:27, 8:10, 8:10] = True  # a false speck of 8 voxels
    return pred, truth


def test_the_volume_is_the_best_on_the_validation_cases_and_the_smallest_on_a_tie():
    choice = Choice(rule="2023")
    for speck in (True, True, False):
        choice.add(*_case(speck=speck, true_speck=False), (1.0, 1.0, 1.0))
    volumes, notes = choice.volumes()
    assert volumes == dict.fromkeys(REGIONS, 10.0) and not notes  # 10 mm³ removes every speck, nothing true
    # a small true lesion of 27 mm³ in a fourth case: 10 and 25 mm³ keep it and remove the speck; the tie goes to
    # the smaller
    choice.add(*_case(speck=True, true_speck=True), (1.0, 1.0, 1.0))
    assert choice.volumes()[0]["WT"] == 10.0
    # with no speck anywhere nothing is gained: every component stays
    clean = Choice()
    for _ in range(MIN_CASES):
        clean.add(*_case(speck=False, true_speck=True), (1.0, 1.0, 1.0))
    assert clean.volumes() == (dict.fromkeys(REGIONS, 0.0), {})


def test_a_split_too_small_for_a_region_does_not_choose_for_it_and_says_so():
    choice = Choice()
    for _ in range(MIN_CASES):
        choice.add(*_case(speck=True, true_speck=False), (1.0, 1.0, 1.0), annotated=[False, True, True])
    volumes, notes = choice.volumes()
    assert volumes["TC"] == 0.0 and "0 validation case(s) annotate TC" in notes["TC"]
    assert volumes["WT"] == volumes["ET"] == 10.0 and set(notes) == {"TC"}


def test_the_setting_and_its_refusals():
    assert parse_min_volume("none") == "none" and parse_min_volume("auto") == "auto"
    assert parse_min_volume("50") == dict.fromkeys(REGION_NAMES, 50.0)
    assert parse_min_volume("WT=100, ET=25") == {"TC": 0.0, "WT": 100.0, "ET": 25.0}
    for bad in ("-1", "XX=5", "WT=", "ET=-3", "nan", "some"):
        with pytest.raises(ValueError, match="min_volume: need none, auto"):
            parse_min_volume(bad)
    # the schema's names are the library's
    assert REGION_NAMES == REGIONS and (AUTO, *RULES) == LESION_RULE_NAMES
