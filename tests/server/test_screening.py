"""Broken and hostile updates: refused by the server's aggregator in a real FLARE simulation (no mocks)."""

from __future__ import annotations

import re

import pytest
import torch
from brats_fl.jobs.catalogue import JobParams
from brats_fl.server.screening import ScreenedAggregator, problem
from nvflare.app_common.abstract.fl_model import FLMetaKey, FLModel

SHAPES = {"w": [2, 3], "b": [3]}


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        ({"w": torch.ones(2, 3), "b": torch.zeros(3)}, None),
        ({"w": torch.ones(2, 3)}, None),  # a key left out stays with its site (FedPer, FedBN)
        ({"w": torch.ones(2, 3), "b": torch.tensor([0.0, float("nan"), 0.0])}, "b holds NaN"),
        ({"w": torch.full((2, 3), float("-inf"))}, "w holds infinite values"),
        ({"w": torch.ones(2, 3), "extra": torch.ones(1)}, r"unexpected key\(s\) \['extra'\]"),
        ({"w": torch.ones(3, 2)}, r"w has shape \[3, 2\], the model's is \[2, 3\]"),
    ],
)
def test_problem_names_what_is_wrong(update: dict, reason: str | None):
    found = problem(update, SHAPES)
    if reason is None:
        assert found is None
    else:
        assert found is not None and re.search(reason, found), found


@pytest.mark.parametrize(
    "changes",
    [
        {"norm_ratio": 1.0},
        {"min_good": 0},
        {"min_good": 4},
        {"faults": {"site-2": ["nan", "poison"]}},
    ],
)
def test_screening_parameters_are_range_checked(changes: dict):
    with pytest.raises(ValueError, match="job parameter out of range"):
        JobParams(**changes)


def test_shared_batch_norm_statistics_are_a_weighted_mean_and_the_count_stays_an_integer():
    """FedAvg with batch norm shared: the running statistics are averaged like the weights (case-weighted), never
    measured as an update, and num_batches_tracked comes back an integer, as the sites' buffer is."""
    shapes = {"w": [2], "bn.running_mean": [2], "bn.num_batches_tracked": []}
    aggregator = ScreenedAggregator(shapes)
    aggregator._global = {
        "w": torch.zeros(2),
        "bn.running_mean": torch.zeros(2),
        "bn.num_batches_tracked": torch.tensor(0),
    }
    for site, cases, mean, batches in (("site-1", 1, 1.0, 10), ("site-2", 3, 3.0, 30)):
        update = {"w": torch.full((2,), mean), "bn.running_mean": torch.full((2,), mean)}
        update["bn.num_batches_tracked"] = torch.tensor(batches)
        meta = {"client_name": site, FLMetaKey.NUM_STEPS_CURRENT_ROUND: cases}
        aggregator.accept_model(FLModel(params=update, meta=meta))
    # the counts (10 and 30 steps) do not enter the update norm: the norms are those of the float tensors
    assert aggregator._screen_norms() == pytest.approx({"site-1": 2**0.5 * 2**0.5, "site-2": 3 * 2**0.5 * 2**0.5})
    average = aggregator._average().params
    torch.testing.assert_close(average["bn.running_mean"], torch.full((2,), 2.5))
    assert average["bn.num_batches_tracked"].dtype == torch.int64 and int(average["bn.num_batches_tracked"]) == 25
