"""Connected-component post-processing: predicted components smaller than a volume chosen per region are removed.

The challenge's lesion-wise scores (``brats_fl.seg.lesions``) charge every false-positive component, and a model that
scores voxel-wise Dice 0.95 often leaves a few specks of whole tumour and, in a low-grade case, a little enhancing
tumour where there is none. BraTS's leading entries remove predicted components below a volume chosen on validation
data (e.g. Isensee et al., nnU-Net for BraTS 2020, which relabels a small enhancing tumour as necrotic core). Here a
26-connected component of a region's prediction smaller than that region's ``min_volume`` (mm³) is removed so that
the regions stay nested: a removed WT component leaves no tumour, a removed TC component stays oedema (WT), a removed
ET component stays necrotic core (TC and WT), as label 1 would.

With ``auto`` each region's volume is chosen on a validation split among ``CANDIDATES``: the one with the best mean of
voxel-wise Dice and lesion-wise Dice (the case's lesion rule) of that region; where several score best, 0 if it is
among them, else the one in their geometric middle (``_middle_of_best`` says why); 0 keeps every component. A split
with fewer than ``MIN_CASES`` cases annotating a region does not choose for it (``Choice.volumes``). The job
parameter ``min_volume`` (``brats_fl.settings.params.parse_min_volume``) says which: none, auto (the default), or given
volumes.

Pooling over sites (``pool``, ``settle``). A federation's sites hold few validation cases each (the demo 2, the full
benchmark 4), too few to choose on, and they may not share a case; but a ``Choice`` is only each candidate's summed
score and the number of cases per region, aggregate figures like the validation Dice every round reports. So in its
last training round each site adds its validation cases to a ``Choice`` from the predictions the round's validation
makes anyway (no extra inference) and sends it with its training result; the server sums them
(``brats_fl.server.postprocess``) and sends the sum with the task that asks for the final test scores. The pooled
choice is therefore made for the models the sites received in the last round, one aggregation (and any fine-tuning)
before the final ones: exact would need the final model's
validation predictions at every site before any site scores its test split, one more task round trip for every job,
and the candidates are far enough apart (factors of 2 to 2.5) that one last round hardly moves the choice of a
converged model. Each region then takes (``settle``): the site's own choice, on its own split with the model it
scores, where that split annotates the region in ``MIN_CASES`` cases or more, since the site's own annotators and
scanner are what its test cases share and the model is exactly the scored one; else the pooled choice where the sites
together have that many cases; else every component is kept. The record says which per region.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from brats_fl.data.labels import REGIONS
from brats_fl.protocol import POOLED_META
from brats_fl.seg.lesions import core_of, lesion_scores, rule_for

#: volumes tried on the validation split (mm³); 0 keeps every component. Up to 10 cm³: a trained model's false
#: whole-tumour components on the hard phantom reach 4 cm³ (docs/explanation/metrics.md), a glioma's rarely goes below
CANDIDATES: tuple[float, ...] = (0.0, 10.0, 25.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0)
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
        core = core_of(pred, truth)  # the 2024 rule merges ET lesions through it, as the test scores do
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
                    lesionwise = lesion_scores(
                        kept, truth[c], spacing, rule, region, core if region == "ET" else None, distances=False
                    ).dice
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
            chosen[region] = _middle_of_best(np.flatnonzero(scores == scores.max()))
        return chosen, notes

    def to_dict(self) -> dict:
        """What a site sends the server (``brats_fl.server.postprocess``): per region, each candidate's summed score
        and the number of cases; no case, no image."""
        return {
            "rule": self.rule,
            "candidates": list(CANDIDATES),
            "totals": {r: [float(v) for v in t] for r, t in self.totals.items()},
            "cases": dict(self.cases),
        }

    @classmethod
    def from_dict(cls, doc: dict) -> Choice:
        """The inverse of ``to_dict``; refuses sums over other candidates (a site of another brats-fl)."""
        if tuple(doc["candidates"]) != CANDIDATES:
            raise ValueError(f"a choice over candidates {doc['candidates']}, not this brats-fl's {list(CANDIDATES)}")
        totals = {r: np.asarray(doc["totals"][r], dtype=float) for r in REGIONS}
        return cls(rule=doc["rule"], totals=totals, cases={r: int(doc["cases"][r]) for r in REGIONS})


def _middle_of_best(best: np.ndarray) -> float:
    """The volume among the best-scoring candidates (indices, ascending): 0 where keeping every component is among
    them (nothing measured says removing helps); else the one nearest the geometric middle of the smallest and largest
    best, the smaller on a tie. Every best volume removes the same false components of the validation cases and keeps
    the same true lesions; the middle is the farthest, as a ratio, from both the largest false component and the
    smallest true lesion seen, and an unseen one of either costs the lesion-wise score alike (one lesion of Dice 0)."""
    low, high = CANDIDATES[best[0]], CANDIDATES[best[-1]]
    if low == 0.0:
        return 0.0
    middle = np.sqrt(low * high)
    return min((CANDIDATES[i] for i in best), key=lambda v: (abs(np.log(v / middle)), v))


def pool(choices: Iterable[Choice]) -> Choice:
    """Several sites' choices as one over all their validation cases: each candidate's sums and the case counts add
    up (the per-case mean the choice takes is then over the pooled cases, every case weighing alike)."""
    pooled = Choice()
    rules = set()
    for choice in choices:
        rules.add(choice.rule)
        for region in REGIONS:
            pooled.totals[region] = pooled.totals[region] + choice.totals[region]
            pooled.cases[region] += choice.cases[region]
    if len(rules) > 1:
        raise ValueError(f"choices scored by different lesion rules {sorted(rules)} cannot be pooled")
    pooled.rule = rules.pop() if rules else pooled.rule
    return pooled


def settle(own: Choice, pooled: Choice | None, site: str, pooled_over: str = "") -> dict:
    """Each region's volume for a site: its ``own`` choice where its split has ``MIN_CASES`` cases of the region,
    else the ``pooled`` one where the pool has, else 0 (every component kept). Returns the record a run keeps:
    ``volumes`` (mm³), ``chosen`` (per region, on what), ``pooled`` (the regions that took the pooled volume) and
    ``notes`` (the regions nothing could choose for)."""
    own_volumes, _ = own.volumes()
    pooled_volumes = pooled.volumes()[0] if pooled is not None else {}
    record: dict = {"volumes": {}, "chosen": {}, "pooled": [], "notes": {}}
    for region in REGIONS:
        if own.cases[region] >= MIN_CASES:
            record["volumes"][region] = own_volumes[region]
            record["chosen"][region] = f"on {site}'s validation split ({own.cases[region]} cases)"
        elif pooled is not None and pooled.cases[region] >= MIN_CASES:
            record["volumes"][region] = pooled_volumes[region]
            record["chosen"][region] = f"pooled over {pooled_over} ({pooled.cases[region]} cases)"
            record["pooled"].append(region)
        else:
            cases = pooled.cases[region] if pooled is not None else own.cases[region]
            where = f"{pooled_over} together" if pooled is not None else f"{site}'s validation split"
            record["volumes"][region] = 0.0
            record["chosen"][region] = "not chosen"
            record["notes"][region] = (
                f"{cases} validation case(s) of {where} annotate {region}, fewer than {MIN_CASES}: every component kept"
            )
    if not record["notes"]:
        del record["notes"]
    return record


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = np.count_nonzero(pred) + np.count_nonzero(truth)
    return 1.0 if total == 0 else 2.0 * np.count_nonzero(pred & truth) / total


def choose_min_volumes(trainer, loader, rule: str = "auto") -> tuple[dict[str, float], dict[str, str]]:
    """Each region's volume chosen on ``loader``'s cases (a validation split) for ``trainer``'s model
    (``brats_fl.seg.trainer.Trainer``), and the notes of ``Choice.volumes``."""
    choice = Choice(rule=rule)
    trainer.evaluate(loader, distances=False, choice=choice)
    return choice.volumes()


def received_pool(meta: dict | None) -> tuple[Choice | None, str]:
    """A site's view of the final task's ``POOLED_META``: the pooled choice (None if the task brought none) and
    whose validation splits it pools, in words."""
    doc = (meta or {}).get(POOLED_META)
    if not doc:
        return None, ""
    sites = doc["sites"]
    rounds = sorted({r for r in doc["rounds"].values() if r is not None})
    when = f", the model received in round {rounds[0]}" if len(rounds) == 1 else ""
    return Choice.from_dict(doc["choice"]), f"{', '.join(sites)}'s validation splits{when}"
