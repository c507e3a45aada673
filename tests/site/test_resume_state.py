"""A site that stops after a round and goes on from what it kept trains exactly as one that never stopped (no FLARE:
the trainer and the training loader a site holds, ``brats_fl.site.client``)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from brats_fl.data.layout import MODALITIES, SEG, find_cases
from brats_fl.data.loading import load_sampling_state, sampling_state, train_loader
from brats_fl.seg.model import fingerprint
from conftest import tiny_trainer

#: a poly schedule over the two rounds of two epochs each, so that a resumed trainer must know the epochs it did
CONFIG = {"lr_schedule": "poly", "total_epochs": 4, "seed": 0}
EPOCHS = 2


def _items(root: Path) -> list[dict]:
    return [
        {"image": [c.files[m] for m in MODALITIES], "label": c.files[SEG], "case_id": c.case_id}
        for c in find_cases(root)
    ]


def _site(items: list[dict]):
    """A trainer and its training loader, as a site makes them at the start of a job."""
    return tiny_trainer(**CONFIG), train_loader(items, (16, 16, 16), 2, 2, seed=3, fg_ratio=0.5)


def _through_disk(state: dict) -> dict:
    """What a site's state file gives back (``torch.load`` with its default, weights_only)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def _resumed(items: list[dict], kept: dict, restore_sampling: bool) -> tuple:
    """A new trainer and loader (a restarted site) given the weights (from the server) and the state kept, then
    trained for the second round."""
    trainer, loader = _site(items)
    trainer.model.load_state_dict(kept["weights"])
    trainer.load_state_dict(kept["trainer"])
    if restore_sampling:
        load_sampling_state(loader, kept["sampling"])
    stats = trainer.train_epochs(loader, EPOCHS)
    return trainer, stats


def test_a_resumed_site_trains_as_if_it_had_never_stopped(good_cohort: Path):
    items = _items(good_cohort)
    trainer, loader = _site(items)
    trainer.train_epochs(loader, EPOCHS)
    kept = _through_disk(
        {
            "weights": trainer.model.state_dict(),
            "trainer": trainer.state_dict(),
            "sampling": sampling_state(loader),
        }
    )
    # the uninterrupted site's second round
    stats = trainer.train_epochs(loader, EPOCHS)

    resumed, resumed_stats = _resumed(items, kept, restore_sampling=True)
    assert fingerprint(resumed.model.state_dict()) == fingerprint(trainer.model.state_dict())
    assert resumed.epochs_done == trainer.epochs_done == 2 * EPOCHS
    assert (resumed_stats["lr"], resumed_stats["lr_last"]) == (stats["lr"], stats["lr_last"])
    assert stats["lr_last"] < stats["lr"]  # the poly schedule went on from epoch 2, not from 0
    assert fingerprint(_flat(resumed.optimizer.state_dict())) == fingerprint(_flat(trainer.optimizer.state_dict()))

    # the same without the sampling state: round 1 draws round 0's patches and order again, and the model differs
    again, _ = _resumed(items, kept, restore_sampling=False)
    assert fingerprint(again.model.state_dict()) != fingerprint(trainer.model.state_dict())


def _flat(optimizer_state: dict) -> dict[str, torch.Tensor]:
    return {
        f"{index}.{name}": torch.as_tensor(value)
        for index, moments in optimizer_state["state"].items()
        for name, value in moments.items()
    }


def test_the_sampling_state_names_every_random_draw_and_refuses_another_pipeline(good_cohort: Path):
    items = _items(good_cohort)[:2]
    loader = train_loader(items, (16, 16, 16), 2, 2, seed=3, fg_ratio=0.5)
    state = sampling_state(loader)
    # the crop's inner cropper and the intensity jitters' inner transforms draw from generators of their own
    assert "transform.transforms.0.cropper" in state["transforms"]
    assert len(state["transforms"]) >= 7
    first = [batch["image"] for batch in loader]
    load_sampling_state(loader, state)
    assert all(torch.equal(a, b["image"]) for a, b in zip(first, loader, strict=True))
    other = dict(state, transforms={k: v for k, v in state["transforms"].items() if "cropper" not in k})
    with pytest.raises(ValueError, match="another pipeline"):
        load_sampling_state(loader, other)
