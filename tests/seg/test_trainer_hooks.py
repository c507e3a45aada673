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


def test_recalibrated_statistics_are_those_of_the_weights_now_held():
    """Batch norm's running statistics, once stale (other weights' or garbage), misnormalise in evaluation while
    training mode, which normalises by the batch, does not; one pass of ``recalibrate_norm`` over a single batch makes
    evaluation agree with training mode on it (HyperSeg Conv + BN re-estimates them at each received model)."""
    import torch
    from brats_fl.seg.trainer import TrainConfig, Trainer

    model = {"channels": [4, 8], "strides": [2], "num_res_units": 1, "init_seed": 0, "norm": "batch"}
    trainer = Trainer(TrainConfig.from_dict({"model": model, "patch_size": [16, 16, 16], "threads": 1}))
    batch = synthetic_batches(1)[0]
    norms = [m for m in trainer.model.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert norms
    for norm in norms:  # statistics of some other weights
        norm.running_mean.fill_(0.5)
        norm.running_var.fill_(4.0)

    def outputs() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            evaluated = trainer.model.eval()(batch["image"])
            momenta = [n.momentum for n in norms]
            for n in norms:
                n.momentum = 0.0  # training mode's forward pass leaves the statistics as they are
            trained = trainer.model.train()(batch["image"])
            for n, m in zip(norms, momenta, strict=True):
                n.momentum = m
        return evaluated, trained

    stale, trained = outputs()
    assert (stale - trained).abs().max() > 0.1
    assert trainer.recalibrate_norm([batch]) == 1
    fresh, trained = outputs()
    # the running variance is unbiased, the batch's biased: equal up to n / (n - 1) over 2 x 16³ voxels
    torch.testing.assert_close(fresh, trained, rtol=1e-2, atol=1e-2)
    assert all(n.momentum == 0.1 for n in norms)  # the layers' own momentum is back
