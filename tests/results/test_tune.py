"""``brats-fl tune`` without FLARE: the per-round values the pruner sees, which trials count, a study's settings,
stopping a process tree, and the results' tables (the simulator runs are in tests/integration/test_tune_sim.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import optuna
import psutil
import pytest
from brats_fl.results.benchmark import PROFILES
from brats_fl.results.tune import (
    Study,
    counted,
    index_table,
    open_study,
    over_budget,
    round_values,
    stop,
    study_table,
)
from optuna.trial import TrialState, create_trial


def test_round_values_pool_the_sites_once_every_site_reported_the_round():
    rows = {
        "site-1": [{"round": r, "val_dice_mean": v} for r, v in enumerate((0.0, 0.2, 0.5))],
        "site-2": [{"round": r, "val_dice_mean": v} for r, v in enumerate((0.0, 0.8))],
    }
    weights = {"site-1": 3, "site-2": 1}
    # round 0 scores the untrained model; round 2 waits for site-2; 2 local epochs per round
    assert round_values(rows, 2, weights, 2) == {2: pytest.approx((0.2 * 3 + 0.8) / 4)}
    assert round_values(rows, 3, weights, 2) == {}  # a site has not reported at all


def test_counted_trials_leave_out_abandoned_and_over_budget_ones():
    study = optuna.create_study()
    made = [
        create_trial(state=TrialState.COMPLETE, value=0.5),
        create_trial(state=TrialState.PRUNED),
        create_trial(state=TrialState.FAIL, user_attrs={"failed_run": {"seed": 0}}),
        create_trial(state=TrialState.FAIL),  # its worker died
        create_trial(state=TrialState.FAIL, user_attrs={"over_budget": True}),
        create_trial(state=TrialState.WAITING),
    ]
    for trial in made:
        study.add_trial(trial)
    assert [t.number for t in counted(study.get_trials())] == [0, 1, 2]
    # of two workers asking for the fourth trial at once (numbers 6 and 7), only the first runs
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.6))
    assert not over_budget(study.get_trials()[:6], 6, 4)
    assert over_budget(study.get_trials(), 7, 4)


def test_a_study_starts_with_the_untuned_values_and_refuses_other_settings(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = Study(PROFILES["ci"], "brats_fedprox", "iid", 3, tmp_path)
    first = open_study(study, url)
    waiting = first.get_trials(states=(TrialState.WAITING,))
    assert [t.system_attrs["fixed_params"] for t in waiting] == [{"lr": 3e-3, "local_epochs": 3, "mu": 0.01}]
    assert waiting[0].user_attrs == {"untuned": True}
    assert open_study(study, url).user_attrs == first.user_attrs  # a second worker joins it
    changed = replace(PROFILES["ci"], params={**PROFILES["ci"].params, "local_epochs": 1})
    with pytest.raises(ValueError, match="made with other settings"):
        open_study(replace(study, profile=changed), url)


def test_stop_kills_a_process_and_what_it_started_in_a_session_of_its_own():
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    top = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    grandchild = int(top.stdout.readline())
    start = time.monotonic()
    stopped = stop(top.pid)
    top.wait(timeout=10)
    assert set(stopped) == {top.pid, grandchild}
    gone = not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
    assert gone and time.monotonic() - start < 10


def _doc(**changes) -> dict:
    trials = [
        {"number": 0, "state": "complete", "untuned": True, "values": {"lr": 3e-3, "local_epochs": 3},
         "validation_dice": 0.61, "seeds": {"0": {"dice": 0.60}, "1": {"dice": 0.62}}, "pruned": None},
        {"number": 1, "state": "pruned", "untuned": False, "values": {"lr": 1e-4, "local_epochs": 1},
         "validation_dice": None, "seeds": {}, "pruned": {"seed": 0, "epochs": 2}},
        {"number": 2, "state": "complete", "untuned": False, "values": {"lr": 1.2e-3, "local_epochs": 2},
         "validation_dice": 0.70, "seeds": {"0": {"dice": 0.69}, "1": {"dice": 0.71}}, "pruned": None},
    ]  # fmt: skip
    space = [
        {"name": "lr", "low": 1e-4, "high": 3e-2, "log": True, "why": "Adam"},
        {"name": "local_epochs", "choices": [1, 2, 3], "why": "per round"},
    ]
    doc = {
        "algorithm": "brats_fedavg",
        "partition": "iid",
        "profile": {"name": "ci"},
        "seeds": 2,
        "budget_epochs": 6,
        "space": space,
        "counts": {"complete": 2, "pruned": 1, "fail": 0, "running": 0},
        "chosen": {"number": 2, "flags": "--lr 0.0012 --local-epochs 2 --rounds 3", "validation_dice": 0.70},
        "untuned": {"number": 0, "state": "complete", "validation_dice": 0.61},
        "trials": trials,
    }
    return doc | changes


def test_the_tables_show_the_space_the_choice_and_every_trial():
    md = study_table(_doc())
    assert "Chosen: trial 2, `--lr 0.0012 --local-epochs 2 --rounds 3`, validation Dice 0.7000" in md
    assert "the untuned defaults (trial 0): 0.6100" in md
    assert "| lr | 0.0001 to 0.03 (log) | Adam |" in md and "| local_epochs | 1, 2, 3 | per round |" in md
    assert "| 0 (untuned) | complete | 0.003 | 3 | 0.6 | 0.62 | 0.61 |" in md
    assert "| 1 | pruned (seed 0, epoch 2) | 0.0001 | 1 | - | - | - |" in md
    index = index_table([_doc(), _doc(algorithm="brats_fedprox", chosen=None)])
    assert "| iid | fedavg | 2/1/0 | `--lr 0.0012 --local-epochs 2 --rounds 3` | 0.7 | 0.61 |" in index
    assert "| iid | fedprox | 2/1/0 | - | - | 0.61 |" in index
