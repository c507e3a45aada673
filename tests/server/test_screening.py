"""Broken and hostile updates: refused by the server's aggregator in a real FLARE simulation (no mocks)."""

from __future__ import annotations

import re

import pytest
import torch
from brats_fl.jobs.catalogue import JobParams
from brats_fl.server.screening import problem

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
