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

import os
from dataclasses import dataclass
from pathlib import Path

from brats_fl.data.jsonfile import kind, read_json, shown

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


class SiteConfigError(ValueError):
    """A site configuration file that cannot be used; the message names the file and what is wrong."""


def _values(path: Path, doc: object, site: str) -> dict:
    """The settings of ``site`` (defaults, then its own), each of the right type; raises SiteConfigError."""
    if not isinstance(doc, dict):
        raise SiteConfigError(f"{path}: expected an object of settings, got {kind(doc)}")
    unknown = sorted(set(doc) - _KEYS)
    if unknown:
        raise SiteConfigError(f"{path}: unknown key(s) {unknown}; known: {sorted(_KEYS)}")
    sites = doc.get("sites", {})
    if not isinstance(sites, dict) or not all(isinstance(v, dict) for v in sites.values()):
        raise SiteConfigError(f"{path}: sites must be an object of per-site objects, got {shown(sites)}")
    own = sites.get(site, {})
    unknown = sorted(set(own) - (_KEYS - {"sites"}))
    if unknown:
        raise SiteConfigError(f"{path}: unknown key(s) {unknown} for {site}; known: {sorted(_KEYS - {'sites'})}")
    values = {k: v for k, v in doc.items() if k != "sites"} | own
    for key, value in values.items():
        if key == "threads":
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise SiteConfigError(f"{path}: threads must be a whole number >= 1, got {shown(value)}")
        elif not isinstance(value, str) or not value or "\0" in value:
            raise SiteConfigError(f"{path}: {key} must be a path (a non-empty string), got {shown(value)}")
    return values


def _threads(values: dict) -> int | None:
    """``BRATS_FL_THREADS`` where set, else the configuration's ``threads``."""
    text = os.environ.get(THREADS_VAR)
    if not text:
        return values.get("threads")
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"${THREADS_VAR}={text!r} is not a whole number >= 1")
    return int(text)


def _plain_name(name: object) -> bool:
    return isinstance(name, str) and Path(name).name == name and name not in ("", "..") and "\0" not in name


def _holds(folder: Path, limit: int = 8) -> str:
    """What ``folder`` holds, for a refusal: its first entries by name, or, where it does not exist, what its nearest
    existing parent holds, so that a mistyped path shows what is there instead."""
    shown_folder = folder
    while not shown_folder.is_dir() and shown_folder != shown_folder.parent:
        shown_folder = shown_folder.parent
    try:
        names = sorted(p.name for p in shown_folder.iterdir()) if shown_folder.is_dir() else []
    except OSError as err:
        return f"{shown_folder} cannot be listed ({err.strerror})"
    listed = names[:limit] + ([f"... {len(names) - limit} more"] if len(names) > limit else [])
    where = "it" if shown_folder == folder else f"{shown_folder}, the nearest folder that exists,"
    return f"{where} holds {listed}"


def resolve(
    site: str, datalist_name: str | None = None, workspace: Path | None = None, config: Path | None = None
) -> SiteData:
    """Resolve ``site``'s data root and datalist from ``config`` (default: the file the site finds, ``find_config``);
    raises SiteConfigError naming the file for a bad or incomplete one, FileNotFoundError naming the site, the path
    and what is there for a data root, datalist folder or datalist that is missing, and for an empty data root."""
    path = Path(config) if config is not None else find_config(workspace)
    if datalist_name is not None and not _plain_name(datalist_name):
        # the name comes from the job, which travels to every site: it names a datalist, never a path elsewhere
        raise ValueError(f"the job's datalist {shown(datalist_name)} is not a plain datalist name (such as site-All)")
    try:
        doc = read_json(path)
    except ValueError as err:
        raise SiteConfigError(f"{path}: site configuration {err}") from err
    values = _values(path, doc, site)
    if "data_root" not in values:
        raise SiteConfigError(f"{path}: no data_root for {site}")
    base = path.parent

    def rel(key: str) -> Path:
        try:
            found = (base / values[key]).resolve()
            found.exists()  # a name too long for the file system fails here
        except (OSError, RuntimeError) as err:  # RuntimeError: a loop of symbolic links (Python 3.11)
            raise SiteConfigError(f"{path}: {key} {shown(values[key])} cannot be resolved: {err}") from err
        return found

    data_root = rel("data_root")
    if not data_root.is_dir():
        raise FileNotFoundError(f"{path}: data_root {data_root} of {site} is not a folder; {_holds(data_root)}")
    try:
        empty = not any(data_root.iterdir())
    except OSError as err:
        raise FileNotFoundError(f"{path}: data_root {data_root} of {site} cannot be listed ({err.strerror})") from err
    if empty:
        raise FileNotFoundError(f"{path}: data_root {data_root} of {site} is empty")
    if "datalist" in values:
        datalist = rel("datalist")
        if not datalist.is_file():
            raise FileNotFoundError(f"{path}: datalist {datalist} of {site} is not a file; {_holds(datalist)}")
    elif "datalist_dir" in values:
        folder = rel("datalist_dir")
        if not folder.is_dir():
            raise FileNotFoundError(f"{path}: datalist_dir {folder} of {site} is not a folder; {_holds(folder)}")
        datalist = folder / f"{datalist_name or site}.json"
        if not datalist.is_file():
            known = sorted(f.stem for f in folder.glob("*.json"))
            name = datalist_name or site
            raise FileNotFoundError(f"{path}: no datalist for {name} in {folder}; it holds {known}")
    else:
        raise SiteConfigError(f"{path}: neither datalist nor datalist_dir for {site}")
    threads = _threads(values)
    workspace = Path(workspace or Path.cwd())
    state_dir = rel("state_dir") / site if "state_dir" in values else workspace / "brats_fl_state"
    cache_dir = rel("cache_dir") if "cache_dir" in values else None
    return SiteData(site, data_root, datalist, threads=threads, state_dir=state_dir, source=path, cache_dir=cache_dir)
