"""A live, concise view of a simulated job while FLARE's own log goes to a file.

Read from the row each site appends to ``rounds.jsonl`` after every round (``brats_fl.site.client``), so it needs
nothing from FLARE: ``brats_fl.jobs.simulate`` polls the rows and hands them to :class:`LiveView`.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from brats_fl.protocol import ROUNDS_FILE, SITE_FOLDER

#: where a simulated site keeps its rows: ``<run>/<site>/<job id>/brats_fl/rounds.jsonl``
ROUNDS_GLOB = f"*/*/{SITE_FOLDER}/{ROUNDS_FILE}"
_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:[,.]\d+)?\s*(?:-\s*)?")
_ERROR = re.compile(r"\bERROR\b")

Rows = dict[str, list[dict]]


def read_rows(run_dir: Path) -> Rows:
    """Each site's rows so far; a line a site is still writing waits for the next poll."""
    rows: Rows = {}
    for path in run_dir.glob(ROUNDS_GLOB):
        kept = []
        for line in path.read_text().splitlines():
            try:
                kept.append(json.loads(line))
            except json.JSONDecodeError:
                break
        rows[path.parents[2].name] = kept
    return rows


def clock(seconds: float) -> str:
    """``1:02:03`` or ``2:03``: short enough for a status line."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _figure(row: dict, key: str) -> str:
    value = row.get(key)
    return "-" if value is None else f"{value:.3f}"


def site_line(site: str, rows: list[dict], total: int) -> str:
    """A site's progress and its last round's validation Dice (received model) and training loss."""
    if not rows:
        return f"{site}: waiting for its first round"
    last = rows[-1]
    return (
        f"{site}: round {last['round'] + 1} of {total}, val Dice {_figure(last, 'val_dice_mean')}, "
        f"train loss {_figure(last, 'train_loss')}"
    )


def _rounds(rows: Rows) -> set[int]:
    return {r["round"] for site_rows in rows.values() for r in site_rows}


def header(job: str, rows: Rows, total: int, started: float, now: float) -> str:
    """The latest round a site is in, time so far and an estimate of time left from the mean round so far."""
    rounds = _rounds(rows)
    done = max(rounds) + 1 if rounds else 0
    where = f"all {total} rounds trained" if done >= total else f"round {done + 1} of {total}"
    text = f"{job}: {where}, {clock(now - started)} elapsed"
    if rounds and done < total:
        last = max(r.get("finished_at", now) for site_rows in rows.values() for r in site_rows)
        per_round = (last - started) / len(rounds)
        text += f", about {clock(max(0.0, per_round * (total - done) - (now - last)))} left"
    return text


class LiveView:
    """Redraws the status in place on a terminal; elsewhere (a log file, CI) prints one line per new round."""

    def __init__(self, job: str, total: int, sites: Sequence[str], stream: TextIO, started: float | None = None):
        self.job, self.total, self.sites, self.stream = job, total, list(sites), stream
        self.started = time.time() if started is None else started
        self.tty = stream.isatty()
        self.drawn = 0
        self.seen: dict[str, int] = {}
        self.rounds_seen = 0

    def refresh(self, rows: Rows, now: float | None = None) -> None:
        now = time.time() if now is None else now
        names = self.sites + sorted(set(rows) - set(self.sites))
        top = header(self.job, rows, self.total, self.started, now)
        if self.tty:
            lines = [top, *(f"  {site_line(s, rows.get(s, []), self.total)}" for s in names)]
            # up to the first line drawn last time, clear to the end of the screen, draw again
            self.stream.write((f"\x1b[{self.drawn}F\x1b[J" if self.drawn else "") + "\n".join(lines) + "\n")
            self.drawn = len(lines)
        else:
            for site in names:
                count = len(rows.get(site, []))
                if count > self.seen.get(site, 0):
                    self.stream.write(f"[{clock(now - self.started)}] {site_line(site, rows[site], self.total)}\n")
                    self.seen[site] = count
            if len(_rounds(rows)) > self.rounds_seen:
                self.stream.write(f"[{clock(now - self.started)}] {top}\n")
                self.rounds_seen = len(_rounds(rows))
        self.stream.flush()


def error_lines(log: Path, limit: int = 20) -> list[str]:
    """The log's last ``limit`` distinct ERROR lines, timestamps dropped so that repeats collapse; FLARE's lines
    name the site (``identity=site-2``) that failed."""
    if not log.is_file():
        return []
    distinct: dict[str, None] = {}
    for line in log.read_text(errors="replace").splitlines():
        if _ERROR.search(line):
            text = _TIMESTAMP.sub("", line).strip()
            distinct.pop(text, None)
            distinct[text] = None
    return list(distinct)[-limit:]


#: FLARE's per-participant log of errors in a simulated run: ``<run>/<site>/error_log.txt``
SITE_ERROR_LOG = "error_log.txt"
_TRACEBACK = "Traceback (most recent call last):"
#: how FLARE's client API words what a site's script raises once the job is aborted elsewhere: a consequence
_ABORTED = "request to abort the job"


def _exception(record: list[str]) -> list[str]:
    """The exception a traceback record ends with: its lines after the last indented (frame) line."""
    frames = [i for i, line in enumerate(record) if line.startswith((" ", "\t"))]
    return [line for line in record[frames[-1] + 1 if frames else 1 :] if line.strip()]


def site_exceptions(run_dir: Path, limit: int = 12) -> list[tuple[str, Path, list[str]]]:
    """Each site's own exception in a simulated run, the site that failed first first: (site, its error log, the
    exception's lines, at most ``limit``). A site's first traceback is its own; one raised only because the job was
    aborted elsewhere is left out, so what remains is the cause, which FLARE's own log reports only as a bad result
    (``not a valid DXO``, ``Cannot reach min_responses``)."""
    found: list[tuple[str, str, Path, list[str]]] = []
    for log in sorted(run_dir.glob(f"*/{SITE_ERROR_LOG}")):
        site = log.parent.name
        if site == "server":
            continue
        records: list[list[str]] = []
        for line in log.read_text(errors="replace").splitlines():
            if _TIMESTAMP.match(line):
                records.append([line])
            elif records:
                records[-1].append(line)
        for record in records:
            if _TRACEBACK not in record[0]:
                continue
            text = _exception(record)
            if text and not any(_ABORTED in line for line in text):
                if len(text) > limit:
                    text = [*text[:limit], f"... {len(text) - limit} more line(s) in {log}"]
                found.append((_TIMESTAMP.match(record[0]).group(0), site, log, text))
            break
    return [(site, log, text) for _, site, log, text in sorted(found, key=lambda f: f[0])]


def failure_report(job: str, run_dir: Path, log: Path) -> list[str]:
    """What ``brats-fl run`` prints when a simulated job fails: each failed site's own exception first, then the last
    errors in FLARE's log, then where that log is."""
    lines = []
    for site, site_log, text in site_exceptions(run_dir):
        lines += [f"{job} failed at {site} ({site_log}):", *(f"  {line}" for line in text)]
    errors = error_lines(log)
    if errors:
        lines += [f"{'then ' if lines else ''}the last errors in FLARE's log:", *(f"  {e}" for e in errors)]
    return [*lines, f"FLARE's log: {log}"]
