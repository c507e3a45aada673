"""No enhancing tumour where there is none: a small predicted ET becomes necrotic core.

A low-grade glioma has no enhancing tumour, and a model that predicts a few enhancing voxels in one scores ET Dice 0
and HD95 373.13 mm for it, which pulls a cohort's mean ET Dice down by more than any other error. BraTS's leading
entries relabel a predicted ET below a volume threshold as necrotic core, the threshold chosen on validation data
(e.g. Isensee et al., nnU-Net for BraTS 2020). Here the ET channel of a case whose predicted ET is smaller than
``min_volume`` mm³ is cleared: its voxels stay in TC and WT, as label 1 (necrotic / non-enhancing core) would.

The threshold is chosen per run on the validation split (``choose_et_min_volume``) among ``CANDIDATES``: the one with
the best mean ET Dice there, the smallest on a tie (0 turns the rule off).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from brats_fl.data.labels import REGIONS

#: thresholds tried on the validation split (mm³); 0 keeps every prediction
CANDIDATES: tuple[float, ...] = (0.0, 25.0, 50.0, 100.0, 200.0, 300.0, 500.0, 1000.0, 2000.0)
_ET = REGIONS.index("ET")


def drop_small_et(pred: torch.Tensor, spacing: Sequence[Sequence[float]] | None, min_volume: float) -> torch.Tensor:
    """Binary predictions (B, 3, X, Y, Z) with the ET channel cleared in every case whose predicted ET is smaller than
    ``min_volume`` mm³ (``spacing``: each case's voxel size in mm, default 1 mm)."""
    out = pred.clone()
    for b in range(pred.shape[0]):
        voxel = float(np.prod(spacing[b])) if spacing else 1.0
        if float(pred[b, _ET].sum()) * voxel < min_volume:
            out[b, _ET] = 0
    return out


def et_dice_after(row: dict, min_volume: float) -> float:
    """A scored case's ET Dice (a ``brats_fl.seg.metrics.RegionMetrics.per_case`` row) had its predicted ET below
    ``min_volume`` been cleared: a cleared case scores 1 where the truth has no ET and 0 where it has."""
    if row["volume_ET"] >= min_volume:
        return row["dice_ET"]
    return 1.0 if row["volume_truth_ET"] == 0 else 0.0


def et_dice_at(rows: Sequence[dict], min_volume: float) -> float:
    """Mean ET Dice of per-case rows had ET below ``min_volume`` been cleared (``et_dice_after``)."""
    scores = [et_dice_after(row, min_volume) for row in rows if "dice_ET" in row]
    if not scores:
        raise ValueError("no case with an ET score to choose the ET threshold on")
    return float(np.mean(scores))


def choose_et_min_volume(rows: Sequence[dict]) -> float:
    """The candidate with the best mean ET Dice on ``rows`` (a validation split), the smallest on a tie."""
    return max(CANDIDATES, key=lambda t: (round(et_dice_at(rows, t), 12), -t))
