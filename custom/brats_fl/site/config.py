"""Where a site's data lives: site configuration, never part of a job.

A FLARE job travels unchanged to every site, so it names no path. Each site answers "where is my data?"
from its own configuration, looked up in this order:

1. the file named by the environment variable ``BRATS_FL_SITE_CONFIG`` (set by ``brats-fl run`` and the
   tests, or by a hospital's IT in the site's start-up environment);
2. ``local/brats_fl_site.json`` in the site's FLARE workspace (the startup kit's site-local folder);
3. ``site_configs/simulation.json`` in the folder the simulator was started from (a clone of this
   repository), which points at the phantom cohort that ``brats-fl prepare`` writes.

A configuration file holds defaults and optional per-site overrides; relative paths are relative to the
file itself::

    {"data_root": "../data/phantom/cohort", "datalist_dir": "../data/phantom/datalists/equal",
     "threads": 1, "sites": {"site-2": {"threads": 2}}}

The site's datalist is ``<datalist_dir>/<name>.json`` where the name is the site's own name, unless the job
asks for another one (the centralized job trains on the pooled ``site-All``).

``state_dir`` is where a site keeps what outlives a job (default: ``brats_fl_state`` in its workspace; the
simulator wipes its workspaces, so simulated sites keep theirs under ``<state_dir>/<site>``).
``cache_dir`` (optional) is where the site keeps its decoded, brain-cropped and resampled cases on disk, so that
the next job on the same cohort skips that work (``brats_fl.data.loading``); it is the site's disk, not the job's
choice. A cached case is found again only for the same files (path, size, modification time), the same pipeline
settings (spacing, patch) and the same brats-fl code, so a changed pipeline or cohort never reads a stale cache.
``threads`` caps torch's CPU threads at the site. Simulated sites share one machine, so ``brats-fl run``
sets ``BRATS_FL_THREADS`` to the machine's cores divided by the number of sites, which takes precedence.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "BRATS_FL_SITE_CONFIG"
THREADS_VAR = "BRATS_FL_THREADS"
LOCAL_FILE = Path("local") / "brats_fl_site.json"
SIMULATION_FILE = Path("site_configs") / "simulation.json"
_KEYS = {"data_root", "datalist_dir", "datalist", "threads", "state_dir", "cache_dir", "sites"}


@dataclass(frozen=True)
class SiteData:
    """A site's resolved data location and resources."""

    site: str
    data_root: Path
    datalist: Path
    threads: int | None
    #: where the site keeps what outlives a job (its personal layers, for a restarted job)
    state_dir: Path
    source: Path
    #: where the site caches its preprocessed cases on disk; None: in memory only, for the job
    cache_dir: Path | None = None


def _candidates(workspace: Path) -> list[Path]:
    found = []
    if os.environ.get(ENV_VAR):
        found.append(Path(os.environ[ENV_VAR]))
    found.append(workspace / LOCAL_FILE)
    # the simulator runs sites inside its workspace; PWD still names the folder the user started it from
    for start in dict.fromkeys([Path(os.environ.get("PWD", ".")), Path.cwd()]):
        found.append(start / SIMULATION_FILE)
    return found


def find_config(workspace: Path | None = None) -> Path:
    """The first configuration file that exists, or an error listing every place that was searched."""
    candidates = _candidates(Path(workspace or Path.cwd()))
    if os.environ.get(ENV_VAR) and not candidates[0].is_file():
        raise FileNotFoundError(f"{candidates[0]}: site configuration named by ${ENV_VAR} does not exist")
    for path in candidates:
        if path.is_file():
            return path
    searched = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(f"no site data configuration found; searched {searched} (set ${ENV_VAR})")


def resolve(site: str, datalist_name: str | None = None, workspace: Path | None = None) -> SiteData:
    """Resolve ``site``'s data root and datalist; raises a clear error for a bad or incomplete file."""
    path = find_config(workspace)
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: site configuration is not valid JSON: {err}") from err
    unknown = sorted(set(doc) - _KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; known: {sorted(_KEYS)}")
    values = {k: v for k, v in doc.items() if k != "sites"} | doc.get("sites", {}).get(site, {})
    if "data_root" not in values:
        raise ValueError(f"{path}: no data_root for {site}")
    base = path.parent

    def rel(value: str) -> Path:
        return (base / value).resolve()

    if "datalist" in values:
        datalist = rel(values["datalist"])
    elif "datalist_dir" in values:
        datalist = rel(values["datalist_dir"]) / f"{datalist_name or site}.json"
        if not datalist.is_file():
            known = sorted(f.stem for f in datalist.parent.glob("*.json"))
            name = datalist_name or site
            raise FileNotFoundError(f"{path}: no datalist for {name} in {datalist.parent}; it holds {known}")
    else:
        raise ValueError(f"{path}: neither datalist nor datalist_dir for {site}")
    threads = int(os.environ.get(THREADS_VAR) or 0) or values.get("threads")
    workspace = Path(workspace or Path.cwd())
    state_dir = rel(values["state_dir"]) / site if "state_dir" in values else workspace / "brats_fl_state"
    data_root = rel(values["data_root"])
    cache_dir = rel(values["cache_dir"]) if "cache_dir" in values else None
    return SiteData(site, data_root, datalist, threads=threads, state_dir=state_dir, source=path, cache_dir=cache_dir)
