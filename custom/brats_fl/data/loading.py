"""MONAI transform pipelines and cached datasets for training and whole-volume evaluation.

Deterministic work (decoding NIfTI, label conversion, brain crop, resampling to the training spacing, sampling
indices) runs once and is cached in memory, and with a site's ``cache_dir`` on disk too, so that the next job on the
same cohort skips it; only the random crop and augmentation run every epoch, so training is not stalled by I/O.
Evaluation keeps the brain crop at the files' own resolution: a prediction made at a coarser spacing is resampled
back to it (``brats_fl.seg.trainer.Trainer.infer``), so that labels are never downsampled for scoring.
Cropping to the brain before sampling matters: negatives then fall inside the brain, not in the air
around the head, which otherwise teaches the network to flood the brain with false positives.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import monai
import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset, MetaTensor, PersistentDataset
from monai.data.utils import pickle_hashing
from monai.transforms import (
    Compose,
    CropForegroundd,
    DeleteItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    FgBgToIndicesd,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Spacingd,
    SpatialPadd,
)
from monai.transforms.transform import Randomizable, Transform
from monai.utils.enums import MetaKeys, SpaceKeys, TraceKeys

from brats_fl.data.checks import BRATS_GRID
from brats_fl.data.labels import REGIONS, annotation_mask, labels_to_regions
from brats_fl.data.layout import release
from brats_fl.version import PACKAGE_DIR, code_sha256

_FG, _BG = "label_fg_indices", "label_bg_indices"
#: the orientation every BraTS release ships (``brats_fl.data.checks.BRATS_GRID``), in MONAI's spelling
BRATS_ORIENTATION = "".join(BRATS_GRID[1])
#: what each axis code means, as nibabel (``brats_fl.data.checks``) reads a NIfTI affine; stated, where MONAI's
#: default is moving to the MetaTensor's own space
AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
#: the item key of the per-region annotation mask (REGIONS order), see ``brats_fl.data.labels.annotation_mask``
ANNOTATED = "annotated"
#: the code the loading pipelines are made of, whose hash keys the disk cache (``_pipeline_hash``)
PIPELINE_CODE = PACKAGE_DIR / "data"


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


class RegionsFromLabelsd(MapTransform):
    """The label map as region channels (REGIONS order), read by the convention of the item's release.

    MONAI's ``ConvertToMultiChannelBasedOnBratsClassesd`` takes one enhancing-tumour label for every item; a
    federation whose sites hold different releases (ET 4 in 2020 and 2021, 3 since 2023) needs it per item, so this
    picks it from the item's ``release`` (``brats_fl.data.layout.RELEASES``) and calls MONAI's transform with it."""

    def __init__(self, label_key: str = "label", release_key: str = "release"):
        super().__init__(keys=[label_key])
        self.label_key, self.release_key = label_key, release_key

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        # an item that records no release is named in the 2020 style (as every datalist before releases were told apart)
        d[self.label_key] = labels_to_regions(d[self.label_key], release(d.get(self.release_key, "other")).convention)
        return d


def _load_and_crop() -> list:
    return [
        LoadImaged(keys=["image", "label"], image_only=True),
        EnsureChannelFirstd(keys="image"),
        RegionsFromLabelsd(),
        HideUnannotatedd(),
        # the brain's bounding box: BraTS volumes are skull-stripped, so non-zero voxels are brain
        CropForegroundd(keys=["image", "label"], source_key="image", allow_smaller=True),
    ]


def _train_cached(patch_size: Sequence[int], spacing: float | None) -> list:
    """Load, brain crop, resample to ``spacing`` (trilinear image, nearest labels), pad, sampling indices (on raw
    intensities, so background is 0), z-score."""
    steps = _load_and_crop()
    if spacing is not None:
        # resampling is what lets a case off the BraTS grid train (brats_fl.data.checks), so it also turns the case
        # into the BraTS orientation, as inference does (brats_fl.seg.trainer.Trainer.infer_case)
        steps.extend(_resampled(spacing))
    return [
        *steps,
        SpatialPadd(keys=["image", "label"], spatial_size=patch_size),
        FgBgToIndicesd(keys="label", image_key="image", image_threshold=0.0),
        NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
    ]


def _train_random(patch_size: Sequence[int], samples_per_case: int, fg_ratio: float) -> list:
    """Crops centred on tumour (a ``fg_ratio`` share of them) or on other brain, flips and intensity jitter.
    Negatives matter: whole-brain inference meets far more healthy tissue than training patches do."""
    return [
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


def train_transforms(
    patch_size: Sequence[int], samples_per_case: int, fg_ratio: float, spacing: float | None = None
) -> Compose:
    """The whole training pipeline: the cached steps, then the random ones (``train_loader`` runs them apart)."""
    return Compose([*_train_cached(patch_size, spacing), *_train_random(patch_size, samples_per_case, fg_ratio)])


def _resampled(spacing: float) -> list:
    """To the BraTS orientation and ``spacing`` mm: trilinear images, nearest labels."""
    return [
        Orientationd(keys=["image", "label"], axcodes=BRATS_ORIENTATION, labels=AXIS_LABELS),
        Spacingd(keys=["image", "label"], pixdim=(spacing,) * 3, mode=("bilinear", "nearest")),
    ]


def eval_transforms(spacing: float | None = None) -> Compose:
    """Whole brain, no augmentation: for validation and test with sliding-window inference. Keeps each volume's affine
    (MONAI's MetaTensor): HD95 reads the voxel size in mm from it, and inference at a training spacing resamples from
    and back to it. At the files' own resolution unless ``spacing`` resamples image and label to it, which scores at
    the training grid: cheap enough for a validation every round, where the test is scored on each case's own grid."""
    return Compose(
        [
            *_load_and_crop(),
            *(_resampled(spacing) if spacing is not None else []),
            NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
            EnsureTyped(keys=["image", "label"]),
        ]
    )


def inference_transforms() -> Compose:
    """Full volume, raw intensities: ``predict_case`` crops to the brain and normalises itself, so that it can put
    the prediction back in the input's shape and affine."""
    return Compose([LoadImaged(keys="image", image_only=True), EnsureChannelFirstd(keys="image")])


def _file_stamps(item: dict) -> bytes:
    """The item's hash for the disk cache, with each file's size and modification time: MONAI's default hashes the
    paths alone, and a cohort rewritten in place (a new phantom, corrected labels) must not meet its old cache."""
    files = [*item["image"], item["label"]]
    stamps = [(f, Path(f).stat().st_size, Path(f).stat().st_mtime_ns) for f in files]
    return pickle_hashing(
        {
            "item": {k: v for k, v in item.items() if k != ANNOTATED},
            "files": stamps,
            "annotated": item[ANNOTATED].tolist(),
        }
    )


def _pipeline_hash(settings: dict):
    """``hash_transform`` for MONAI's PersistentDataset: the pipeline's settings, the code of ``brats_fl.data`` (which
    the pipelines are made of) and MONAI's version. MONAI's own choices hash pickled transform objects or, failing
    JSON, their class names alone, which misses a changed ``spacing``; the code hash makes any change to the pipelines
    start a new cache. Only the data package's code: a change to training or the jobs leaves the cache valid, where a
    benchmark's cache of full-size cases takes about 10 GB a partition."""
    text = json.dumps(settings | {"code": code_sha256(PIPELINE_CODE), "monai": monai.__version__}, sort_keys=True)

    def transform_hash(_transforms: list) -> bytes:
        return hashlib.sha256(text.encode()).hexdigest().encode()

    return transform_hash


#: what a cached case holds besides tensors: MONAI's MetaTensor, its numpy metadata (arrays of any NIfTI datatype)
#: and MONAI's metadata keys. PersistentDataset reads its files with ``torch.load(weights_only=True)``, which refuses
#: every other type: without these allowed, each read failed, was taken for a corrupt file and recomputed, so a disk
#: cache saved nothing. Allowing these data types keeps the safe loader, where ``weights_only=False`` would unpickle
#: anything a file in the cache folder holds.
_CACHED_TYPES = [
    MetaTensor,
    np._core.multiarray._reconstruct,
    np.ndarray,
    np.dtype,
    *(getattr(np.dtypes, name) for name in np.dtypes.__all__),
    MetaKeys,
    SpaceKeys,
    TraceKeys,
]


class OneThread(Transform):
    """``steps`` run with one torch thread, whatever the process's count. Written by hand: neither torch nor MONAI
    has a scope for the thread count.

    z-scoring sums over the brain, and torch splits a sum among its threads, so the same case came out of
    preprocessing with other last bits in a process with 2 threads (centralized training on 2 cores) than in one with
    1 (a site of a 3-site job). The disk cache is shared by every run of a benchmark: a FedAvg run trained on other
    bits, and so gave another model from the same seed, depending on whether centralized training had filled the
    cache before it (docs/results.md, "The same seed on two machines"). Preprocessing is done once per case, so
    one thread costs little."""

    def __init__(self, steps: list):
        self.steps = Compose(steps)

    def __call__(self, data: dict) -> dict:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self.steps(data)
        finally:
            torch.set_num_threads(threads)


def _source(items: list[dict], cached: list, cache_dir: Path | None, settings: dict) -> Dataset:
    """``items`` through the deterministic ``cached`` steps, on one thread (``OneThread``): from ``cache_dir`` on
    disk when a site has one (written on first use), else computed."""
    steps = OneThread(cached)
    if cache_dir is None:
        return Dataset(items, steps)
    torch.serialization.add_safe_globals(_CACHED_TYPES)
    return PersistentDataset(
        items,
        steps,
        cache_dir=cache_dir,
        hash_func=_file_stamps,
        hash_transform=_pipeline_hash(settings),
        track_meta=True,
    )


def train_loader(
    items: list[dict],
    patch_size: Sequence[int],
    batch_size: int,
    samples_per_case: int,
    seed: int,
    fg_ratio: float,
    spacing: float | None = None,
    cache_dir: Path | None = None,
) -> DataLoader:
    """A shuffled loader over cached cases; each case yields ``samples_per_case`` patches per epoch.

    ``copy_cache=False``: the random part starts with the crop, which reads the cached case, and no later
    step writes in place (flips and intensity jitter return new tensors, collation stacks copies), so the
    cache is never changed and batches are identical to those of a copied cache. Deep-copying each whole
    cached case (volume, labels, sampling indices: about 60 MB) to crop two small patches from it took
    two thirds of the loading time.
    """
    settings = {"pipeline": "train", "patch_size": list(patch_size), "spacing": spacing}
    dataset = CacheDataset(
        _source(_strip(items), _train_cached(patch_size, spacing), cache_dir, settings),
        Compose(_train_random(patch_size, samples_per_case, fg_ratio)),
        cache_rate=1.0,
        num_workers=0,
        progress=False,
        copy_cache=False,
    )
    dataset.transform.set_random_state(seed=seed)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=max(1, batch_size // samples_per_case), shuffle=True, generator=generator)


def sampling_state(loader: DataLoader) -> dict:
    """Where ``loader`` (``train_loader``'s) stands in its random draws: the numpy generator of every random transform
    in its pipeline (``_random_parts``) and its shuffling generator. Plain tensors and numbers, so that a site's state
    file loads with ``torch.load(weights_only=True)``. Reading it draws nothing: a run that saves it samples the same.
    """
    parts = {}
    for path, part in _random_parts(loader.dataset.transform):
        kind, key, pos, has_gauss, cached = part.R.get_state()
        parts[path] = {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos)}
        parts[path] |= {"has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return {"transforms": parts, "generator": loader.generator.get_state()}


def load_sampling_state(loader: DataLoader, state: dict) -> None:
    """Put ``loader`` where ``sampling_state`` found it, so that it draws next what the loader it was read from drew
    next: a resumed site samples round r's patches and order, not round 0's again. The pipelines must match."""
    parts = dict(_random_parts(loader.dataset.transform))
    if set(parts) != set(state["transforms"]):
        raise ValueError(
            f"the saved sampling state is of another pipeline: random transforms {sorted(state['transforms'])}, "
            f"this loader's {sorted(parts)}"
        )
    for path, part in parts.items():
        saved = state["transforms"][path]
        key = saved["key"].numpy().astype(np.uint32)
        # in place: a generator shared by two transforms stays shared
        part.R.set_state((saved["kind"], key, saved["pos"], saved["has_gauss"], saved["cached_gaussian"]))
    loader.generator.set_state(state["generator"])


def _random_parts(obj: object, path: str = "transform", seen: set[int] | None = None) -> list[tuple[str, Randomizable]]:
    """Every random transform in ``obj``, each named by its attribute path, in a fixed order: a Compose's own
    generator, its transforms' and those of the transforms they hold (MONAI's ``RandCropByPosNegLabeld`` crops with
    an inner ``RandCropByPosNegLabel`` that draws from a generator of its own)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    found = [(path, obj)] if isinstance(obj, Randomizable) else []
    if isinstance(obj, list | tuple):
        children = [(f"{path}.{i}", item) for i, item in enumerate(obj)]
    elif isinstance(obj, dict):
        children = [(f"{path}.{key}", item) for key, item in obj.items()]
    elif isinstance(obj, Transform | Randomizable):
        children = [(f"{path}.{name}", item) for name, item in vars(obj).items() if name != "R"]
    else:
        children = []
    for child_path, child in children:
        if isinstance(child, list | tuple | dict | Transform | Randomizable):
            found += _random_parts(child, child_path, seen)
    return found


def eval_loader(items: list[dict], cache_dir: Path | None = None, spacing: float | None = None) -> DataLoader:
    """One whole case per batch, cached after the first pass (and on disk with ``cache_dir``); resampled to ``spacing``
    where given (``eval_transforms``)."""
    settings = {"pipeline": "eval", "spacing": spacing}
    source = _source(_strip(items), list(eval_transforms(spacing).transforms), cache_dir, settings)
    dataset = CacheDataset(source, None, cache_rate=1.0, num_workers=0, progress=False)
    return DataLoader(dataset, batch_size=1, shuffle=False)


def _strip(items: list[dict]) -> list[dict]:
    """MONAI readers want string paths; keep the case id for reports, the release for the labels' convention and the
    annotation mask for the loss."""
    return [
        {
            "image": [str(p) for p in it["image"]],
            "label": str(it["label"]),
            "case_id": it["case_id"],
            "release": it.get("release", "other"),
            ANNOTATED: torch.tensor(annotation_mask(it.get(ANNOTATED, REGIONS))),
        }
        for it in items
    ]
