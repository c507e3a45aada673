"""The live view of a simulated job, fed hand-written rows as the sites write them (no FLARE)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from brats_fl.jobs.live import (
    LiveView,
    clock,
    error_lines,
    failure_report,
    header,
    read_rows,
    site_exceptions,
    site_line,
)

START = 1_000_000.0


def _row(rnd: int, dice: float, loss: float, at: float) -> dict:
    return {"round": rnd, "val_dice_mean": dice, "train_loss": loss, "finished_at": START + at}


def _write(run: Path, site: str, rows: list[dict], tail: str = "") -> None:
    folder = run / site / "simulate_job" / "brats_fl"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_read_rows_per_site_and_waits_for_a_line_being_written(tmp_path: Path):
    _write(tmp_path, "site-1", [_row(0, 0.2, 0.9, 30), _row(1, 0.4, 0.7, 60)], tail='{"round": 2, "val_d')
    _write(tmp_path, "site-2", [_row(0, 0.3, 0.8, 31)])
    (tmp_path / "server" / "simulate_job").mkdir(parents=True)
    rows = read_rows(tmp_path)
    assert sorted(rows) == ["site-1", "site-2"]
    assert [r["round"] for r in rows["site-1"]] == [0, 1]
    assert read_rows(tmp_path / "not yet") == {}


def test_lines_say_round_dice_loss_time_and_time_left():
    rows = {"site-1": [_row(0, 0.2, 0.9, 30), _row(1, 0.41234, 0.7, 60)], "site-2": [_row(0, 0.3, 0.8, 31)]}
    assert site_line("site-1", rows["site-1"], 5) == "site-1: round 2 of 5, val Dice 0.412, train loss 0.700"
    assert site_line("site-3", [], 5) == "site-3: waiting for its first round"
    assert site_line("site-4", [{"round": 0}], 5) == "site-4: round 1 of 5, val Dice -, train loss -"
    # two rounds in 60 s: three more take 90 s, 10 of which have gone since the last row
    assert (
        header("brats_fedavg", rows, 5, START, START + 70)
        == "brats_fedavg: round 3 of 5, 1:10 elapsed, about 1:20 left"
    )
    assert header("brats_fedavg", {}, 5, START, START + 5) == "brats_fedavg: round 1 of 5, 0:05 elapsed"
    done = {"site-1": [_row(0, 0.2, 0.9, 30), _row(1, 0.4, 0.7, 60)]}
    assert header("brats_swt", done, 2, START, START + 61) == "brats_swt: all 2 rounds trained, 1:01 elapsed"
    assert clock(3725) == "1:02:05"


def test_a_terminal_gets_the_whole_view_redrawn_in_place():
    out = _Terminal()
    view = LiveView("brats_fedavg", 3, ["site-1", "site-2"], out, started=START)
    view.refresh({}, START + 1)
    view.refresh({"site-2": [_row(0, 0.3, 0.8, 31)]}, START + 32)
    first, second = out.getvalue().split("\x1b[3F\x1b[J")
    assert first.splitlines() == [
        "brats_fedavg: round 1 of 3, 0:01 elapsed",
        "  site-1: waiting for its first round",
        "  site-2: waiting for its first round",
    ]
    assert second.splitlines() == [
        "brats_fedavg: round 2 of 3, 0:32 elapsed, about 1:01 left",
        "  site-1: waiting for its first round",
        "  site-2: round 1 of 3, val Dice 0.300, train loss 0.800",
    ]


def test_elsewhere_one_line_per_new_round_and_nothing_while_nothing_changes():
    out = io.StringIO()
    view = LiveView("brats_fedavg", 2, ["site-1", "site-2"], out, started=START)
    view.refresh({}, START + 1)
    rows = {"site-1": [_row(0, 0.2, 0.9, 30)]}
    view.refresh(rows, START + 31)
    view.refresh(rows, START + 32)
    rows["site-2"] = [_row(0, 0.3, 0.8, 33)]
    view.refresh(rows, START + 34)
    assert out.getvalue().splitlines() == [
        "[0:31] site-1: round 1 of 2, val Dice 0.200, train loss 0.900",
        "[0:31] brats_fedavg: round 2 of 2, 0:31 elapsed, about 0:29 left",
        "[0:34] site-2: round 1 of 2, val Dice 0.300, train loss 0.800",
    ]


def test_error_lines_are_the_last_distinct_ones(tmp_path: Path):
    log = tmp_path / "sim.log"
    lines = [
        "2025-11-28 09:48:01,123 - ClientRunner - INFO - [identity=site-1]: started",
        *(f"2025-11-28 09:48:0{i},000 - ClientRunner - ERROR - [identity=site-2]: bad data" for i in range(2, 5)),
        "2025-11-28 09:48:05,000 - ServerRunner - ERROR - [identity=server]: round 0 failed",
        "Traceback (most recent call last):",
    ]
    log.write_text("\n".join(lines))
    assert error_lines(log) == [
        "ClientRunner - ERROR - [identity=site-2]: bad data",
        "ServerRunner - ERROR - [identity=server]: round 0 failed",
    ]
    assert error_lines(log, limit=1) == ["ServerRunner - ERROR - [identity=server]: round 0 failed"]
    assert error_lines(tmp_path / "missing.log") == []


#: a site's FLARE error log as the simulator writes it (trimmed from a real run whose site-2 had a missing file)
_OWN = """2026-12-07 02:12:41,750 - TaskScriptRunner - ERROR - Traceback (most recent call last):
  File "/x/brats_fl/site/client.py", line 96, in __init__
    self.datalist = load_datalist(data.datalist, data.data_root, grid_required=self.config.spacing is None)
                    ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/x/brats_fl/data/checks.py", line 231, in require_valid
    raise DataError(problems)
