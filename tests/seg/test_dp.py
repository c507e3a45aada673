"""DP-SGD at a site (``brats_fl.seg.dp``): per-case gradients, their clipping, the noise, the accountant."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from brats_fl.data.loading import ANNOTATED
from brats_fl.seg.dp import DPSGD, epsilon_of
from brats_fl.seg.model import BratsUNet
from brats_fl.seg.trainer import RegionLoss, TrainConfig, Trainer
from opacus.accountants import RDPAccountant
from torch.utils.data import DataLoader

MODEL = {"channels": [4, 8], "strides": [2], "num_res_units": 1, "init_seed": 0}


def _cases(count: int, seed: int = 0) -> list[dict]:
    """Training cases as the patch loader's dataset yields them: one 16³ patch each."""
    generator = np.random.default_rng(seed)
    return [
        {
            "image": torch.as_tensor(generator.normal(size=(4, 16, 16, 16)), dtype=torch.float32),
            "label": torch.as_tensor(generator.random((3, 16, 16, 16)) > 0.7, dtype=torch.float32),
            ANNOTATED: torch.ones(3, dtype=torch.bool),
        }
        for _ in range(count)
    ]


def _dp_trainer(**config) -> Trainer:
    settings = {"model": MODEL, "patch_size": [16, 16, 16], "threads": 1, "samples_per_case": 1, "dp_epsilon": 8.0}
    return Trainer(TrainConfig.from_dict(settings | config))


def test_each_case_gradient_is_its_own_clipped_to_the_bound_and_noised():
    """Opacus's per-case gradients of the MONAI U-Net (instance norm, PReLU, transposed convolutions) are each case's
    own gradient; the step sums them clipped to the bound and adds Gaussian noise of noise_multiplier x bound."""
    clip, cases = 0.05, 4
    model = BratsUNet(channels=(4, 8), strides=(2,), init_seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    dp = DPSGD(model, optimizer, epsilon=8, delta=1e-5, max_grad_norm=clip, cases=cases, batch_size=cases, epochs=1)
    batch = torch.utils.data.default_collate(_cases(cases))
    loss_fn = RegionLoss(with_ce=False)

    own = []
    for i in range(cases):
        model.zero_grad()
        loss_fn(model(batch["image"][i : i + 1]), batch["label"][i : i + 1]).backward()
        own.append({n: p.grad.clone() for n, p in model.named_parameters()})
    norms = [float(torch.sqrt(sum((g**2).sum() for g in grads.values()))) for grads in own]
    assert min(norms) > clip, "the test needs gradients the bound clips"

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dp.optimizer.zero_grad(set_to_none=True)
    dp.train(True)
    loss_fn(dp.module(batch["image"]), batch["label"]).backward()
    for name, p in model.named_parameters():
        for i in range(cases):
            torch.testing.assert_close(p.grad_sample[i], own[i][name], rtol=1e-3, atol=1e-6, msg=name)
    dp.step()
    # SGD at rate 1: the step is -(sum of clipped gradients + noise) / expected batch size
    noise = []
    for name, p in model.named_parameters():
        clipped = sum(own[i][name] * min(1.0, clip / (norms[i] + 1e-6)) for i in range(cases))
        noise.append((-(p.detach() - before[name]) * cases - clipped).flatten())
    noise = torch.cat(noise)
    assert float(noise.std()) == pytest.approx(dp.noise_multiplier * clip, rel=0.05)
    assert abs(float(noise.mean())) < 0.05 * dp.noise_multiplier * clip
    assert dp.spent()["steps"] == 1


def test_epsilon_is_the_accountants_composed_over_rounds_and_kept_for_resuming():
    """Three rounds of one epoch spend exactly the planned steps; the site's epsilon is the RDP accountant's over all
    of them, within the target; each round's own epsilon is smaller than the total, and a resumed trainer goes on
    from the steps already spent."""
    loader = DataLoader(_cases(8), batch_size=2)
    trainer = _dp_trainer(total_epochs=3)
    totals, rounds = [], []
    for _ in range(3):
        before = trainer.dp.steps() if trainer.dp else 0
        stats = trainer.train_epochs(loader, 1)
        spent = trainer.dp.spent(since=before)
        totals.append(spent["epsilon"])
        rounds.append(spent["epsilon_round"])
        assert stats["steps"] == 4  # 1 / sample rate 0.25, empty draws included
    spent = trainer.dp.spent()
    assert spent["steps"] == spent["planned_steps"] == 12
    assert spent["sample_rate"] == 0.25
    reference = RDPAccountant()
    for _ in range(12):
        reference.step(noise_multiplier=spent["noise_multiplier"], sample_rate=0.25)
    assert spent["epsilon"] == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    assert 0.95 * 8 < spent["epsilon"] <= 8.0
    assert totals == sorted(totals) and all(r < t for r, t in zip(rounds[1:], totals[1:], strict=True))

    resumed = _dp_trainer(total_epochs=3)
    resumed.load_state_dict(trainer.state_dict())
    resumed.train_epochs(loader, 1)
    assert resumed.dp.steps() == 16
    assert resumed.dp.spent()["epsilon"] > spent["epsilon"]


def test_dp_noise_does_not_follow_the_seed():
    """Two trainers from one seed take different DP steps: noise and draws come from fresh entropy."""
    loader = DataLoader(_cases(4), batch_size=4)
    weights = []
    for _ in range(2):
        trainer = _dp_trainer(total_epochs=1, batch_size=4)
        trainer.train_epochs(loader, 1)
        weights.append(torch.cat([p.detach().flatten() for p in trainer.model.parameters()]))
    assert not torch.equal(weights[0], weights[1])


def test_epsilon_of_no_step_is_zero():
    assert epsilon_of([], 1e-5) == 0.0 and epsilon_of([(1.0, 0.5, 0)], 1e-5) == 0.0


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model": MODEL | {"norm": "batch"}}, "batch norm"),
        ({"samples_per_case": 2, "batch_size": 2}, "samples_per_case"),
        ({"amp": "on"}, "full precision"),
    ],
)
def test_dp_refuses_what_would_break_its_guarantee(config: dict, message: str):
    with pytest.raises(ValueError, match=message):
        _dp_trainer(**config)


def test_dp_refuses_hooks_that_escape_clipping():
    trainer = _dp_trainer()
    loader = DataLoader(_cases(2), batch_size=2)
    with pytest.raises(ValueError, match="escapes"):
        trainer.train_epochs(loader, 1, extra_loss=lambda m: sum(p.sum() for p in m.parameters()) * 0)


def test_fine_tuning_under_dp_moves_only_the_trainable_layers_and_is_accounted():
    """Fine-tuning (``_ft`` jobs) freezes layers; DP-SGD then clips and noises the trainable ones alone, and counts
    the steps."""
    trainer = _dp_trainer(total_epochs=2, batch_size=4)
    loader = DataLoader(_cases(4), batch_size=4)
    trainer.train_epochs(loader, 1)
    frozen = {n for n, _ in trainer.model.named_parameters() if not n.startswith("net.model.2")}
    for name, p in trainer.model.named_parameters():
        p.requires_grad_(name not in frozen)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train_epochs(loader, 1)
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and not changed & frozen
    assert trainer.dp.spent()["steps"] == 2
