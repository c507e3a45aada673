import numpy as np
import pytest
import torch
from brats_fl.data.labels import REGIONS, labels_to_regions, regions_to_labels


def test_channel_order_is_tc_wt_et():
    seg = np.array([0, 1, 2, 4], dtype=np.uint8).reshape(4, 1, 1)
    regions = labels_to_regions(seg)
    assert REGIONS == ("TC", "WT", "ET")
    # label 1 (NCR): TC and WT; label 2 (oedema): WT only; label 4 (ET): all three
    assert regions[:, :, 0, 0].astype(int).T.tolist() == [[0, 0, 0], [1, 1, 0], [0, 1, 0], [1, 1, 1]]


def test_round_trip_on_random_label_map():
    rng = np.random.default_rng(0)
    seg = rng.choice([0, 1, 2, 4], size=(9, 8, 7)).astype(np.uint8)
    assert np.array_equal(regions_to_labels(labels_to_regions(seg)), seg)
    assert np.array_equal(regions_to_labels(labels_to_regions(torch.from_numpy(seg))), seg)


def test_non_nested_prediction_becomes_nested_label_map():
    regions = np.zeros((3, 1, 1, 1), dtype=np.float32)
    regions[REGIONS.index("ET")] = 0.9  # ET predicted without TC or WT
    assert regions_to_labels(regions).item() == 4


def test_wrong_channel_count_is_refused():
    with pytest.raises(ValueError, match="3 region channels"):
        regions_to_labels(np.zeros((2, 4, 4, 4)))
