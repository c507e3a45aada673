"""A run's cost beyond training, from the times its sites record (``brats_fl.results.cost``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from brats_fl.results.cost import run_cost, union_length


def _site(run: Path, name: str, rounds: list[dict], ready: float | None, ended: float | None, **record) -> None:
    folder = run / name / "simulate_job" / "brats_fl"
    folder.mkdir(parents=True)
    (folder / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    (folder / "site.json").write_text(json.dumps(record | ({"ready_at": ready} if ready is not None else {})))
    (folder / "done.json").write_text(json.dumps({"ended_at": ended} if ended is not None else {}))


def test_union_counts_overlapping_training_once():
    assert union_length([(0, 4), (1, 3), (2, 6), (10, 11)]) == 7
    assert union_length([]) == 0


def test_sites_training_at_once_count_once_and_the_rest_is_fixed(tmp_path: Path):
    # launched at 100; sites ready at 110 and 112; two rounds, trained 113-123 and 125-135 (site-2 a second less)
    for name, ready, lag in (("site-1", 110.0, 0.0), ("site-2", 112.0, 1.0)):
        rounds = [
            {"round": 0, "train_started_at": 113.0, "train_time": 10.0 - lag, "finished_at": 123.5},
            {"round": 1, "train_started_at": 125.0, "train_time": 10.0 - lag, "finished_at": 135.5},
        ]
        _site(tmp_path, name, rounds, ready, 150.0 - lag)
    cost = run_cost(tmp_path, launched=100.0, ended=155.0)
    assert cost == pytest.approx(
        {
            "wall": 55.0,
            "training": 20.0,
            "start_up": 12.0,
            "first_round": 1.0,
            "rounds_overhead": 2.0,
            "final_scoring": 15.0,
            "shut_down": 5.0,
            "fixed": 35.0,
        }
    )


def test_sites_in_turn_ditto_and_fine_tuning_count_as_training(tmp_path: Path):
    _site(tmp_path, "site-1", [{"train_started_at": 10.0, "train_time": 5.0, "finished_at": 15.0}], 9.0, 40.0)
    ditto = {"train_started_at": 16.0, "train_time": 3.0}
    rounds = [{"train_started_at": 20.0, "train_time": 5.0, "finished_at": 25.0, "ditto": ditto}]
    finetune = {"train_started_at": 30.0, "train_time": 4.0}
    _site(tmp_path, "site-2", rounds, 9.0, 41.0, finetune_training=finetune)
    cost = run_cost(tmp_path, launched=0.0, ended=42.0)
    assert cost["training"] == pytest.approx(17.0)
    assert cost["fixed"] == pytest.approx(25.0)


def test_an_older_run_gives_its_training_and_fixed_cost_alone(tmp_path: Path):
    _site(tmp_path, "site-1", [{"train_time": 5.0, "finished_at": 15.0}], None, None)
    assert run_cost(tmp_path, launched=0.0, ended=20.0) == {"wall": 20.0, "training": 5.0, "fixed": 15.0}
    assert run_cost(tmp_path / "nothing", launched=0.0, ended=1.0) is None
