"""What the server records, read without FLARE: a run's completion from its run record, and its privacy from its
ledger.

The server's components write them (``brats_fl.server.run_record``, ``brats_fl.server.privacy``); the run record and
the results read them back. Here apart from the components so that the results read a run without importing FLARE.
"""

from __future__ import annotations

import json
from pathlib import Path

from brats_fl.protocol import LEDGER_FILE

#: what a ledger says of a mechanism without a differential-privacy guarantee
NO_DP = "no differential-privacy guarantee"

#: why a run record written at the start of a run says the run is incomplete, until its end rewrites it
NOT_ENDED = "the run has not ended: it is still running, or its server stopped before it could record the end"


def run_completion(record: dict | None) -> tuple[bool, str | None]:
    """Whether a run completed, and if not why, from its run record. A run of an older brats-fl, whose record
    cannot tell an aborted run from a complete one (or which wrote none), counts as complete where it has results."""
    if record is None:
        return True, None
    if "complete" in record:
        return bool(record["complete"]), record.get("incomplete_reason")
    return (True, None) if record.get("finished") else (False, NOT_ENDED)


def read_ledger(run_dir: Path) -> list[dict]:
    """The rows of a server run folder's ledger (none for a run of an older brats-fl)."""
    path = Path(run_dir) / LEDGER_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def summarise(rows: list[dict]) -> dict:
    """A run's privacy in a few facts: the mechanisms seen, each site's last (epsilon, delta), the job's (the largest
    over sites; None without a DP mechanism), the budget, and a sentence for tables."""
    per_site: dict[str, dict] = {}
    mechanisms: list[str] = []
    for row in rows:
        per_site[row["site"]] = {"epsilon": row["epsilon"], "delta": row["delta"], "round": row["round"]}
        mechanisms += [e["mechanism"] for e in row["mechanisms"] if e["mechanism"] not in mechanisms]
    finite = [s for s in per_site.values() if s["epsilon"] is not None]
    if not rows:
        text, epsilon, delta = "not recorded", None, None
    elif len(finite) < len(per_site) or not finite:
        text, epsilon, delta = NO_DP, None, None
    else:
        epsilon, delta = max(s["epsilon"] for s in finite), max(s["delta"] for s in finite)
        text = f"epsilon {epsilon:.3g}, delta {delta:g} ({'+'.join(m for m in mechanisms if m in ('dp-sgd', 'svt'))})"
    budget = next((r["budget"] for r in rows), None)
    return {
        "guarantee": text,
        "epsilon": epsilon,
        "delta": delta,
        "mechanisms": mechanisms,
        "budget": budget,
        "per_site": dict(sorted(per_site.items())),
    }
