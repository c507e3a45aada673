"""Which brats-fl a job expects, and whether the code running it is that one.

Every exported job records the version and a SHA-256 of the package's code it was exported from; the server and
every site compare it with their own before any training (``brats_fl.site.executor``,
``brats_fl.server.run_record``). Imports neither torch nor FLARE.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from brats_fl import __version__

PACKAGE_DIR = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=1)
def code_sha256(folder: Path = PACKAGE_DIR) -> str:
    """One SHA-256 over the relative path and bytes of every Python file of the package (caches left out)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*.py") if "__pycache__" not in p.parts):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return "sha256:" + digest.hexdigest()


def running() -> dict[str, str]:
    """The brats-fl this process runs: version and code hash."""
    return {"version": __version__, "code_sha256": code_sha256()}


def mismatch(expects: dict[str, str], where: str) -> str | None:
    """Why the code running at ``where`` is not the one the job was exported from, or None if it is."""
    here = running()
    if expects == here:
        return None
    want, have = expects.get("version"), here["version"]
    if want != have:
        fix = f"pip install brats-fl=={want} at {where}, or export the job again with brats-fl {have}"
    else:
        fix = (
            f"install the same brats-fl code at {where} as where the job was exported (pip install brats-fl=={want} "
            "from the same source), or export the job again with `brats-fl export-jobs` from the code installed there"
        )
    return (
        f"{where} runs brats-fl {have} (code {here['code_sha256'][7:19]}) but the job was exported from brats-fl "
        f"{want} (code {str(expects.get('code_sha256'))[7:19]}); refusing the job before any training. Fix: {fix}"
    )
