"""Mixed precision: the GPU path's code runs on the CPU under torch's CPU autocast (bfloat16), and stays off by
default there."""

from __future__ import annotations

import pytest
import torch
from brats_fl.seg.trainer import TrainConfig, Trainer, amp_dtype

TINY = {"channels": [4, 8], "strides": [2], "num_res_units": 1, "init_seed": 0}


def _trainer(amp: str) -> Trainer:
    return Trainer(TrainConfig.from_dict({"model": TINY, "patch_size": [16, 16, 16], "threads": 1, "amp": amp}))


def test_the_modes_per_device():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert amp_dtype("auto", gpu) == torch.float16 and amp_dtype("on", gpu) == torch.float16
    assert amp_dtype("auto", cpu) is None and amp_dtype("off", gpu) is None
    assert amp_dtype("on", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="amp one of"):
        TrainConfig.from_dict({"amp": "fp8"})


@pytest.mark.parametrize(("mode", "inside"), [("on", torch.bfloat16), ("auto", torch.float32)])
def test_training_and_inference_run_in_the_chosen_precision(mode: str, inside: torch.dtype):
    trainer = _trainer(mode)
    seen = []
    trainer.model.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    batch = {
        "image": torch.randn(2, 4, 16, 16, 16),
        "label": (torch.rand(2, 3, 16, 16, 16) > 0.7).float(),
        "annotated": torch.ones(2, 3),
    }
    before = [p.detach().clone() for p in trainer.model.parameters()]
    stats = trainer.train_epochs([batch], epochs=1)
    assert seen == [inside] and torch.isfinite(torch.tensor(stats["train_loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
    logits = trainer.infer(torch.randn(1, 4, 20, 20, 20))
    assert seen[-1] == inside and logits.dtype == torch.float32 and logits.shape == (1, 3, 20, 20, 20)
