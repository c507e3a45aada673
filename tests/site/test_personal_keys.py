"""FedPer, FedBN and fine-tuning: personal layers never leave a site, and the server never changes them."""

from __future__ import annotations

import pytest
from brats_fl.seg.model import BratsUNet, parameter_groups, personal_keys


def test_selections_follow_the_model_groups():
    model = BratsUNet(channels=(8, 16, 32), strides=(2, 2), norm="batch")
    state = set(model.state_dict())
    assert personal_keys(model, "none") == [] and set(personal_keys(model, "all")) == state
    norm = set(personal_keys(model, "norm"))
    assert norm == set(parameter_groups(model)["norm"]) and any(k.endswith("running_mean") for k in norm)
    head = set(personal_keys(model, "head:2"))
    assert head == set(parameter_groups(model, head_layers=2)["head"]) and head < state
    assert set(personal_keys(model, "head:1+norm")) == norm | set(parameter_groups(model, 1)["head"])
    for bad in ("bn", "head", "head:0", "head:x", "norm:2"):
        with pytest.raises(ValueError, match="unknown personal-key selection"):
            personal_keys(model, bad)
