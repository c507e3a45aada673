"""A site's optimiser state between rounds (``optimizer_state``, issue 19, item 9): ``reset`` starts a round as a new
site would from the model it received; ``keep`` goes on with the moments of the rounds before."""

from __future__ import annotations

import pytest
import torch
from brats_fl.jobs.catalogue import JobParams
from brats_fl.site.client import site_args
from conftest import synthetic_batches, tiny_trainer


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    other = b.state_dict()
    return all(torch.equal(v, other[k]) for k, v in a.state_dict().items())


def test_a_reset_round_trains_as_a_fresh_optimiser_from_the_received_model():
    kept, reset = tiny_trainer(), tiny_trainer()
    for trainer in (kept, reset):
        trainer.train_epochs(synthetic_batches(2, seed=0))
    assert _same(kept.model, reset.model) and kept.optimizer.state
    reset.reset_optimizer()
    assert not reset.optimizer.state
    fresh = tiny_trainer()
    fresh.model.load_state_dict(reset.model.state_dict())
    for trainer in (kept, reset, fresh):
        trainer.train_epochs(synthetic_batches(2, seed=1))
    assert _same(reset.model, fresh.model)
    assert not _same(kept.model, fresh.model)  # Adam's moments and step count carried over
    assert reset.optimizer.param_groups[0]["lr"] == kept.optimizer.param_groups[0]["lr"]


def test_sites_keep_their_optimiser_state_unless_told_and_refuse_another_setting():
    assert site_args({}).optimizer_state == "keep"
    assert site_args({"optimizer_state": "reset"}).optimizer_state == "reset"
    with pytest.raises(ValueError, match="optimizer_state one of"):
        JobParams(optimizer_state="sometimes")
