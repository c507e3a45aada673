"""BraTS label conventions: one place that says which label means what and in which channel order.

Every release labels the tumour core's non-enhancing part 1 and the surrounding oedema (infiltrated tissue) 2; the
enhancing tumour is 4 in BraTS 2020 and 2021 and 3 from 2023 on, whose post-treatment glioma data of 2024 adds 4 for
the resection cavity. The evaluated regions are nested and the same in every release: WT = core + oedema + ET,
TC = core + ET, ET. A resection cavity belongs to no region. Which release a case comes from is read from its file
names (``brats_fl.data.layout``); the 2024 post-treatment data share the 2023 names and are declared.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch and monai only where a label map is converted: the data commands run without them
    import torch

#: The channel order of every multi-channel label, prediction and network output in this package.
#: It is the order MONAI's ConvertToMultiChannelBasedOnBratsClasses produces; do not reorder.
REGIONS: tuple[str, ...] = ("TC", "WT", "ET")

#: The order regions are shown in tables (the BraTS papers' order).
DISPLAY_ORDER: tuple[str, ...] = ("WT", "TC", "ET")


@dataclass(frozen=True)
class Convention:
    """What each label value of a release's segmentation files means."""

    name: str
    #: every value a file may hold, with its meaning
    labels: dict[int, str]
    #: the enhancing tumour's value; the core is 1 and the oedema 2 in every release
    et: int
    #: the resection cavity's value, in no region; None where the release labels no cavity
    cavity: int | None = None

    def describe(self) -> str:
        return ", ".join(f"{v} {m}" for v, m in self.labels.items() if v)


#: label conventions by name (``brats_fl.data.layout.Release.convention``)
CONVENTIONS: dict[str, Convention] = {
    c.name: c
    for c in (
        Convention("brats2020", {0: "background", 1: "NCR/NET", 2: "ED", 4: "ET"}, et=4),
        Convention("brats2023", {0: "background", 1: "NETC", 2: "SNFH", 3: "ET"}, et=3),
        Convention("brats2024-post", {0: "background", 1: "NETC", 2: "SNFH", 3: "ET", 4: "RC"}, et=3, cavity=4),
    )
}
#: the convention of data that records none (datalists and models from before releases were told apart)
DEFAULT_CONVENTION = "brats2020"


def convention(name: str) -> Convention:
    """The convention ``name``; refuses an unknown one, listing the known."""
    if name not in CONVENTIONS:
        raise ValueError(f"unknown label convention {name!r}; known: {sorted(CONVENTIONS)}")
    return CONVENTIONS[name]


@functools.cache
def _to_channels(et: int) -> Callable:
    from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses

    # MONAI's TC is 1 + ET and its WT is TC + 2, so any other value (2024's cavity, 4) falls in no region
    return ConvertToMultiChannelBasedOnBratsClasses(et_label=et)


def annotation_mask(annotated: Sequence[str]) -> list[float]:
    """1.0 for each region (REGIONS order) a case's annotator labelled, 0.0 for one left unlabelled.

    Partial labels (SegViz): a site may annotate only some regions; the others are unknown, not background.
    """
    unknown = sorted(set(annotated) - set(REGIONS))
    if unknown or not annotated:
        raise ValueError(f"annotated regions must be a non-empty subset of {REGIONS}, got {list(annotated)}")
    return [float(r in annotated) for r in REGIONS]


def labels_to_regions(seg: np.ndarray | torch.Tensor, name: str = DEFAULT_CONVENTION) -> np.ndarray | torch.Tensor:
    """Convert a label map (X, Y, Z) of convention ``name`` into boolean region channels (3, X, Y, Z), REGIONS
    order."""
    return _to_channels(convention(name).et)(seg)


def regions_to_labels(regions: np.ndarray | torch.Tensor, name: str = DEFAULT_CONVENTION) -> np.ndarray:
    """Convert region channels (3, X, Y, Z), boolean or probabilities > 0.5, back into a label map of convention
    ``name`` (a prediction never holds a resection cavity: no network region is one).

    Regions are painted from the outside in (WT, then TC, then ET), so the result is nested even
    when a prediction is not: an ET voxel outside the predicted TC still becomes ET.
    """
    arr = regions.detach().cpu().numpy() if hasattr(regions, "detach") else np.asarray(regions)
    if arr.shape[0] != len(REGIONS):
        raise ValueError(f"expected {len(REGIONS)} region channels {REGIONS}, got shape {arr.shape}")
    mask = arr > 0.5 if arr.dtype != bool else arr
    tc, wt, et = (mask[REGIONS.index(r)] for r in ("TC", "WT", "ET"))
    out = np.zeros(arr.shape[1:], dtype=np.uint8)
    out[wt] = 2
    out[tc] = 1
    out[et] = convention(name).et
    return out
