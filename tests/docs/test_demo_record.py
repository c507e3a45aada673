"""The README's demo table is the one the current demo settings printed: a run's record, not a hand-copied table."""

from __future__ import annotations

import json
from pathlib import Path

from brats_fl.cli.demo import DEMO_RECORD, DEMO_SETTINGS, demo_table

REPO = Path(__file__).resolve().parents[2]


def _readme_block() -> str:
    text = (REPO / "README.md").read_text()
    return text.split("<!-- demo-table -->\n", 1)[1].split("<!-- /demo-table -->", 1)[0]


def test_the_recorded_demo_ran_the_current_settings():
    record = json.loads((REPO / DEMO_RECORD).read_text())
    assert record["settings"] == DEMO_SETTINGS, "the demo's settings changed: run `brats-fl demo` and commit its record"


def test_the_readme_shows_the_recorded_demo():
    record = json.loads((REPO / DEMO_RECORD).read_text())
    assert _readme_block() == demo_table(record), "the README's demo table is not the recorded run's"


def test_the_recorded_demo_meets_what_the_demo_promises():
    """Three sites, pooled Dice of at least 0.90, within five minutes on the machine it ran on."""
    record = json.loads((REPO / DEMO_RECORD).read_text())
    assert sorted(record["table"]) == ["pooled", "site-1", "site-2", "site-3"]
    assert record["table"]["pooled"]["dice_mean"] >= 0.90
    assert record["wall_time"] <= 300
