"""Lesion-wise Dice and HD95 by the BraTS challenge's rules of 2023, 2024 and 2025, and the counts behind them.

Voxel-wise Dice over a whole case favours a model that segments the one large lesion and misses three small ones;
the challenge's lesion-wise scores weigh every lesion alike and charge false-positive lesions. The rules differ by year
(each rule's settings, and the official code they come from, are in ``RULES`` and ``docs/explanation/metrics.md``).
Per region (WT, TC, ET) of one case:

- **2023** (BraTS-2023-Metrics): ground-truth lesions are the 26-connected components of the truth, where components
  closer than the dilation (3 voxels, 18-neighbour structuring element) are one lesion; predicted lesions are the
  26-connected components of the prediction. A true lesion's match is the union of the predicted lesions that touch it
  dilated as much; its Dice and HD95 are those of the lesion against its match (no match: Dice 0, HD95 the rule's
  penalty). A predicted lesion that touches no true lesion is a false positive (Dice 0, HD95 the penalty). True
  lesions of at most ``min_volume`` mm³ are left out of the means (what they touch is no false positive). The score is
  the sum over the lesions, divided by lesions + false positives; a region with neither scores Dice 1, HD95 0.
- **2024** (BraTS-2024-Metrics, glioma): as 2023 with a threshold of 20 mm³ (ET 10); predicted components are merged
  by the same dilation, and merged predicted lesions of at most as many voxels are removed before matching; ET lesions
  (true and predicted) that touch one non-enhancing core lesion (TC without ET, merged by a dilation of 5) are one.
- **2025** (BraTS_evaluation, on panoptica): the 26-connected components of truth and prediction, matched one to one
  by maximum bipartite matching on Dice (every pair that overlaps may match); the score is the mean Dice (HD95) of
  the matched pairs, panoptica's ``sq_dsc`` (``sq_hd95``) that the package's parser reports as the lesion-wise score.
  Unmatched lesions do not enter it but are counted; no dilation, no volume threshold.

Each region's ``LesionScores`` keeps the counts: true lesions scored, how many of them found a match, false-positive
and false-negative lesions, so that a case with voxel-wise Dice 0.93 and lesion-wise Dice 0.06 explains itself.

Why written here: the official code is AGPL-licensed (never a dependency), and panoptica, which is MIT, pins numpy
below 2.3 and pandas below 3, older than what torch, MONAI and FLARE install here; so this module writes the rules
out over scipy's connected components, scipy's ``linear_sum_assignment`` and MONAI's Hausdorff distance.
``benchmarks/lesion_rules_official.py`` compares every rule with the official code on phantom cases. Where this code
knowingly differs from the official code (``docs/explanation/metrics.md``):
- HD95 is MONAI's (the larger of the two directed 95th percentiles of boundary distances); the official code's
  weighs surface elements by their area, which moves a value by a fraction of a voxel.
- 2024: the official code also merges ET lesions through a resection cavity (label 4); the cavity is no tumour region
  and not among the channels scored here. An ET lesion touching two core lesions joins both groups here; the official
  relabelling keeps it with the first.
- 2025: a region empty in both truth and prediction scores Dice 1 and HD95 0 (panoptica: no value), and one with
  no matched pair Dice 0 and HD95 373 (panoptica: infinity; the package's parser uses 373 for global HD95).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from brats_fl.data.labels import REGIONS

#: 26-connectivity for components, as every rule counts them
_COMPONENTS = np.ones((3, 3, 3), dtype=bool)
#: the dilation's structuring element: 18-connectivity, as the 2023 and 2024 codes dilate
_DILATION = ndimage.generate_binary_structure(3, 2)


@dataclass(frozen=True)
class LesionRule:
    """One year's lesion-wise rule (glioma settings)."""

    #: where the settings come from
    source: str
    #: voxels: true lesions closer than this are one, and a true lesion's reach for its match; 0: one-to-one matching
    dilation: int
    #: per region: true lesions of at most this many mm³ are left out of the means
    min_volume: dict[str, float] = field(default_factory=dict)
    #: HD95 (mm) of a missed lesion and of a false positive
    hd95_penalty: float = 374.0
    #: 2024: predicted components merged by the dilation too, merged lesions of at most ``min_volume`` voxels removed
    merge_predicted: bool = False
    #: 2024: ET lesions that touch one non-enhancing core lesion (merged by this dilation) are one; 0: not merged
    core_dilation: int = 0


