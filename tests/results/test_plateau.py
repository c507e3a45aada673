"""The rule that sets the benchmark's budget (``brats_fl.results.stats.plateau``, run by ``benchmarks/plateau.py``): the
first epoch from which on the curve gains less than the tolerance over the last quarter of the budget, to the end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from brats_fl.results import stats
from conftest import benchmark_script


@pytest.fixture(scope="module")
def plateau():
    return benchmark_script("plateau")


def test_a_saturating_curve_plateaus_where_its_last_quarter_gains_less_than_the_tolerance():
    epochs = np.arange(10, 210, 10)
    curve = 0.85 * (1 - np.exp(-epochs / 25))
    budget = stats.plateau(epochs, curve, 0.005)
    gains = stats.quarter_gains(epochs, curve)
    assert gains[budget] < 0.005 <= gains[budget - 10]
    # the gain is read between validations: 0.75 * 130 = 97.5 lies between 90 and 100
    assert gains[130] == pytest.approx(curve[12] - np.interp(97.5, epochs, curve))


def test_a_pause_that_training_leaves_is_no_plateau():
    epochs = np.arange(10, 170, 10)
    curve = np.array([0.3, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.65, 0.7, 0.75, 0.8, 0.8, 0.8, 0.8, 0.8])
    assert stats.quarter_gains(epochs, curve)[80] < 0.005  # flat from 30 to 80 ...
    assert stats.plateau(epochs, curve, 0.005) == 160  # ... but only the end is a plateau
    assert stats.plateau(epochs, curve + np.linspace(0, 0.1, 16), 0.005) is None  # still rising


def test_smoothing_averages_three_validations_and_two_at_either_end():
    assert stats.smoothed(np.array([0.0, 0.3, 0.6, 0.3])).tolist() == pytest.approx([0.15, 0.3, 0.4, 0.45])


def test_the_central_run_takes_the_profile_jobs_settings(plateau):
    from brats_fl.results.benchmark import PROFILES

    args = plateau.train_central_args(PROFILES["full"], 1)
    options = dict(zip(args[::1], args[1:], strict=False))
    assert options["--spacing"] == "2.0" and options["--seed"] == "1"
    assert args[args.index("--patch") + 1 : args.index("--patch") + 4] == ["48", "48", "48"]
    assert args[args.index("--channels") + 1 :][:3] == ["16", "32", "64"]


def test_the_full_profile_trains_every_algorithm_to_the_measured_plateau():
    from brats_fl.results.benchmark import PROFILES

    record = json.loads(
        (Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "plateau" / "plateau.json").read_text()
    )
    mean = stats.smoothed(np.mean(list(record["curves"].values()), axis=0))
    assert stats.plateau(record["epochs"], mean) == record["budget_epochs"]  # the rule, on the recorded curves
    full = PROFILES["full"].params
    assert full["rounds"] * full["local_epochs"] == record["budget_epochs"]
