"""Mixed precision: the GPU path's code runs on the CPU under torch's CPU autocast (bfloat16), and stays off by
default there; a training that diverges (as float16 did on a GPU) stops with an error naming it."""

from __future__ import annotations

import pytest
import torch
from brats_fl.seg import trainer as trainer_module
from brats_fl.seg.trainer import TrainConfig, Trainer, amp_dtype

TINY = {"channels": [4, 8], "strides": [2], "num_res_units": 1, "init_seed": 0}


def _trainer(amp: str) -> Trainer:
    return Trainer(TrainConfig.from_dict({"model": TINY, "patch_size": [16, 16, 16], "threads": 1, "amp": amp}))


def _batch(image: torch.Tensor | None = None) -> dict:
    return {
        "image": torch.randn(2, 4, 16, 16, 16) if image is None else image,
        "label": (torch.rand(2, 3, 16, 16, 16) > 0.7).float(),
        "annotated": torch.ones(2, 3),
    }


@pytest.mark.parametrize(("bf16", "half"), [(True, torch.bfloat16), (False, torch.float16)])
def test_the_modes_per_device(monkeypatch: pytest.MonkeyPatch, bf16: bool, half: torch.dtype):
    """A GPU with bfloat16 (Ampere on) trains in it: float16 overflowed on an H200; older GPUs keep float16."""
    monkeypatch.setattr(trainer_module, "gpu_has_bfloat16", lambda _device: bf16)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert amp_dtype("auto", gpu) == half and amp_dtype("on", gpu) == half
    assert amp_dtype("auto", cpu) is None and amp_dtype("off", gpu) is None
    assert amp_dtype("on", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="amp one of"):
        TrainConfig.from_dict({"amp": "fp8"})


@pytest.mark.parametrize(("mode", "inside"), [("on", torch.bfloat16), ("auto", torch.float32)])
def test_training_and_inference_run_in_the_chosen_precision(mode: str, inside: torch.dtype):
    trainer = _trainer(mode)
    seen = []
    trainer.model.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    batch = _batch()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    stats = trainer.train_epochs([batch], epochs=1)
    assert seen == [inside] and torch.isfinite(torch.tensor(stats["train_loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
    logits = trainer.infer(torch.randn(1, 4, 20, 20, 20))
    assert seen[-1] == inside and logits.dtype == torch.float32 and logits.shape == (1, 3, 20, 20, 20)


@pytest.mark.parametrize("amp", ["off", "on"])
def test_a_diverged_training_stops_with_an_error_naming_it(amp: str):
    """An epoch whose every step has a non-finite loss (here an infinite input; on a GPU a float16 overflow) is
    refused, not passed on as a NaN model."""
    trainer = _trainer(amp)
    infinite = _batch(torch.full((2, 4, 16, 16, 16), float("inf")))
    with pytest.raises(FloatingPointError, match=r"training diverged in epoch 1: 2 of 2 steps gave a non-finite loss"):
        trainer.train_epochs([infinite, infinite], epochs=1)


def test_weights_that_turned_nan_are_refused_even_after_a_finite_loss():
    trainer = _trainer("off")

    def poison(model: torch.nn.Module, _lr: float) -> None:
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))

    with pytest.raises(FloatingPointError, match=r"0 of 1 steps gave a non-finite loss and the weights are no longer"):
        trainer.train_epochs([_batch()], epochs=1, after_step=poison)
    assert _trainer("off").train_epochs([_batch()], epochs=1)["steps"] == 1
