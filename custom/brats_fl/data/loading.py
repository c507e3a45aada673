"""MONAI transform pipelines and cached datasets for training and whole-volume evaluation.

Deterministic work (decoding NIfTI, label conversion, brain crop, sampling indices) runs once and is
cached in memory; only the random crop and augmentation run every epoch, so training is not stalled by I/O.
Cropping to the brain before sampling matters: negatives then fall inside the brain, not in the air
around the head, which otherwise teaches the network to flood the brain with false positives.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.data import CacheDataset, DataLoader
from monai.transforms import (
    Compose,
    ConvertToMultiChannelBasedOnBratsClassesd,
    CropForegroundd,
    DeleteItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    FgBgToIndicesd,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)

from brats_fl.data.labels import REGIONS, annotation_mask

_FG, _BG = "label_fg_indices", "label_bg_indices"
#: the item key of the per-region annotation mask (REGIONS order), see ``brats_fl.data.labels.annotation_mask``
ANNOTATED = "annotated"


class HideUnannotatedd(MapTransform):
    """Zero the label channels of regions the case's site did not annotate, right after decoding.

    Written by hand because MONAI has no per-sample channel mask transform. Hiding here, before sampling
    indices are computed, means a site that annotates only ET never sees (nor centres patches on) the whole
    tumour it did not label; the loss then ignores those channels (``brats_fl.seg.trainer.RegionLoss``).
    """

    def __init__(self, label_key: str = "label", mask_key: str = ANNOTATED):
        super().__init__(keys=[label_key])
        self.label_key, self.mask_key = label_key, mask_key

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        if self.mask_key not in d:  # an item with no record of partial labels is fully annotated
            return d
        mask = torch.as_tensor(d[self.mask_key]).bool()
        if not mask.all():
            d[self.label_key] = d[self.label_key] * mask.view(-1, *[1] * (d[self.label_key].ndim - 1))
        return d


def _load_and_normalise(pad_to: Sequence[int] | None) -> list:
    steps = [
        LoadImaged(keys=["image", "label"], image_only=True),
        EnsureChannelFirstd(keys="image"),
        ConvertToMultiChannelBasedOnBratsClassesd(keys="label"),
        HideUnannotatedd(),
        # the brain's bounding box: BraTS volumes are skull-stripped, so non-zero voxels are brain
        CropForegroundd(keys=["image", "label"], source_key="image", allow_smaller=True),
    ]
    if pad_to is not None:
        steps.append(SpatialPadd(keys=["image", "label"], spatial_size=pad_to))
    return steps


def train_transforms(patch_size: Sequence[int], samples_per_case: int, fg_ratio: float) -> Compose:
    """Cached: load, brain crop, pad, sampling indices (raw intensities, so background is 0), z-score.

    Random: crops centred on tumour (a ``fg_ratio`` share of them) or on other brain, flips and intensity
    jitter. Negatives matter: whole-brain inference meets far more healthy tissue than training patches do.
    """
    return Compose(
        [
            *_load_and_normalise(patch_size),
            FgBgToIndicesd(keys="label", image_key="image", image_threshold=0.0),
            NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
            RandCropByPosNegLabeld(
                keys=["image", "label"],
                label_key="label",
                spatial_size=patch_size,
                pos=fg_ratio,
                neg=1.0 - fg_ratio,
                num_samples=samples_per_case,
                fg_indices_key=_FG,
                bg_indices_key=_BG,
            ),
            DeleteItemsd(keys=[_FG, _BG]),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=1),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=2),
            RandScaleIntensityd(keys="image", factors=0.1, prob=1.0),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=1.0),
            EnsureTyped(keys=["image", "label"], track_meta=False),
        ]
    )


def eval_transforms() -> Compose:
    """Whole brain, no augmentation: for validation and test with sliding-window inference."""
    return Compose(
        [
            *_load_and_normalise(None),
            NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
            EnsureTyped(keys=["image", "label"], track_meta=False),
        ]
    )


def inference_transforms() -> Compose:
    """Full volume, raw intensities: ``predict_case`` crops to the brain and normalises itself, so that it can put
    the prediction back in the input's shape and affine."""
    return Compose([LoadImaged(keys="image", image_only=True), EnsureChannelFirstd(keys="image")])


def train_loader(
    items: list[dict],
    patch_size: Sequence[int],
    batch_size: int,
    samples_per_case: int,
    seed: int,
    fg_ratio: float,
) -> DataLoader:
    """A shuffled loader over cached cases; each case yields ``samples_per_case`` patches per epoch.

    ``copy_cache=False``: the random part starts with the crop, which reads the cached case, and no later
    step writes in place (flips and intensity jitter return new tensors, collation stacks copies), so the
    cache is never changed and batches are identical to those of a copied cache. Deep-copying each whole
    cached case (volume, labels, sampling indices: about 60 MB) to crop two small patches from it took
    two thirds of the loading time.
    """
    dataset = CacheDataset(
        _strip(items),
        train_transforms(patch_size, samples_per_case, fg_ratio),
        cache_rate=1.0,
        num_workers=0,
        progress=False,
        copy_cache=False,
    )
    dataset.transform.set_random_state(seed=seed)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=max(1, batch_size // samples_per_case), shuffle=True, generator=generator)


def eval_loader(items: list[dict]) -> DataLoader:
    """One whole case per batch, cached after the first pass."""
    dataset = CacheDataset(_strip(items), eval_transforms(), cache_rate=1.0, num_workers=0, progress=False)
    return DataLoader(dataset, batch_size=1, shuffle=False)


def _strip(items: list[dict]) -> list[dict]:
    """MONAI readers want string paths; keep the case id for reports and the annotation mask for the loss."""
    return [
        {
            "image": [str(p) for p in it["image"]],
            "label": str(it["label"]),
            "case_id": it["case_id"],
            ANNOTATED: torch.tensor(annotation_mask(it.get(ANNOTATED, REGIONS))),
        }
        for it in items
    ]
