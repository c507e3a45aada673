"""Statistics of the benchmark page: confidence intervals over seeds and test cases, paired tests between
algorithms corrected for multiple comparisons, and the test cases a difference needs.

Every algorithm of a partition is scored on the same test cases in every seed, so its scores form a matrix
seeds x cases (crossed, not nested: case k is the same scan in every seed). Numbers in, numbers out: no torch,
no files.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower

#: resamples of the bootstrap: enough for stable 2.5 % and 97.5 % percentiles
RESAMPLES = 4000
LEVEL = 0.95
ALPHA = 0.05
MAX_EFFECT = 5.0


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval."""

    estimate: float
    low: float
    high: float


def score_matrix(per_seed: Sequence[Mapping[str, float]], cases: Sequence[str]) -> np.ndarray:
    """Seeds x cases of one score; a case a seed did not score (a region a case lacks) is NaN."""
    return np.array([[seed.get(c, np.nan) for c in cases] for seed in per_seed], dtype=float)


def bootstrap_ci(
    a: np.ndarray,
    b: np.ndarray | None = None,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> Interval:
    """Mean of ``a`` (seeds x cases), or the difference of means ``a - b`` paired by case, with a two-way
    percentile bootstrap CI.

    Both seeds (training randomness) and test cases (which scans were drawn) vary, and the cases are crossed with
    the seeds, so each resample draws seeds and cases independently with replacement and takes the mean of the
    chosen rows and columns (Field & Welsh 2007, the "two-way" bootstrap). For a difference the seeds of ``a`` and
    ``b`` are drawn independently (seed k of two algorithms is no pair) and the cases jointly (they are). scipy's
    ``bootstrap`` resamples one axis of independent observations only, hence these few lines. With a single seed
    only the cases vary."""
    rng = np.random.default_rng(seed)
    # nothing scored, e.g. the HD95 of the untrained model, which the benchmark does not compute
    if np.isnan(a).all() or (b is not None and np.isnan(b).all()):
        return Interval(math.nan, math.nan, math.nan)
    point = float(np.nanmean(a) - (np.nanmean(b) if b is not None else 0.0))
    cases = rng.integers(0, a.shape[1], (resamples, 1, a.shape[1]))
    means = _resampled_means(a, rng.integers(0, a.shape[0], (resamples, a.shape[0], 1)), cases)
    if b is not None:
        means = means - _resampled_means(b, rng.integers(0, b.shape[0], (resamples, b.shape[0], 1)), cases)
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(means, [tail, 100 - tail])
    return Interval(point, float(low), float(high))


def _resampled_means(matrix: np.ndarray, seeds: np.ndarray, cases: np.ndarray) -> np.ndarray:
    """The mean of every resample at once (resamples x seeds x cases by fancy indexing): a page rebuilt after each
    run bootstraps hundreds of intervals."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample of unscored cases only is NaN, and left out
        return np.nanmean(matrix[seeds, cases], axis=(1, 2))


def case_means(matrix: np.ndarray, cases: Sequence[str]) -> dict[str, float]:
    """Each case's score averaged over seeds: the unit of the paired tests (the seeds are not independent cases)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a case no seed scored is NaN, and left out
        values = np.nanmean(matrix, axis=0) if matrix.size else np.array([])
    return {c: float(v) for c, v in zip(cases, values, strict=True) if not np.isnan(v)}


def paired_differences(a: Mapping[str, float], b: Mapping[str, float]) -> np.ndarray:
    """a - b for every case both scored, in case order."""
    common = sorted(set(a) & set(b))
    return np.array([a[c] - b[c] for c in common], dtype=float)


def wilcoxon_p(differences: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p of paired differences; 1.0 where there is nothing to rank (every
    difference zero, which scipy refuses), NaN with no pair at all."""
    if differences.size == 0:
        return math.nan
    if not np.any(differences):
        return 1.0
    return float(stats.wilcoxon(differences, zero_method="wilcox", alternative="two-sided").pvalue)


@dataclass(frozen=True)
class Comparison:
    """One paired test: ``algorithm`` against ``reference`` on per-case Dice averaged over seeds."""

    algorithm: str
    reference: str
    cases: int
    mean_difference: float
    sd_difference: float
    p: float
    p_holm: float
    verdict: str


def compare(
    per_case: Mapping[str, Mapping[str, float]], references: Sequence[str], alpha: float = ALPHA
) -> list[Comparison]:
    """Every algorithm against every reference it is not, each pair once (Wilcoxon signed-rank, paired by case id),
    the p-values Holm-corrected together as one family, so that the chance of any false "better" or "worse" on the
    page stays at ``alpha``. The verdict says "better" or "worse" only where the corrected test rejects equality."""
    pairs: list[tuple[str, str]] = []
    for ref in (r for r in references if r in per_case):
        # one test per pair of algorithms: FedAvg against central is central against FedAvg, mirrored
        pairs += [(alg, ref) for alg in per_case if alg != ref and (ref, alg) not in pairs]
    diffs = [paired_differences(per_case[alg], per_case[ref]) for alg, ref in pairs]
    raw = [wilcoxon_p(d) for d in diffs]
    tested = [i for i, p in enumerate(raw) if not math.isnan(p)]
    corrected = [math.nan] * len(raw)
    if tested:
        _, holm, _, _ = multipletests([raw[i] for i in tested], alpha=alpha, method="holm")
        for i, p in zip(tested, holm, strict=True):
            corrected[i] = float(p)
    out = []
    for (alg, ref), d, p, q in zip(pairs, diffs, raw, corrected, strict=True):
        mean = float(d.mean()) if d.size else math.nan
        verdict = "not separated"
        if q < alpha:
            verdict = "better" if mean > 0 else "worse"
        sd = float(d.std(ddof=1)) if d.size > 1 else math.nan
        out.append(Comparison(alg, ref, int(d.size), mean, sd, p, q, verdict))
    return out


def cases_needed(sd_difference: float, delta: float = 0.02, alpha: float = ALPHA, power: float = 0.8) -> int | None:
    """Test cases a paired comparison needs to detect a mean Dice difference ``delta`` (two-sided, ``alpha``,
    ``power``) when per-case differences have SD ``sd_difference``: the paired t-test's power analysis (the
    Wilcoxon test needs about 5 % more at its asymptotic efficiency of 0.955). None without a usable SD."""
    if not sd_difference or math.isnan(sd_difference):
        return None
    # statsmodels' noncentral t turns NaN far beyond an effect of 5, where 3 cases suffice anyway (power 0.98 at 5)
    effect = min(delta / sd_difference, MAX_EFFECT)
    n = TTestPower().solve_power(effect_size=effect, alpha=alpha, power=power, alternative="two-sided")
    return math.ceil(float(n))


#: a curve that gains less than this (Dice) over the last quarter of its budget has reached its plateau (issue 38)
PLATEAU_TOLERANCE = 0.005


def smoothed(curve: Sequence[float]) -> np.ndarray:
    """A centred moving average over three points (two at either end): a validation split of a dozen cases moves by a
    few hundredths from one validation to the next, and one dip must not decide where a curve ends."""
    padded = np.pad(np.asarray(curve, dtype=float), 1, constant_values=np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a point missing in every seed stays NaN
        return np.nanmean(np.stack([padded[:-2], padded[1:-1], padded[2:]]), axis=0)


def quarter_gains(steps: Sequence[float], curve: Sequence[float]) -> dict[int, float]:
    """For every step B of the curve with 0.75 B inside it: curve(B) - curve(0.75 B), read between points by linear
    interpolation."""
    steps, curve = np.asarray(steps, dtype=float), np.asarray(curve, dtype=float)
    return {
        int(b): float(value - np.interp(0.75 * b, steps, curve))
        for b, value in zip(steps, curve, strict=True)
        if 0.75 * b >= steps[0]
    }


def plateau(steps: Sequence[float], curve: Sequence[float], tolerance: float = PLATEAU_TOLERANCE) -> int | None:
    """The budget of a learning curve: the first step from which on, to the end of the curve, every gain over the last
    quarter (:func:`quarter_gains`) is below ``tolerance``; None if the curve is still rising at its end. "To the
    end" keeps a pause that training later leaves from ending the curve early."""
    found = None
    for b, gain in quarter_gains(steps, curve).items():
        if gain >= tolerance:
            found = None
        elif found is None:
            found = b
    return found
