"""Dice, IoU and HD95 per tumour region, with the BraTS challenge's conventions for empty masks.

MONAI computes the metrics; this module fixes the conventions once:
- Dice and IoU: both masks empty -> 1, one empty -> 0 (MONAI's ``ignore_empty=False``).
- HD95 (mm): both empty -> 0; one empty -> 373.13, the BraTS challenge's value (the image diagonal).
- A region the case's site did not annotate (partial labels) is not scored: it has no entry in the case's
  row, and region means count only the cases that annotate the region; a region no case annotates has none.
- With ``lesion_wise``, also the challenge's lesion-wise Dice and HD95 since 2023 (``brats_fl.seg.lesions``), as
  ``lesion_dice`` and ``lesion_hd95``: a test split's scoring asks for them, a round's validation does not (they take
  a connected-component analysis per region and lesion).
- Without ``distances``, Dice and IoU alone: the benchmark's untrained model predicts half the head, whose HD95 says
  nothing and takes seconds per case (``brats_fl.results.benchmark.untrained_scores``).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU

from brats_fl.data.labels import DISPLAY_ORDER, REGIONS

HD95_UNDEFINED = 373.13
METRICS = ("dice", "iou", "hd95")
OVERLAP_METRICS = ("dice", "iou")
LESION_METRICS = ("lesion_dice", "lesion_hd95")


def _as_triple(spacing: float | tuple[float, float, float]) -> tuple[float, float, float]:
    return tuple(spacing) if isinstance(spacing, tuple) else (float(spacing),) * 3


class RegionMetrics:
    """Accumulates per-case, per-region metrics over an evaluation pass."""

    def __init__(
        self, spacing: float | tuple[float, float, float] = 1.0, lesion_wise: bool = False, distances: bool = True
    ):
        if lesion_wise and not distances:
            raise ValueError("lesion-wise scores include HD95: lesion_wise needs distances")
        self.spacing = spacing
        self.metrics = (*METRICS, *LESION_METRICS) if lesion_wise else METRICS if distances else OVERLAP_METRICS
        self._dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
        self._iou = MeanIoU(include_background=True, reduction="none", ignore_empty=False)
        self._hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
        self.rows: list[dict[str, np.ndarray]] = []
        self.volumes: list[dict[str, float]] = []

    def update(
        self,
        pred: torch.Tensor,
        truth: torch.Tensor,
        annotated: torch.Tensor | None = None,
        spacing: list[tuple[float, float, float]] | None = None,
    ) -> None:
        """Add a batch of binary masks shaped (B, 3, X, Y, Z) in REGIONS order; ``annotated`` (B, 3) marks the
        regions each case's labels cover (default: all); ``spacing`` each case's voxel size in mm (default: the
        metric's own)."""
        pred, truth = pred.float(), truth.float()
        dice = self._dice(pred, truth).cpu().numpy()
        values = {"dice": dice, "iou": self._iou(pred, truth).cpu().numpy()}
        if "hd95" in self.metrics:
            values["hd95"] = self._hd95(pred, truth, spacing)
        scored = np.ones(dice.shape, bool) if annotated is None else annotated.bool().cpu().numpy()
        if "lesion_dice" in self.metrics:
            values |= self._lesion_wise(pred, truth, spacing)
        for b in range(pred.shape[0]):
            self.rows.append({m: np.where(scored[b], values[m][b], np.nan) for m in self.metrics})
            # ET volumes (mm³), where the case's labels cover ET: what the post-processing of small ET is chosen on
            # (brats_fl.seg.postprocess)
            voxel = float(np.prod(spacing[b] if spacing else _as_triple(self.spacing)))
            et = REGIONS.index("ET")
            volumes = {
                "volume_ET": float(pred[b, et].sum()) * voxel,
                "volume_truth_ET": float(truth[b, et].sum()) * voxel,
            }
            self.volumes.append(volumes if scored[b, et] else {})

    def _hd95(
        self, pred: torch.Tensor, truth: torch.Tensor, spacing: list[tuple[float, float, float]] | None
    ) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI warns on every empty mask; handled below
            hd = self._hd(pred, truth, spacing=spacing or self.spacing).cpu().numpy().astype(np.float64)
        pred_empty = (pred.flatten(2).sum(-1) == 0).cpu().numpy()
        truth_empty = (truth.flatten(2).sum(-1) == 0).cpu().numpy()
        return np.where(pred_empty & truth_empty, 0.0, np.where(pred_empty | truth_empty, HD95_UNDEFINED, hd))

    def _lesion_wise(
        self, pred: torch.Tensor, truth: torch.Tensor, spacing: list[tuple[float, float, float]] | None
    ) -> dict[str, np.ndarray]:
        from brats_fl.seg.lesions import lesion_scores  # it takes HD95_UNDEFINED from here

        default = _as_triple(self.spacing)
        shape = tuple(pred.shape[:2])
        out = {m: np.zeros(shape) for m in LESION_METRICS}
        p, t = pred.bool().cpu().numpy(), truth.bool().cpu().numpy()
        for b in range(shape[0]):
            for c in range(shape[1]):
                scores = lesion_scores(p[b, c], t[b, c], spacing[b] if spacing else default)
                out["lesion_dice"][b, c], out["lesion_hd95"][b, c] = scores.dice, scores.hd95
        return out

    def per_case(self) -> list[dict[str, float]]:
        """One flat dict per case: ``dice_WT``, ``iou_TC``, ``hd95_ET`` ... (annotated regions only), and, where ET is
        annotated, the predicted and true ET volumes in mm³ (``volume_ET``, ``volume_truth_ET``)."""
        out = []
        for row, volumes in zip(self.rows, self.volumes, strict=True):
            values = {f"{m}_{r}": float(row[m][REGIONS.index(r)]) for m in self.metrics for r in DISPLAY_ORDER}
            out.append({k: v for k, v in values.items() if not np.isnan(v)} | volumes)
        return out

    def aggregate(self) -> dict[str, float]:
        """Means over cases per region, and each metric's mean over the regions (over the scored values)."""
        if not self.rows:
            raise ValueError("no case was evaluated")
        out: dict[str, float] = {}
        for m in self.metrics:
            table = np.stack([row[m] for row in self.rows])
            for r in DISPLAY_ORDER:
                column = table[:, REGIONS.index(r)]
                if not np.isnan(column).all():
                    out[f"{m}_{r}"] = float(np.nanmean(column))
            out[f"{m}_mean"] = float(np.nanmean(table))
        out["cases"] = float(len(self.rows))
        return out
