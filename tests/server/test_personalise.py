"""FedBN's selection keeps every key of every batch-norm layer at the site; SiloBN's keeps the statistics alone."""

from __future__ import annotations

import pytest
import torch
from brats_fl.seg.model import BratsUNet, parameter_groups, personal_keys

BATCH_NORM_KEYS = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


@pytest.fixture(scope="module")
def model() -> BratsUNet:
    return BratsUNet(channels=(8, 16, 32), strides=(2, 2), norm="batch")


def test_norm_keeps_every_key_of_every_batch_norm_layer(model: BratsUNet):
    layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert layers
    expected = {f"{n}.{k}" for n in layers for k in BATCH_NORM_KEYS}
    assert set(personal_keys(model, "norm")) == expected
    # no other key: the convolutions and PReLU slopes are shared
    assert not {k for k in model.state_dict() if k.rsplit(".", 1)[0] not in layers} & expected


def test_stats_keeps_the_running_statistics_alone(model: BratsUNet):
    stats = set(personal_keys(model, "stats"))
    assert stats == {k for k in personal_keys(model, "norm") if k.rsplit(".", 1)[1] not in ("weight", "bias")}
    assert not stats & set(dict(model.named_parameters()))
    assert set(personal_keys(model, "head:1+stats")) == stats | set(parameter_groups(model, 1)["head"])
    assert personal_keys(BratsUNet(channels=(8, 16, 32), strides=(2, 2), norm="instance"), "stats") == []
    with pytest.raises(ValueError, match="unknown personal-key selection"):
        personal_keys(model, "stats:1")
