"""A run's privacy, as its server's ledger recorded it (``brats_fl.server.privacy``): for tables, reports and the
benchmark page."""

from __future__ import annotations

from pathlib import Path

from brats_fl.protocol import LEDGER_FILE
from brats_fl.results.report import find_server_run
from brats_fl.server.records import read_ledger, summarise


def ledger_summary(folder: Path) -> dict:
    """The privacy of the run in ``folder`` (a simulator workspace, a downloaded result or its server run folder;
    a run that a budget stopped too): ``guarantee`` (a sentence: "epsilon 7.99, delta 1e-05 (dp-sgd)", "no
    differential-privacy guarantee", or "not recorded" for a run of an older brats-fl), the job's ``epsilon`` and
    ``delta`` per site (the largest over sites; None without a DP mechanism), the ``mechanisms`` seen, the ``budget``,
    each site's last (epsilon, delta) in ``per_site``, and ``rows``, the ledger itself: per site and round, each
    mechanism's guarantee."""
    try:
        run = find_server_run(folder)
    except FileNotFoundError:
        found = sorted(Path(folder).resolve().rglob(LEDGER_FILE))
        if len(found) > 1:
            raise ValueError(f"{folder}: holds {len(found)} privacy ledgers; name one run") from None
        run = found[0].parent if found else Path(folder)
    rows = read_ledger(run)
    return summarise(rows) | {"rows": rows}
