"""The server's learning rate per round: what each training task carries (brats_fl.server.schedule)."""

from __future__ import annotations

import pytest
from brats_fl.protocol import ROUND_LR
from brats_fl.seg.trainer import poly_lr
from brats_fl.server.fedavg import DeadlineFedAvg
from brats_fl.server.schedule import set_round_lr
from brats_fl.server.sequential import SequentialTransfer
from nvflare.app_common.abstract.fl_model import FLModel


def test_each_round_carries_its_poly_rate_and_a_constant_schedule_its_rate():
    model = FLModel(params={}, meta={"other": 1})
    for rnd in range(3):
        set_round_lr(model, 1e-2, "poly", rnd, 3)
        assert model.meta == {"other": 1, ROUND_LR: 1e-2 * (1 - rnd / 3) ** 0.9}
        assert model.meta[ROUND_LR] == poly_lr(1e-2, rnd, 3)
    set_round_lr(model, 3e-3, "constant", 2, 3)
    assert model.meta[ROUND_LR] == 3e-3


def test_without_a_rate_the_task_carries_none_so_the_sites_keep_their_own():
    model = FLModel(params={}, meta={ROUND_LR: 0.5})
    set_round_lr(model, None, "poly", 0, 3)
    assert ROUND_LR not in model.meta


@pytest.mark.parametrize("controller", [DeadlineFedAvg, SequentialTransfer])
def test_a_controller_refuses_a_schedule_it_cannot_follow(controller):
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        controller(lr=1e-2, lr_schedule="cosine")
    with pytest.raises(ValueError, match="lr must be positive"):
        controller(lr=0.0, lr_schedule="poly")
