"""The training loop's two hooks for federated algorithms: an extra loss term and a call after each optimiser step."""

from __future__ import annotations

import torch
from conftest import synthetic_batches, tiny_trainer


def test_extra_loss_joins_the_objective_and_after_step_sees_every_step():
    trainer = tiny_trainer(lr=1e-2)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    seen: list[tuple[float, float]] = []

    def after_step(model: torch.nn.Module, lr: float) -> None:
        seen.append((lr, float(sum((p - before[k]).abs().sum() for k, p in model.named_parameters()))))

    def pull(model: torch.nn.Module) -> torch.Tensor:
        return sum((p**2).sum() for p in model.parameters())

    stats = trainer.train_epochs(synthetic_batches(3), epochs=2, extra_loss=pull, after_step=after_step)
    assert stats["steps"] == 6 and len(seen) == 6
    assert {lr for lr, _ in seen} == {1e-2}
    assert all(moved > 0 for _, moved in seen), "after_step runs after the step, on the stepped model"
    assert stats["extra_loss"] > 0 and stats["train_loss"] < stats["train_loss"] + stats["extra_loss"]
    plain = tiny_trainer(lr=1e-2).train_epochs(synthetic_batches(3), epochs=2)
    assert "extra_loss" not in plain and plain["train_loss"] != stats["train_loss"]
