"""Lesion-wise Dice and HD95, as the BraTS challenge ranks segmentations since 2023.

Voxel-wise Dice over a whole case favours a model that segments the one large lesion and misses three small ones;
the challenge's lesion-wise scores weigh every lesion alike and charge every false-positive lesion. Per region (WT, TC,
ET) of one case:

1. Ground-truth lesions are the 26-connected components of the truth, where components closer than ``dilation``
   voxels are one lesion (the components of the truth dilated ``dilation`` times, each restricted to the truth).
2. Predicted lesions are the 26-connected components of the prediction.
3. A ground-truth lesion's match is the union of the predicted lesions that touch it dilated ``dilation`` times; its
   Dice and HD95 are those of the lesion against its match (no match: Dice 0, HD95 ``HD95_UNDEFINED``).
4. A predicted lesion that matches no ground-truth lesion is a false positive: it scores Dice 0 and HD95
   ``HD95_UNDEFINED``.
5. Lesions of at most ``min_volume`` mm³ in the truth are left out of the means, with whatever they matched.
6. Lesion-wise Dice is the sum of the lesions' Dice over (lesions + false positives); HD95 likewise, each false
   positive adding ``HD95_UNDEFINED``. A case with neither lesions nor false positives scores Dice 1 and HD95 0.

The challenge's own code (BraTS-2023-Metrics, the ``brats-evaluation`` package) is AGPL-licensed, and panoptica,
which is MIT, matches lesions by overlap rather than by the challenge's dilation and pins numpy below 2.3 and pandas
below 3, older than what torch, MONAI and FLARE install here; so this module writes the definition out over scipy's
connected components and MONAI's Hausdorff distance. MONAI's HD95 is the larger of the two directed 95th percentiles
of distances between boundary voxels; the challenge's takes the surface elements' areas into account, which moves the
value by a fraction of a voxel.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance
from scipy import ndimage

from brats_fl.seg.metrics import HD95_UNDEFINED

#: 26-connectivity for components, as the challenge counts them
_COMPONENTS = np.ones((3, 3, 3), dtype=bool)
#: the dilation's structuring element: 18-connectivity, as the challenge dilates
_DILATION = ndimage.generate_binary_structure(3, 2)


@dataclass(frozen=True)
class LesionRule:
    """The challenge's per-task settings: dilation (voxels, at least 1) and the volume (mm³) at or below which a lesion
    is left out."""

    dilation: int
    min_volume: float


#: BraTS 2023 settings per sub-challenge (glioma, sub-Saharan Africa, meningioma, paediatric, metastases)
RULES: dict[str, LesionRule] = {
    "GLI": LesionRule(3, 50.0),
    "SSA": LesionRule(3, 50.0),
    "MEN": LesionRule(1, 50.0),
    "PED": LesionRule(3, 50.0),
    "MET": LesionRule(1, 2.0),
}
DEFAULT_RULE = "GLI"


@dataclass(frozen=True)
class LesionScores:
    """One region of one case: lesion-wise Dice and HD95, and the counts behind them."""

    dice: float
    hd95: float
    lesions: int
    detected: int
    false_positives: int


def _hd95(truth: np.ndarray, pred: np.ndarray, spacing: tuple[float, float, float]) -> float:
    if not pred.any():
        return HD95_UNDEFINED
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = compute_hausdorff_distance(
            torch.from_numpy(pred)[None, None], torch.from_numpy(truth)[None, None], percentile=95, spacing=spacing
        )
    return float(value)


def _dice(truth: np.ndarray, pred: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(truth & pred) / (np.count_nonzero(truth) + np.count_nonzero(pred))


def _crop(pred: np.ndarray, truth: np.ndarray, margin: int) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to the box around either's voxels, ``margin`` voxels wider on every side (within the volume).
    Components, dilations by less than ``margin`` and distances are the same inside the box as in the whole volume,
    and a tumour fills a small part of a brain: scoring a case's lesions on its whole 240 x 240 x 155 grid spent most
    of the time dilating empty space."""
    found = np.argwhere(pred | truth)
    if not len(found):
        return pred, truth
    low = np.maximum(found.min(0) - margin, 0)
    high = np.minimum(found.max(0) + margin + 1, pred.shape)
    box = tuple(slice(a, b) for a, b in zip(low, high, strict=True))
    return pred[box], truth[box]


def lesion_scores(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    rule: str = DEFAULT_RULE,
) -> LesionScores:
    """Lesion-wise scores of one region: ``pred`` and ``truth`` are boolean masks (X, Y, Z) on one grid of voxel size
    ``spacing`` (mm)."""
    if rule not in RULES:
        raise ValueError(f"unknown lesion rule {rule!r}; known: {sorted(RULES)}")
    settings = RULES[rule]
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    pred, truth = _crop(pred, truth, margin=settings.dilation + 1)
    voxel = float(np.prod(spacing))
    predicted, _ = ndimage.label(pred, structure=_COMPONENTS)
    grouped, count = ndimage.label(
        ndimage.binary_dilation(truth, _DILATION, iterations=settings.dilation), structure=_COMPONENTS
    )
    lesions = grouped * truth
    matched: set[int] = set()
    dice, hd95, detected = [], [], 0
    for index in range(1, count + 1):
        lesion = lesions == index
        reach = ndimage.binary_dilation(lesion, _DILATION, iterations=settings.dilation)
        touching = set(np.unique(predicted[reach]).tolist()) - {0}
        matched |= touching
        if np.count_nonzero(lesion) * voxel <= settings.min_volume:
            continue
        match = np.isin(predicted, list(touching)) if touching else np.zeros_like(lesion)
        dice.append(_dice(lesion, match))
        hd95.append(_hd95(lesion, match, spacing))
        detected += bool(touching)
    false_positives = len(set(np.unique(predicted).tolist()) - {0} - matched)
    counted = len(dice) + false_positives
    if counted == 0:
        return LesionScores(1.0, 0.0, 0, 0, 0)
    return LesionScores(
        dice=sum(dice) / counted,
        hd95=(sum(hd95) + false_positives * HD95_UNDEFINED) / counted,
        lesions=len(dice),
        detected=detected,
        false_positives=false_positives,
    )
