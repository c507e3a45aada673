"""Write the catalogue's jobs as FLARE job folders (``jobs/`` in the repository, or any folder).

By default a job is configuration only: it names the classes of the brats-fl installed at the server and every
site (``brats_fl.site.executor`` says why). ``bundle=True`` writes jobs that carry the package in their
``app/custom/`` folder, for a federation that wants the code to travel with the job (FLARE's "bring your own
code", which the submitter needs the ``byoc`` right for). Where brats-fl is also installed, the installed package
wins (FLARE puts ``app/custom`` after it on ``sys.path``) and the version check refuses it if it differs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from brats_fl.jobs.catalogue import PACKAGE, JobParams, build
from brats_fl.jobs.registry import JOBS
from brats_fl.version import PACKAGE_DIR

#: the repository's own job folders, which hold configuration only
REPOSITORY_JOBS = PACKAGE_DIR.parents[1] / "jobs"


def export_jobs(
    out: Path, names: list[str] | None = None, params: JobParams | None = None, bundle: bool = False
) -> list[Path]:
    """Export each job into ``out/<name>`` (replacing an older export of the same job); ``bundle`` copies the
    package's Python files into each job's ``app/custom/``."""
    out = Path(out).resolve()
    if bundle and out.is_relative_to(REPOSITORY_JOBS.resolve()):
        raise ValueError(f"{out}: bundled jobs carry a copy of the package; write them outside {REPOSITORY_JOBS}")
    written = []
    for name in names or list(JOBS):
        target = out / name
        if target.exists():
            shutil.rmtree(target)
        build(name, params).export(str(out))
        if bundle:
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
            shutil.copytree(PACKAGE_DIR, target / "app" / "custom" / PACKAGE, ignore=ignore)
        written.append(target)
    return written
