"""What a run was, written by the job itself into the server's results: ``brats_fl_run.json``.

A FLARE component on the server. At the end of the run it records the job's name, the server's and the
sites' configuration (the sites' ``config`` holds the seed and every training setting), the package
versions, the wall time, the git commit when the code runs from a git checkout of this project, and always
the version and code hash of the brats-fl that ran (:mod:`brats_fl.version`), so that a run in a POC or
provisioned deployment, where no checkout exists, is still traceable to its code. The file lands next to
the other results that ``nvflare job download`` fetches, so ``brats-fl report`` never has to guess what a
run was.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext

from brats_fl.protocol import RUN_RECORD
from brats_fl.server.records import NOT_ENDED, read_ledger, summarise
from brats_fl.version import mismatch, running

#: the distributions whose versions decide a result
PACKAGES = ("brats-fl", "torch", "monai", "nvflare", "numpy")


def package_versions() -> dict[str, str | None]:
    """Python's and each package's installed version (None where a package is not installed, e.g. at a site
    that runs the job's own copy of brats_fl)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(candidates: list[Path]) -> dict | None:
    """Commit and uncommitted-changes flag of the first candidate inside a git checkout of this project."""
    for folder in candidates:
        if not folder.is_dir():
            continue
        try:
            top = _git(folder, "rev-parse", "--show-toplevel")
            if not (Path(top) / "custom" / "brats_fl").is_dir():
                continue
            return {
                "commit": _git(folder, "rev-parse", "HEAD"),
                "dirty": bool(_git(folder, "status", "--porcelain", "--untracked-files=no")),
                "checkout": top,
            }
        except (OSError, subprocess.CalledProcessError):
            continue
    return None


def _git(folder: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, check=True, timeout=30)
    return out.stdout.strip()


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


class RunRecord(FLComponent):
    """Writes ``<server run dir>/brats_fl_run.json`` at the end of the run (and a first one at its start,
    so a run that dies still says what it was).

    ``complete`` is true only for a run that ended with no fatal error and no abort: FLARE ends an aborted run (a
    site failing, a controller's ``system_panic``, an admin's ``abort_job``) with the same END_RUN event as a run
    that completed, so the record watches the run's abort signal and its fatal errors, and gives their reasons."""

    def __init__(self, expects: dict[str, str]):
        super().__init__()
        #: the brats-fl the job was exported from; a server running other code refuses the job (brats_fl.version)
        self.expects = expects
        self._start = 0.0
        self._started_at = ""
        self._abort_signal = None
        self._failures: list[str] = []

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            self._abort_signal = fl_ctx.get_run_abort_signal()
            problem = mismatch(self.expects, where=f"the server ({fl_ctx.get_identity_name()})")
            if problem:
                self.log_error(fl_ctx, problem)
                self.system_panic(problem, fl_ctx)
            self._start = time.perf_counter()
            self._started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
            self._write(fl_ctx, finished=False)
        elif event_type == EventType.FATAL_SYSTEM_ERROR:
            self._failures.append(str(fl_ctx.get_prop(FLContextKey.EVENT_DATA, "") or "a fatal error"))
        elif event_type == EventType.END_RUN:
            path = self._write(fl_ctx, finished=True)
            self.log_info(fl_ctx, f"run record written to {path}")

    def _incomplete_reason(self, finished: bool) -> str | None:
        if not finished:
            return NOT_ENDED
        if self._failures:
            return "; ".join(dict.fromkeys(self._failures))
        if self._abort_signal is not None and self._abort_signal.triggered:
            return "the run was aborted (an admin's abort_job, or FLARE stopping it)"
        return None

    def _write(self, fl_ctx: FLContext, finished: bool) -> Path:
        workspace = fl_ctx.get_engine().get_workspace()
        job_id = fl_ctx.get_job_id()
        run_dir = Path(workspace.get_run_dir(job_id))
        config_dir = Path(workspace.get_app_config_dir(job_id))
        meta = _read_json(Path(workspace.get_job_meta_path(job_id))) or {}
        reason = self._incomplete_reason(finished)
        record = {
            "job": meta.get("name"),
            "job_id": job_id,
            "started_at": self._started_at,
            "finished": finished,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds") if finished else None,
            "wall_time": time.perf_counter() - self._start if finished else None,
            "complete": reason is None,
            "incomplete_reason": reason,
            "server_config": _read_json(config_dir / "config_fed_server.json"),
            "client_config": _read_json(config_dir / "config_fed_client.json"),
            "versions": package_versions(),
            "expects": self.expects,
            "git": git_state([Path(__file__).resolve().parent, Path(os.environ.get("PWD", ".")), Path.cwd()]),
            "code_sha256": running()["code_sha256"],
            "host": {"machine": platform.machine(), "system": platform.system(), "cpus": os.cpu_count()},
            # what each site's privacy mechanisms guarantee, from the ledger (brats_fl.server.privacy)
            "privacy": summarise(read_ledger(run_dir)),
        }
        path = run_dir / RUN_RECORD
        path.write_text(json.dumps(record, indent=1))
        return path
