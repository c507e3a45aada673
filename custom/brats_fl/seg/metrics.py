"""Dice, IoU and HD95 per tumour region, with the BraTS challenge's conventions for empty masks.

MONAI computes the metrics; this module fixes the conventions once:
- Dice and IoU: both masks empty -> 1, one empty -> 0 (MONAI's ``ignore_empty=False``).
- HD95 (mm): both empty -> 0; one empty -> 373.13, the BraTS challenge's value (the image diagonal).
- A region the case's site did not annotate (partial labels) is not scored: it has no entry in the case's
  row, and region means count only the cases that annotate the region; a region no case annotates has none.
- With ``lesion_wise``, also the challenge's lesion-wise Dice and HD95 since 2023 (``brats_fl.seg.lesions``), as
  ``lesion_dice`` and ``lesion_hd95``, with the counts behind them (``LESION_COUNTS``: true lesions scored, matched,
  false positives, false negatives) and, per case, the rule (``lesion_rule``: 2023, 2024 or 2025; by default the
  case's release's): a test split's scoring asks for them, a round's validation does not (they take a
  connected-component analysis per region and lesion).
- Without ``distances``, no HD95 (voxel- or lesion-wise): the benchmark's untrained model predicts half the head,
  whose HD95 says nothing and takes seconds per case (``brats_fl.results.benchmark.untrained_scores``), and a test
  case's scores without post-processing (``brats_fl.seg.postprocess``) need only the Dice and the counts.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU

from brats_fl.data.labels import DISPLAY_ORDER, REGIONS
from brats_fl.seg.lesions import case_lesion_scores, rule_for

HD95_UNDEFINED = 373.13
METRICS = ("dice", "iou", "hd95")
OVERLAP_METRICS = ("dice", "iou")
LESION_METRICS = ("lesion_dice", "lesion_hd95")
#: per region: true lesions scored, of them matched, false-positive and false-negative lesions (``LesionScores``)
LESION_COUNTS = ("lesions", "lesions_matched", "lesions_fp", "lesions_fn")


def _as_triple(spacing: float | tuple[float, float, float]) -> tuple[float, float, float]:
    return tuple(spacing) if isinstance(spacing, tuple) else (float(spacing),) * 3


class RegionMetrics:
    """Accumulates per-case, per-region metrics over an evaluation pass."""

    def __init__(
        self,
        spacing: float | tuple[float, float, float] = 1.0,
        lesion_wise: bool = False,
        distances: bool = True,
        lesion_rule: str = "auto",
    ):
        rule_for(lesion_rule, None)  # refuses an unknown rule before any case is scored
        self.spacing = spacing
        self.lesion_rule = lesion_rule
        self.distances = distances
        lesion = (*(LESION_METRICS if distances else LESION_METRICS[:1]), *LESION_COUNTS) if lesion_wise else ()
        self.metrics = (*(METRICS if distances else OVERLAP_METRICS), *lesion)
        self._dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
        self._iou = MeanIoU(include_background=True, reduction="none", ignore_empty=False)
        self._hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
        self.rows: list[dict[str, np.ndarray]] = []
        self.volumes: list[dict[str, float]] = []
        self.rules: list[str | None] = []

    def update(
        self,
        pred: torch.Tensor,
        truth: torch.Tensor,
        annotated: torch.Tensor | None = None,
        spacing: list[tuple[float, float, float]] | None = None,
        releases: list[str] | None = None,
    ) -> None:
        """Add a batch of binary masks shaped (B, 3, X, Y, Z) in REGIONS order; ``annotated`` (B, 3) marks the
        regions each case's labels cover (default: all); ``spacing`` each case's voxel size in mm (default: the
        metric's own); ``releases`` each case's BraTS release, which chooses the lesion-wise rule unless the metric
        was given one (default: ``other``)."""
        pred, truth = pred.float(), truth.float()
        dice = self._dice(pred, truth).cpu().numpy()
        values = {"dice": dice, "iou": self._iou(pred, truth).cpu().numpy()}
        if "hd95" in self.metrics:
            values["hd95"] = self._hd95(pred, truth, spacing)
        scored = np.ones(dice.shape, bool) if annotated is None else annotated.bool().cpu().numpy()
        rules = [None] * pred.shape[0]
        if "lesion_dice" in self.metrics:
            rules = [rule_for(self.lesion_rule, releases[b] if releases else None) for b in range(pred.shape[0])]
            values |= self._lesion_wise(pred, truth, spacing, rules)
        self.rules.extend(rules)
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
        self,
        pred: torch.Tensor,
        truth: torch.Tensor,
        spacing: list[tuple[float, float, float]] | None,
        rules: list[str],
    ) -> dict[str, np.ndarray]:
        default = _as_triple(self.spacing)
        shape = tuple(pred.shape[:2])
        out = {m: np.zeros(shape) for m in (*LESION_METRICS, *LESION_COUNTS)}
        p, t = pred.bool().cpu().numpy(), truth.bool().cpu().numpy()
        for b in range(shape[0]):
            scored = case_lesion_scores(p[b], t[b], spacing[b] if spacing else default, rules[b], self.distances)
            for c, scores in enumerate(scored):
                figures = (scores.dice, scores.hd95, scores.lesions, scores.matched, scores.false_positives,
                           scores.false_negatives)  # fmt: skip
                for m, value in zip((*LESION_METRICS, *LESION_COUNTS), figures, strict=True):
                    out[m][b, c] = value
        return out

    def per_case(self) -> list[dict[str, float | str]]:
        """One flat dict per case: ``dice_WT``, ``iou_TC``, ``hd95_ET`` ... (annotated regions only), and, where ET is
        annotated, the predicted and true ET volumes in mm³ (``volume_ET``, ``volume_truth_ET``); with lesion-wise
        scores, the lesion rule that gave them (``lesion_rule``)."""
        out = []
        for row, volumes, rule in zip(self.rows, self.volumes, self.rules, strict=True):
            values = {f"{m}_{r}": float(row[m][REGIONS.index(r)]) for m in self.metrics for r in DISPLAY_ORDER}
            kept = {k: v for k, v in values.items() if not np.isnan(v)} | volumes
            out.append(kept | ({"lesion_rule": rule} if rule else {}))
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
            if m not in LESION_COUNTS:  # a count's mean per case and region is given per region only
                out[f"{m}_mean"] = float(np.nanmean(table))
        out["cases"] = float(len(self.rows))
        return out