RULES: dict[str, LesionRule] = {
    "2023": LesionRule("BraTS-2023-Metrics metrics.py, BraTS-GLI", 3, {"WT": 50.0, "TC": 50.0, "ET": 50.0}, 374.0),
    "2024": LesionRule(
        "BraTS-2024-Metrics metrics_GLI.py", 3, {"WT": 20.0, "TC": 20.0, "ET": 10.0}, 337.0, True, core_dilation=5
    ),
    "2025": LesionRule("BraTS_evaluation 0.0.10 config_gli.yaml (panoptica MaxBipartiteMatching)", 0, {}, 373.0),
}
#: the rule a case is scored by when none is named, by its release (``brats_fl.data.layout.RELEASES``): releases
#: from before 2023 were ranked voxel-wise and take the first lesion-wise rule; files of 2025 are named as 2023's, so
#: the 2025 rule is chosen by name only
RULE_OF_RELEASE: dict[str, str] = {
    "2020": "2023",
    "2021": "2023",
    "2023": "2023",
    "2024-gli-post": "2024",
    "other": "2023",
}
AUTO = "auto"


@dataclass(frozen=True)
class LesionScores:
    """One region of one case: lesion-wise Dice and HD95, and the counts behind them."""

    dice: float
    hd95: float
    #: true lesions scored (above the rule's volume threshold)
    lesions: int
    #: of those, how many found a match
    matched: int
    false_positives: int

    @property
    def false_negatives(self) -> int:
        return self.lesions - self.matched


def rule_for(rule: str, release: str | None) -> str:
    """The rule a case is scored by: ``rule`` itself, or with ``auto`` its release's (``RULE_OF_RELEASE``)."""
    if rule != AUTO:
        if rule not in RULES:
            raise ValueError(f"unknown lesion rule {rule!r}; known: {AUTO}, {', '.join(RULES)}")
        return rule
    name = release or "other"
    if name not in RULE_OF_RELEASE:
        raise ValueError(f"no lesion rule for release {name!r}; known releases: {', '.join(RULE_OF_RELEASE)}")
    return RULE_OF_RELEASE[name]


def _hd95(truth: np.ndarray, pred: np.ndarray, spacing: tuple[float, float, float], penalty: float) -> float:
    if not pred.any() or not truth.any():
        return penalty
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = compute_hausdorff_distance(
            torch.from_numpy(pred)[None, None], torch.from_numpy(truth)[None, None], percentile=95, spacing=spacing
        )
    return float(value)


