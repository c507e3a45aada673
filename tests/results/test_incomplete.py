"""A run that aborted, failed or was stopped is never read as a result: its run record says so, and the tables refuse
it unless asked (the real aborted and completed runs are in tests/integration/test_jobs_sim.py and
test_report_sim.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from brats_fl.cli.main import main
from brats_fl.protocol import RUN_RECORD
from brats_fl.results.report import IncompleteRunError, find_server_run, refuse_incomplete
from brats_fl.server.records import NOT_ENDED, run_completion

REASON = "Result from site-2 is bad, error code: TASK_ABORTED"


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"finished": True, "complete": True, "incomplete_reason": None}, (True, None)),
        ({"finished": True, "complete": False, "incomplete_reason": REASON}, (False, REASON)),
        ({"finished": False, "complete": False, "incomplete_reason": NOT_ENDED}, (False, NOT_ENDED)),
        # records of an older brats-fl: only a run that never recorded its end is known to be incomplete
        ({"finished": True}, (True, None)),
        ({"finished": False}, (False, NOT_ENDED)),
        (None, (True, None)),
    ],
)
def test_run_completion_reads_the_record(record: dict | None, expected: tuple):
    assert run_completion(record) == expected


def test_incomplete_run_is_refused_unless_asked():
    summary = {"complete": False, "incomplete_reason": REASON}
    with pytest.raises(IncompleteRunError, match=rf"runs/x: the run did not complete \({REASON}\); .*--include-inc"):
        refuse_incomplete(Path("runs/x"), summary, include_incomplete=False)
    refuse_incomplete(Path("runs/x"), summary, include_incomplete=True)
    refuse_incomplete(Path("runs/x"), {"complete": True, "incomplete_reason": None}, include_incomplete=False)


def _aborted(tmp_path: Path) -> Path:
    """What an aborted run leaves on the server: its run record and no test scores."""
    run = tmp_path / "aborted" / "server" / "simulate_job"
    run.mkdir(parents=True)
    (run / RUN_RECORD).write_text(json.dumps({"finished": True, "complete": False, "incomplete_reason": REASON}))
    return tmp_path / "aborted"


def test_aborted_run_without_scores_names_why(tmp_path: Path):
    folder = _aborted(tmp_path)
    with pytest.raises(IncompleteRunError, match=rf"the run did not complete \({REASON}\); it left no test scores"):
        find_server_run(folder)
    (folder / "server" / "simulate_job" / RUN_RECORD).unlink()
    with pytest.raises(FileNotFoundError, match="no finished FLARE job"):
        find_server_run(folder)


@pytest.mark.parametrize("command", ["table", "report"])
def test_cli_refuses_an_aborted_run_naming_the_reason(tmp_path: Path, command: str, capsys):
    folder = _aborted(tmp_path)
    args = [command, str(folder), "--include-incomplete", *(["--out", str(tmp_path / "out")] if command == "report"
                                                           else [])]  # fmt: skip
    assert main(args) == 2
    assert f"{folder}: the run did not complete ({REASON})" in capsys.readouterr().err
    assert not (tmp_path / "out" / "index.html").exists()
