"""Connected-component post-processing: predicted components smaller than a volume chosen per region are removed.

The challenge's lesion-wise scores (``brats_fl.seg.lesions``) charge every false-positive component, and a model that
scores voxel-wise Dice 0.95 often leaves a few specks of whole tumour and, in a low-grade case, a little enhancing
tumour where there is none. BraTS's leading entries remove predicted components below a volume chosen on validation
data (e.g. Isensee et al., nnU-Net for BraTS 2020, which relabels a small enhancing tumour as necrotic core). Here a
26-connected component of a region's prediction smaller than that region's ``min_volume`` (mm³) is removed so that
the regions stay nested: a removed WT component leaves no tumour, a removed TC component stays oedema (WT), a removed
ET component stays necrotic core (TC and WT), as label 1 would.

With ``auto`` each region's volume is chosen on a validation split among ``CANDIDATES``: the one with the best mean of
voxel-wise Dice and lesion-wise Dice (the case's lesion rule) of that region, the smallest on a tie; 0 keeps every
component. A split with fewer than ``MIN_CASES`` cases annotating a region does not choose for it (the region keeps
every component) and the choice says so (``Choice.volumes``). The job parameter ``min_volume``
(``brats_fl.settings.params.parse_min_volume``) says which: none, auto, or given volumes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from brats_fl.data.labels import REGIONS
from brats_fl.seg.lesions import lesion_scores, rule_for

#: volumes tried on the validation split (mm³); 0 keeps every component
CANDIDATES: tuple[float, ...] = (0.0, 10.0, 25.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)
#: fewer validation cases annotating a region than this, and the region's volume is not chosen
MIN_CASES = 3
#: the regions' nesting: clearing a component of a region clears the regions inside it there
_INSIDE = {"WT": ("TC", "ET"), "TC": ("ET",), "ET": ()}
_COMPONENTS = np.ones((3, 3, 3), dtype=bool)


def remove_small_components(
    pred: torch.Tensor, spacing: Sequence[Sequence[float]] | None, min_volume: dict[str, float]
) -> torch.Tensor:
    """Binary predictions (B, 3, X, Y, Z) in REGIONS order without the components of each region smaller than its
    ``min_volume`` (mm³), nested as the module says (``spacing``: each case's voxel size in mm, default 1 mm)."""
    out = pred.clone()
    for b in range(pred.shape[0]):
        voxel = float(np.prod(spacing[b])) if spacing else 1.0
        for region in ("WT", "TC", "ET"):  # outermost first, so that what a region clears is cleared inside it too
            limit = min_volume.get(region, 0.0)
            if not limit:
                continue
            channel = REGIONS.index(region)
            small = torch.from_numpy(_small_components(out[b, channel].bool().cpu().numpy(), limit / voxel))
            for name in (region, *_INSIDE[region]):
                out[b, REGIONS.index(name)][small.to(out.device)] = 0
    return out


def _small_components(mask: np.ndarray, max_voxels: float) -> np.ndarray:
    """The voxels of ``mask``'s 26-connected components of fewer than ``max_voxels`` voxels."""
    labels, count = ndimage.label(mask, structure=_COMPONENTS)
    if not count:
        return np.zeros_like(mask)
    sizes = np.bincount(labels.ravel())
    small = np.flatnonzero(sizes < max_voxels)
    return np.isin(labels, small[small > 0])


@dataclass
class Choice:
    """Per region and candidate volume, the summed score of the validation cases seen so far; ``volumes`` picks."""

    rule: str = "auto"
    totals: dict[str, np.ndarray] = field(default_factory=lambda: {r: np.zeros(len(CANDIDATES)) for r in REGIONS})
    cases: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REGIONS, 0))

    def add(
        self,
        pred: np.ndarray,
        truth: np.ndarray,
        spacing: Sequence[float],
        annotated: Iterable[bool] | None = None,
        release: str | None = None,
    ) -> None:
        """Score one validation case (boolean channels (3, X, Y, Z) in REGIONS order) at every candidate volume."""
        rule = rule_for(self.rule, release)
        voxel = float(np.prod(spacing))
        spacing = tuple(float(s) for s in spacing)
        for c, scored in enumerate(annotated if annotated is not None else [True] * len(REGIONS)):
            if not scored:
                continue
            region = REGIONS[c]
            labels, _ = ndimage.label(pred[c], structure=_COMPONENTS)
            sizes = np.bincount(labels.ravel())[1:] * voxel
            seen: dict[tuple[int, ...], float] = {}
            for i, limit in enumerate(CANDIDATES):
                removed = tuple(np.flatnonzero(sizes < limit) + 1)
                if removed not in seen:  # candidates that remove the same components score alike
                    kept = pred[c] & ~np.isin(labels, removed) if removed else pred[c]
                    voxelwise = _dice(kept, truth[c])
                    lesionwise = lesion_scores(kept, truth[c], spacing, rule, region).dice
                    seen[removed] = (voxelwise + lesionwise) / 2
                self.totals[region][i] += seen[removed]
            self.cases[region] += 1

    def volumes(self) -> tuple[dict[str, float], dict[str, str]]:
        """Each region's chosen volume (mm³), and a note for each region the cases were too few to choose for."""
        chosen, notes = {}, {}
        for region in REGIONS:
            if self.cases[region] < MIN_CASES:
                chosen[region] = 0.0
                notes[region] = (
                    f"{self.cases[region]} validation case(s) annotate {region}, fewer than {MIN_CASES}: not chosen, "
                    "every component kept"
                )
                continue
            scores = np.round(self.totals[region] / self.cases[region], 12)
            chosen[region] = CANDIDATES[int(np.argmax(scores))]  # the first maximum: the smallest volume
        return chosen, notes


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = np.count_nonzero(pred) + np.count_nonzero(truth)
    return 1.0 if total == 0 else 2.0 * np.count_nonzero(pred & truth) / total


@torch.no_grad()
def choose_min_volumes(trainer, loader, rule: str = "auto") -> tuple[dict[str, float], dict[str, str]]:
    """Each region's volume chosen on ``loader``'s cases (a validation split) for ``trainer``'s model
    (``brats_fl.seg.trainer.Trainer``), and the notes of ``Choice.volumes``."""
    from monai.data import MetaTensor

    from brats_fl.data.loading import ANNOTATED

    choice = Choice(rule=rule)
    for batch in loader:
        label = batch["label"]
        spacing = [tuple(map(float, p)) for p in label.pixdim] if isinstance(label, MetaTensor) else None
        pred = (torch.sigmoid(trainer.infer(batch["image"])) > 0.5).cpu().numpy()
        truth = torch.as_tensor(label).bool().cpu().numpy()
        for b in range(pred.shape[0]):
            choice.add(
                pred[b],
                truth[b],
                spacing[b] if spacing else (1.0, 1.0, 1.0),
                batch[ANNOTATED][b].bool().tolist(),
                batch["release"][b] if "release" in batch else None,
            )
    return choice.volumes()
