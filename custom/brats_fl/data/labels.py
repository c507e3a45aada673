"""BraTS label conventions: one place that says which label means what and in which channel order.

BraTS 2020 labels: 0 background, 1 necrotic / non-enhancing core (NCR/NET), 2 peritumoural oedema (ED),
4 enhancing tumour (ET). The evaluated regions are nested: WT = 1+2+4, TC = 1+4, ET = 4.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch and monai only where a label map is converted: the data commands run without them
    import torch

#: The channel order of every multi-channel label, prediction and network output in this package.
#: It is the order MONAI's ConvertToMultiChannelBasedOnBratsClasses produces; do not reorder.
REGIONS: tuple[str, ...] = ("TC", "WT", "ET")

#: The order regions are shown in tables (the BraTS papers' order).
DISPLAY_ORDER: tuple[str, ...] = ("WT", "TC", "ET")

#: Label values allowed in a BraTS 2020 segmentation file.
BRATS_LABELS: frozenset[int] = frozenset({0, 1, 2, 4})


@functools.cache
def _to_channels() -> Callable:
    from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses

    return ConvertToMultiChannelBasedOnBratsClasses(et_label=4)


def annotation_mask(annotated: Sequence[str]) -> list[float]:
    """1.0 for each region (REGIONS order) a case's annotator labelled, 0.0 for one left unlabelled.

    Partial labels (SegViz): a site may annotate only some regions; the others are unknown, not background.
    """
    unknown = sorted(set(annotated) - set(REGIONS))
    if unknown or not annotated:
        raise ValueError(f"annotated regions must be a non-empty subset of {REGIONS}, got {list(annotated)}")
    return [float(r in annotated) for r in REGIONS]


def labels_to_regions(seg: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Convert a 0/1/2/4 label map (X, Y, Z) into boolean region channels (3, X, Y, Z) in REGIONS order."""
    return _to_channels()(seg)


def regions_to_labels(regions: np.ndarray | torch.Tensor) -> np.ndarray:
    """Convert region channels (3, X, Y, Z), boolean or probabilities > 0.5, back into a 0/1/2/4 label map.

    Regions are painted from the outside in (WT, then TC, then ET), so the result is nested even
    when a prediction is not: an ET voxel outside the predicted TC still becomes label 4.
    """
    arr = regions.detach().cpu().numpy() if hasattr(regions, "detach") else np.asarray(regions)
    if arr.shape[0] != len(REGIONS):
        raise ValueError(f"expected {len(REGIONS)} region channels {REGIONS}, got shape {arr.shape}")
    mask = arr > 0.5 if arr.dtype != bool else arr
    tc, wt, et = (mask[REGIONS.index(r)] for r in ("TC", "WT", "ET"))
    out = np.zeros(arr.shape[1:], dtype=np.uint8)
    out[wt] = 2
    out[tc] = 1
    out[et] = 4
    return out