def _dice(truth: np.ndarray, pred: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(truth & pred) / (np.count_nonzero(truth) + np.count_nonzero(pred))


def _box(masks: list[np.ndarray], margin: int) -> tuple[slice, ...] | None:
    """The box around the masks' voxels, ``margin`` voxels wider on every side (within the volume); None if empty.
    Components, dilations by less than ``margin`` and distances are the same inside the box as in the whole volume,
    and a tumour fills a small part of a brain: scoring a case's lesions on its whole 240 x 240 x 155 grid spent most
    of the time dilating empty space."""
    found = np.argwhere(np.logical_or.reduce(masks))
    if not len(found):
        return None
    low = np.maximum(found.min(0) - margin, 0)
    high = np.minimum(found.max(0) + margin + 1, masks[0].shape)
    return tuple(slice(a, b) for a, b in zip(low, high, strict=True))


def lesions(mask: np.ndarray, dilation: int) -> tuple[np.ndarray, int]:
    """Label map and count of a mask's lesions: its 26-connected components, those within ``dilation`` voxels of
    each other (dilated with the 18-neighbour element) being one."""
    if not dilation:
        return ndimage.label(mask, structure=_COMPONENTS)
    grouped, _ = ndimage.label(ndimage.binary_dilation(mask, _DILATION, iterations=dilation), _COMPONENTS)
    return _relabel(grouped * mask)


def _relabel(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels renumbered 1..n in order of first appearance of their value (0 stays background)."""
    values = np.unique(labels)
    values = values[values > 0]
    lookup = np.zeros(int(labels.max()) + 1, dtype=np.int32)
    lookup[values] = np.arange(1, len(values) + 1)
    return lookup[labels], len(values)


def _drop_small(labels: np.ndarray, max_voxels: float) -> tuple[np.ndarray, int]:
    """Lesions of at most ``max_voxels`` voxels removed (2024's predicted lesions)."""
    counts = np.bincount(labels.ravel())
    small = np.flatnonzero(counts <= max_voxels)
    return _relabel(np.where(np.isin(labels, small[small > 0]), 0, labels))


def _merge_through(labels: np.ndarray, core: np.ndarray) -> tuple[np.ndarray, int]:
    """Lesions of ``labels`` that touch one lesion of ``core`` (either dilated once) become one lesion."""
    count = int(labels.max())
    parent = list(range(count + 1))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    first_of_core: dict[int, int] = {}
    for index in range(1, count + 1):
        reach = ndimage.binary_dilation(labels == index, _DILATION)
        for c in np.unique(core[reach]):
            if c == 0:
                continue
            if int(c) in first_of_core:
                parent[root(index)] = root(first_of_core[int(c)])
            else:
                first_of_core[int(c)] = index
    lookup = np.array([root(i) for i in range(count + 1)], dtype=np.int32)
    return _relabel(lookup[labels])


def _overlap_scores(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: tuple[float, float, float],
    settings: LesionRule,
    min_volume: float,
    distances: bool = True,
) -> LesionScores:
    """2023 and 2024: each true lesion against the union of the predicted lesions within its dilated reach."""
    voxel = float(np.prod(spacing))
    matched_pred: set[int] = set()
    dice, hd95, matched = [], [], 0
    for index in range(1, int(truth.max()) + 1):
        lesion = truth == index
        reach = ndimage.binary_dilation(lesion, _DILATION, iterations=settings.dilation)
        touching = set(np.unique(pred[reach]).tolist()) - {0}
        matched_pred |= touching
        if np.count_nonzero(lesion) * voxel <= min_volume:
            continue
        match = np.isin(pred, list(touching))
        dice.append(_dice(lesion, match))
        hd95.append(_hd95(lesion, match, spacing, settings.hd95_penalty) if distances else np.nan)
        matched += bool(touching)
    false_positives = len(set(np.unique(pred).tolist()) - {0} - matched_pred)
    counted = len(dice) + false_positives
    if counted == 0:
        return LesionScores(1.0, 0.0, 0, 0, 0)
    return LesionScores(
        dice=float(sum(dice) / counted),
        hd95=float((sum(hd95) + false_positives * settings.hd95_penalty) / counted),
        lesions=len(dice),
        matched=matched,
        false_positives=false_positives,
    )


def _bipartite_scores(
    pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, float, float], settings: LesionRule, distances: bool
) -> LesionScores:
    """2025: true and predicted lesions matched one to one, maximising the sum of the pairs' Dice."""
    n_truth, n_pred = int(truth.max()), int(pred.max())
    if n_truth == 0 and n_pred == 0:
        return LesionScores(1.0, 0.0, 0, 0, 0)
    # Dice of every overlapping pair, from the joint histogram of the two label maps
    both = (truth > 0) & (pred > 0)
    overlap = np.zeros((n_truth + 1, n_pred + 1))
    np.add.at(overlap, (truth[both], pred[both]), 1)
    sizes_t = np.bincount(truth.ravel(), minlength=n_truth + 1)
    sizes_p = np.bincount(pred.ravel(), minlength=n_pred + 1)
    dice = 2 * overlap / (sizes_t[:, None] + sizes_p[None, :]).clip(min=1)
    rows, cols = linear_sum_assignment(dice[1:, 1:], maximize=True)
    pairs = [(r + 1, c + 1) for r, c in zip(rows, cols, strict=True) if dice[r + 1, c + 1] > 0]
    if not pairs:
        return LesionScores(0.0, settings.hd95_penalty, n_truth, 0, n_pred)
    scores = [dice[r, c] for r, c in pairs]
    hd95 = [_hd95(truth == r, pred == c, spacing, settings.hd95_penalty) for r, c in pairs] if distances else [np.nan]
    return LesionScores(
        dice=float(np.mean(scores)),
        hd95=float(np.mean(hd95)),
        lesions=n_truth,
        matched=len(pairs),
        false_positives=n_pred - len(pairs),
    )


def lesion_scores(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    rule: str = "2023",
    region: str = "WT",
    core: tuple[np.ndarray, np.ndarray] | None = None,
    distances: bool = True,
) -> LesionScores:
    """Lesion-wise scores of one region by ``rule`` (``RULES``): ``pred`` and ``truth`` are boolean masks (X, Y, Z)
    on one grid of voxel size ``spacing`` (mm). ``core``: the predicted and true non-enhancing core (TC without ET),
    through which the 2024 rule merges ET lesions (``region`` "ET" only). Without ``distances`` HD95 is NaN wherever a
    distance would be measured: the Dice and counts alone cost a fraction (the post-processing's choice scores every
    candidate volume so, and a test case's scores without post-processing)."""
    if rule not in RULES:
        raise ValueError(f"unknown lesion rule {rule!r}; known: {', '.join(RULES)}")
    if region not in REGIONS:
        raise ValueError(f"unknown region {region!r}; known: {', '.join(REGIONS)}")
    settings = RULES[rule]
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    merge_core = bool(settings.core_dilation and region == "ET" and core is not None)
    masks = [pred, truth, *(np.asarray(c, bool) for c in core)] if merge_core else [pred, truth]
    box = _box(masks, margin=max(settings.dilation, settings.core_dilation) + 2)
    if box is None:
        return LesionScores(1.0, 0.0, 0, 0, 0)
    pred, truth = pred[box], truth[box]
    if not settings.dilation:
        return _bipartite_scores(lesions(pred, 0)[0], lesions(truth, 0)[0], spacing, settings, distances)
    limit = settings.min_volume.get(region, 0.0)
    truth_lesions, _ = lesions(truth, settings.dilation)
    pred_lesions, _ = lesions(pred, settings.dilation if settings.merge_predicted else 0)
    if settings.merge_predicted:
        pred_lesions, _ = _drop_small(pred_lesions, limit)
    if merge_core:
        pred_core, truth_core = (np.asarray(c, bool)[box] for c in core)
        core_limit = settings.min_volume.get("TC", 0.0)
        pred_core = _drop_small(lesions(pred_core, settings.core_dilation)[0], core_limit)[0]
        truth_lesions, _ = _merge_through(truth_lesions, lesions(truth_core, settings.core_dilation)[0])
        pred_lesions, _ = _merge_through(pred_lesions, pred_core)
    return _overlap_scores(pred_lesions, truth_lesions, spacing, settings, limit, distances)


def core_of(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The predicted and true non-enhancing core (TC without ET) of one case's channels (3, X, Y, Z), which the 2024
    rule's ET lesions merge through (``lesion_scores``' ``core``)."""
    tc, et = REGIONS.index("TC"), REGIONS.index("ET")
    return pred[tc] & ~pred[et], truth[tc] & ~truth[et]


def case_lesion_scores(
    pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, float, float], rule: str, distances: bool = True
) -> list[LesionScores]:
    """Every region of one case (boolean channels (3, X, Y, Z) in ``REGIONS`` order), in that order."""
    core = core_of(pred, truth)
    return [
        lesion_scores(pred[i], truth[i], spacing, rule, region, core if region == "ET" else None, distances)
        for i, region in enumerate(REGIONS)
    ]
