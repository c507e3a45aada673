"""Write the catalogue's jobs as FLARE job folders (``jobs/`` in the repository, or any folder)."""

from __future__ import annotations

import shutil
from pathlib import Path

from brats_fl.jobs.catalogue import JOBS, JobParams, build


def export_jobs(out: Path, names: list[str] | None = None, params: JobParams | None = None) -> list[Path]:
    """Export each job into ``out/<name>`` (replacing an older export of the same job)."""
    out = Path(out).resolve()
    written = []
    for name in names or list(JOBS):
        target = out / name
        if target.exists():
            shutil.rmtree(target)
        build(name, params).export(str(out))
        written.append(target)
    return written
