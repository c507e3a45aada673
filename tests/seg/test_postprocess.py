"""Predicted components smaller than a volume per region are removed, nested, with volumes chosen on validation cases
(brats_fl.seg.postprocess) and set by the job parameter min_volume (brats_fl.settings.params.parse_min_volume)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from brats_fl.data.labels import REGIONS
from brats_fl.seg.lesions import AUTO, RULES
from brats_fl.seg.metrics import RegionMetrics
from brats_fl.seg.postprocess import MIN_CASES, Choice, pool, remove_small_components, settle
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


def test_the_volume_is_the_best_on_the_validation_cases_and_the_middle_of_a_tie():
    choice = Choice(rule="2023")
    for speck in (True, True, False):
        choice.add(*_case(speck=speck, true_speck=False), (1.0, 1.0, 1.0))
    volumes, notes = choice.volumes()
    # 10 to 200 mm³ remove every speck (8 mm³) and keep the tumour (WT 216, TC 64, ET 27 mm³): each region's middle
    # of its best, geometric: WT sqrt(10 * 200) = 45 -> 50; TC sqrt(10 * 50) = 22 -> 25; ET sqrt(10 * 25) = 16 -> 10
    # (as far from 25 as from 10: the smaller)
    assert volumes == {"WT": 50.0, "TC": 25.0, "ET": 10.0} and not notes
    # a small true lesion of 27 mm³ in a fourth case: only 10 and 25 mm³ keep it and remove the speck
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
    assert (volumes["WT"], volumes["ET"]) == (50.0, 10.0) and set(notes) == {"TC"}


def test_the_setting_and_its_refusals():
    assert parse_min_volume("none") == "none" and parse_min_volume("auto") == "auto"
    assert parse_min_volume("50") == dict.fromkeys(REGION_NAMES, 50.0)
    assert parse_min_volume("WT=100, ET=25") == {"TC": 0.0, "WT": 100.0, "ET": 25.0}
    for bad in ("-1", "XX=5", "WT=", "ET=-3", "nan", "some"):
        with pytest.raises(ValueError, match="min_volume: need none, auto"):
            parse_min_volume(bad)
    # the schema's names are the library's
    assert REGION_NAMES == REGIONS and (AUTO, *RULES) == LESION_RULE_NAMES


def _choice(specks: list[bool], annotated: list[bool] | None = None) -> Choice:
    choice = Choice(rule="2023")
    for speck in specks:
        choice.add(*_case(speck=speck, true_speck=False), (1.0, 1.0, 1.0), annotated=annotated)
    return choice


def test_pooled_sums_are_the_sums_over_every_case_and_survive_the_wire():
    sites = [_choice([True]), _choice([False, True]), _choice([], annotated=[True, False, True])]
    pooled = pool(Choice.from_dict(c.to_dict()) for c in sites)
    every = _choice([True, False, True])
    for region in REGIONS:
        assert pooled.cases[region] == every.cases[region] == 3
        np.testing.assert_allclose(pooled.totals[region], every.totals[region])
    assert pooled.volumes() == every.volumes() == ({"TC": 25.0, "WT": 50.0, "ET": 10.0}, {})
    with pytest.raises(ValueError, match="different lesion rules"):
        pool([Choice(rule="2023"), Choice(rule="2025")])
    with pytest.raises(ValueError, match="candidates"):
        Choice.from_dict(sites[0].to_dict() | {"candidates": [0.0, 5.0]})


def test_a_region_takes_the_sites_own_volume_where_its_split_suffices_else_the_pooled_one():
    # the site's own three cases have no speck in TC and ET but annotate WT in one case only
    own = Choice(rule="2023")
    for annotated in ([True, True, True], [True, False, True], [True, False, True]):
        own.add(*_case(speck=False, true_speck=False), (1.0, 1.0, 1.0), annotated=annotated)
    pooled = pool([own, _choice([True] * MIN_CASES)])
    record = settle(own, pooled, "site-1", "site-1, site-2's validation splits")
    # TC and ET: its own (nothing to remove: 0); WT: the pooled cases' specks choose 50 mm³
    assert record["volumes"] == {"TC": 0.0, "WT": 50.0, "ET": 0.0} and record["pooled"] == ["WT"]
    assert record["chosen"]["WT"] == "pooled over site-1, site-2's validation splits (4 cases)"
    assert record["chosen"]["TC"] == "on site-1's validation split (3 cases)" and "notes" not in record
    # without a pool, or with one too small as well, the region keeps every component and the record says why
    alone = settle(own, None, "site-1")
    assert (
        alone["volumes"]["WT"] == 0.0 and alone["pooled"] == [] and "site-1's validation split" in alone["notes"]["WT"]
    )
    small = settle(own, pool([own]), "site-1", "site-1's validation splits")
    assert (
        small["volumes"]["WT"] == 0.0
        and "1 validation case(s) of site-1's validation splits together" in small["notes"]["WT"]
    )


def test_a_test_split_is_scored_with_and_without_post_processing_from_the_same_predictions(tmp_path, monkeypatch):
    """``Trainer.evaluate``: the scores without post-processing are those of the unprocessed predictions (HD95 left
    out), and a choice fed by the same pass sees every case."""
    from brats_fl.data.layout import MODALITIES, SEG, find_cases
    from brats_fl.data.loading import eval_loader, eval_transforms
    from brats_fl.seg.trainer import UNPROCESSED, TrainConfig, Trainer
    from conftest import write_case

    write_case(tmp_path, "BraTS20_Training_001", shape=(32, 32, 24))
    (case,) = find_cases(tmp_path)
    item = {"image": [case.files[m] for m in MODALITIES], "label": case.files[SEG], "case_id": case.case_id}
    label = eval_transforms()({"image": [str(p) for p in item["image"]], "label": str(item["label"])})["label"]
    speckled = label.as_tensor().clone()
    speckled[:, 1:3, 1:3, 1:3] = 1  # a false speck of 8 voxels in every region, in a corner far from the tumour
    config = {"channels": [4, 8], "strides": [2], "num_res_units": 1, "init_seed": 0}
    trainer = Trainer(TrainConfig.from_dict({"model": config, "patch_size": [16, 16, 16], "threads": 1}))
    monkeypatch.setattr(trainer, "_sliding", lambda image: (speckled[None].float() * 2 - 1) * 20)

    plain = trainer.evaluate(eval_loader([item]), per_case=True)
    choice = Choice()
    cleaned = trainer.evaluate(
        eval_loader([item]), per_case=True, min_volume=dict.fromkeys(REGIONS, 10.0), choice=choice
    )
    assert plain["lesions_fp_WT"] == 1 and cleaned["lesions_fp_WT"] == 0 and cleaned["lesion_dice_WT"] == 1.0
    for region in REGIONS:
        for metric in ("dice", "lesion_dice", "lesions_fp"):
            key = f"{metric}_{region}"
            assert cleaned[f"{UNPROCESSED}{key}"] == plain[key]
            assert cleaned["per_case"][0][f"{UNPROCESSED}{key}"] == plain["per_case"][0][key]
    assert not any(k.startswith(f"{UNPROCESSED}hd95") for k in cleaned) and "hd95_WT" in cleaned
    assert choice.cases == dict.fromkeys(REGIONS, 1) and not any(k.startswith(UNPROCESSED) for k in plain)
