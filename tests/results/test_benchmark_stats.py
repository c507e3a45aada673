"""The benchmark's statistics on synthetic numbers: intervals, paired tests with Holm's correction, sample size."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from brats_fl.results.stats import (
    bootstrap_ci,
    case_means,
    cases_needed,
    compare,
    paired_differences,
    score_matrix,
    wilcoxon_p,
)


def test_score_matrix_is_seeds_by_cases_with_nan_for_unscored_cases():
    matrix = score_matrix([{"a": 0.5, "b": 0.7}, {"a": 0.6}], ["a", "b"])
    assert matrix.shape == (2, 2)
    assert matrix[0].tolist() == [0.5, 0.7]
    assert matrix[1, 0] == 0.6 and math.isnan(matrix[1, 1])


def test_bootstrap_interval_holds_the_mean_and_narrows_with_more_cases():
    rng = np.random.default_rng(1)
    small = rng.normal(0.8, 0.1, (3, 10))
    large = rng.normal(0.8, 0.1, (3, 400))
    ci_small, ci_large = bootstrap_ci(small), bootstrap_ci(large)
    assert ci_small.low < ci_small.estimate < ci_small.high
    assert ci_small.estimate == pytest.approx(small.mean())
    assert ci_large.high - ci_large.low < (ci_small.high - ci_small.low) / 3
    # 95 % of a normal mean is about +-1.96 SE; on independent cells the two-way bootstrap counts the cell noise
    # through both seeds and cases, so it is wider, by up to sqrt(2): conservative, never narrower
    width = 2 * 1.96 * 0.1 / math.sqrt(1200)
    assert width * 0.9 < ci_large.high - ci_large.low < width * 1.8


def test_bootstrap_counts_seed_to_seed_spread_not_only_cases():
    """Seeds that disagree (a shift per seed) must widen the interval: a bootstrap over cases alone would not."""
    cases = np.tile(np.linspace(0.6, 0.9, 40), (4, 1))
    shifted = cases + np.array([[-0.1], [0.1], [-0.1], [0.1]])
    wide, narrow = bootstrap_ci(shifted), bootstrap_ci(cases)
    assert wide.high - wide.low > 2 * (narrow.high - narrow.low)


def test_bootstrap_difference_pairs_cases():
    """b is a plus a constant: case pairing removes the large case-to-case spread from the difference's interval."""
    a = np.tile(np.linspace(0.2, 0.95, 30), (2, 1))
    ci = bootstrap_ci(a + 0.05, a)
    assert ci.estimate == pytest.approx(0.05)
    assert ci.low == pytest.approx(0.05) and ci.high == pytest.approx(0.05)


def test_bootstrap_of_nothing_is_nan_without_warning():
    unscored = np.full((2, 3), np.nan)  # e.g. the HD95 of an untrained model, which the benchmark does not compute
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for a, b in ((np.empty((1, 0)), None), (unscored, None), (np.ones((2, 3)), unscored)):
            ci = bootstrap_ci(a, b)
            assert math.isnan(ci.estimate) and math.isnan(ci.low) and math.isnan(ci.high)


def test_case_means_average_seeds_and_drop_unscored_cases():
    matrix = np.array([[0.2, np.nan], [0.4, np.nan]])
    assert case_means(matrix, ["a", "b"]) == {"a": pytest.approx(0.3)}


def test_paired_differences_use_common_cases_only():
    differences = paired_differences({"a": 0.5, "b": 0.9, "c": 0.1}, {"b": 0.7, "a": 0.5})
    assert differences.tolist() == pytest.approx([0.0, 0.2])


def test_wilcoxon_edge_cases():
    assert wilcoxon_p(np.zeros(5)) == 1.0
    assert math.isnan(wilcoxon_p(np.array([])))
    assert wilcoxon_p(np.full(12, 0.05) + np.linspace(0, 0.01, 12)) < 0.001


def _scores(offset: float, n: int = 30, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    base = np.linspace(0.5, 0.9, n)
    return {f"case{i}": float(v + offset + rng.normal(0, 0.01)) for i, v in enumerate(base)}


def test_compare_says_better_and_worse_only_where_holm_separates():
    per_case = {
        "brats_fedavg": _scores(0.0, seed=1),
        "brats_central": _scores(0.1, seed=2),
        "good": _scores(0.05, seed=3),
        "same": _scores(0.0, seed=4),
    }
    rows = {(c.algorithm, c.reference): c for c in compare(per_case, ["brats_fedavg", "brats_central"])}
    assert len(rows) == 5  # 3 against FedAvg, 2 more against central: FedAvg against it is central against FedAvg
    assert ("brats_fedavg", "brats_central") not in rows
    assert rows[("good", "brats_fedavg")].verdict == "better"
    assert rows[("good", "brats_central")].verdict == "worse"
    assert rows[("same", "brats_fedavg")].verdict == "not separated"
    for row in rows.values():
        assert row.p_holm >= row.p
        assert row.cases == 30


def test_holm_correction_can_take_a_raw_separation_away():
    """Five tests with raw p of 0.02: alone each would separate; Holm over the family (5 x 0.02) does not."""
    rng = np.random.default_rng(0)
    per_case = {"brats_fedavg": {f"c{i}": 0.5 for i in range(12)}}
    # 8 of 12 cases better, the 4 worse ones by less: exact Wilcoxon p = 0.021
    for k in range(5):
        gains = np.r_[np.full(8, 0.02), np.full(4, -0.01)] + rng.normal(0, 1e-4, 12)
        per_case[f"alg{k}"] = {f"c{i}": 0.5 + g for i, g in enumerate(gains)}
    rows = compare(per_case, ["brats_fedavg"])
    assert all(r.p < 0.05 for r in rows)
    assert all(r.verdict == "not separated" for r in rows)


def test_cases_needed_follows_the_paired_t_power_analysis():
    # effect size 0.02 / 0.05 = 0.4: 52 pairs for 80 % power at 0.05 two-sided (textbook tables: 51-52)
    assert cases_needed(0.05) in (51, 52)
    assert cases_needed(0.1) > 4 * cases_needed(0.05) - 10
    assert cases_needed(float("nan")) is None
    assert cases_needed(0.0) is None


def test_cases_needed_for_a_large_effect_is_a_handful():
    """SD 0.001 against a 0.02 difference (effect 20): statsmodels' power turns NaN there; 3 cases suffice."""
    from statsmodels.stats.power import TTestPower

    assert cases_needed(0.001) == cases_needed(1e-12) == 3
    assert TTestPower().power(5.0, 3, 0.05) >= 0.8 > TTestPower().power(5.0, 2, 0.05)
