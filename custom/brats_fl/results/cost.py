"""What a run costs beyond its training: start-up, the rounds' overhead, final scoring and shut-down.

Read from the times every site records (``brats_fl.site.client``: ``site.json``'s ``ready_at`` and fine-tuning's
interval, each round's ``train_started_at`` and ``train_time`` in ``rounds.jsonl`` (and Ditto's personal model's),
and ``done.json``'s ``ended_at``) and from the run's launch and end, which the caller measures (``brats-fl run``, a
benchmark run). Training is the time during which at least one site was in its training steps (the union of every
site's training intervals), so that sites training at once count once and sites training in turn (cyclic) count
each; everything else of the wall time is the run's fixed cost, which ``docs/performance.md`` tabulates per job
family (``benchmarks/run_cost.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

from brats_fl.protocol import DONE_FILE, ROUNDS_FILE, SITE_FOLDER, SITE_RECORD

#: where a simulated site keeps its records: ``<run>/<site>/<job id>/brats_fl/``
SITE_GLOB = f"*/*/{SITE_FOLDER}"
#: the phases of a run, in order, as ``run_cost`` names them
PHASES = ("start_up", "first_round", "rounds_overhead", "final_scoring", "shut_down")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _rows(folder: Path) -> list[dict]:
    path = folder / ROUNDS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by at least one of ``intervals`` (start, end)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _training(row: dict) -> tuple[float, float]:
    """A round's training interval; from its end (``finished_at``, just after training) where the start is not
    recorded (a run of an older brats-fl)."""
    start = row["train_started_at"] if "train_started_at" in row else row["finished_at"] - row["train_time"]
    return start, start + row["train_time"]


def run_cost(run_dir: Path, launched: float, ended: float) -> dict[str, float] | None:
    """The run's wall time split into training and the phases of ``PHASES`` (seconds; None where no site recorded a
    round):

    - ``start_up``: from the launch until every site is ready (FLARE's processes, imports, data checks and caches);
    - ``first_round``: from then until the first training step (round 0's validation, the first model's transfer);
    - ``rounds_overhead``: between the first and the last training step, what is not training (validation, transfer,
      aggregation, waiting);
    - ``final_scoring``: from the last training step until the last site is done (personalisation, test scoring,
      cross-site evaluation);
    - ``shut_down``: from then until ``ended`` (FLARE's shut-down, the run's summary).

    ``fixed`` is their sum, the wall time less training. A run whose sites recorded their training but not their
    phases gets ``wall``, ``training`` and ``fixed`` alone."""
    folders = [p for p in Path(run_dir).glob(SITE_GLOB) if p.is_dir()]
    rows = [row for folder in folders for row in _rows(folder)]
    # Ditto's personal model trains in each round too, before the global one, and fine-tuning after the last
    records = {f: _read_json(f / SITE_RECORD) for f in folders}
    trained = [*rows, *(r["ditto"] for r in rows if "train_started_at" in r.get("ditto", {}))]
    trained += [r["finetune_training"] for r in records.values() if "finetune_training" in r]
    intervals = [_training(r) for r in trained if "train_time" in r]
    if not intervals:
        return None
    first, last = min(s for s, _ in intervals), max(e for _, e in intervals)
    training = union_length(intervals)
    ready = [r.get("ready_at") for r in records.values()]
    done = [_read_json(f / DONE_FILE).get("ended_at") for f in folders]
    if None in ready or None in done:
        # a run of a brats-fl that recorded no phases: its training still tells the fixed cost in all
        return {"wall": ended - launched, "training": training, "fixed": ended - launched - training}
    # a site may train round 0 before the last site is ready: its start-up then ends at the first step
    ready_all = min(max(ready), first)
    phases = {
        "start_up": ready_all - launched,
        "first_round": first - ready_all,
        "rounds_overhead": (last - first) - training,
        "final_scoring": max(done) - last,
        "shut_down": ended - max(done),
    }
    return {"wall": ended - launched, "training": training, **phases, "fixed": sum(phases.values())}