brats_fl.data.checks.DataError: 1 data problem(s) found; nothing was trained:
/data/nowhere/BraTS20_Training_999_t1ce.nii.gz: missing t1ce file

2026-12-07 02:12:41,751 - TaskScriptRunner - ERROR - fire abort event
2026-12-07 02:12:41,754 - InProcessClientAPI - ERROR - 'client.py' is aborted, Traceback (most recent call last):
  File "/x/brats_fl/data/checks.py", line 231, in require_valid
    raise DataError(problems)
brats_fl.data.checks.DataError: 1 data problem(s) found; nothing was trained:
"""
#: what the other sites raise once the job is aborted
_ABORTED = """2026-12-07 02:12:43,073 - InProcessClientAPI - ERROR - ask to abort job: reason: 'train' is aborted
2026-12-07 02:12:46,245 - TaskScriptRunner - ERROR - Traceback (most recent call last):
  File "/x/nvflare/client/in_process/api.py", line 334, in __continue_job
    raise RuntimeError(f"request to abort the job for reason {self.abort_reason}")
RuntimeError: request to abort the job for reason 'train' is aborted, abort_signal_triggered
"""


def test_a_failed_site_s_own_exception_comes_before_flare_s_generic_errors(tmp_path: Path):
    run = tmp_path / "brats_fedavg"
    for site, text in {"site-1": _ABORTED, "site-2": _OWN, "site-3": _ABORTED, "server": _OWN}.items():
        (run / site).mkdir(parents=True)
        (run / site / "error_log.txt").write_text(text)
    log = tmp_path / "sim.log"
    log.write_text(
        "2026-12-07 02:12:42,000 - ERROR - shareable data is not a valid DXO\n"
        "2026-12-07 02:12:42,001 - ERROR - Result from site-2 is bad. Cannot reach min_responses\n"
    )
    own = ["brats_fl.data.checks.DataError: 1 data problem(s) found; nothing was trained:",
           "/data/nowhere/BraTS20_Training_999_t1ce.nii.gz: missing t1ce file"]  # fmt: skip
    assert site_exceptions(run) == [("site-2", run / "site-2" / "error_log.txt", own)]
    assert failure_report("brats_fedavg", run, log) == [
        f"brats_fedavg failed at site-2 ({run / 'site-2' / 'error_log.txt'}):",
        *(f"  {line}" for line in own),
        "then the last errors in FLARE's log:",
        "  ERROR - shareable data is not a valid DXO",
        "  ERROR - Result from site-2 is bad. Cannot reach min_responses",
        f"FLARE's log: {log}",
    ]
    # a long exception is cut, saying where the rest is
    (run / "site-2" / "error_log.txt").write_text(_OWN.replace("missing t1ce file", "missing\n" * 30))
    ((_, _, text),) = site_exceptions(run, limit=5)
    assert len(text) == 6 and text[-1] == f"... 26 more line(s) in {run / 'site-2' / 'error_log.txt'}"
