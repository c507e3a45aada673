"""The pure helpers of ``benchmarks/long_run.py``: which rounds the server's log starts, growth, a growing log."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import benchmark_script


@pytest.fixture(scope="module")
def long_run():
    return benchmark_script("long_run")


def _stamped(run: str) -> str:
    return f"2026-12-04 14:31:20,115 - DeadlineFedAvg - INFO - [identity=brats_poc, run={run}, wf=controller] - "


def test_a_round_banner_belongs_to_the_job_of_the_stamped_line_above_it(long_run):
    banner = ["-" * 80, "                                Round 7 started.                                ", "-" * 80]
    lines = [_stamped("job-a"), *banner, _stamped("job-b"), *[b.replace("7", "8") for b in banner], "", "Round 9 x"]
    watcher = long_run.RoundWatcher("job-a")
    assert watcher.feed(lines[:4]) == [7]
    assert watcher.feed(lines[4:]) == []
    assert long_run.RoundWatcher("job-b").feed(lines) == [8]


def test_growth_is_in_per_cent_from_the_first_round_to_the_second(long_run):
    assert long_run.growth({20: 500.0, 100: 510.0, 200: 520.0}, 20, 200) == pytest.approx(4.0)
    assert long_run.growth({20: 500.0, 200: 490.0}, 20, 200) == pytest.approx(-2.0)


def test_the_log_follower_returns_each_complete_line_once(long_run, tmp_path: Path):
    log = tmp_path / "console.log"
    follower = long_run.LogFollower(log)
    assert follower.lines() == []
    log.write_text("first\nsec")
    assert follower.lines() == ["first"]
    with log.open("a") as fh:
        fh.write("ond\nthird\n")
    assert follower.lines() == ["second", "third"]
    assert follower.lines() == []
