"""``brats-fl tune``: every algorithm's hyperparameters searched the same way, on validation only, with Optuna.

One study per algorithm, partition and benchmark profile (:mod:`brats_fl.results.benchmark`), over the space
:mod:`brats_fl.jobs.space` declares for that algorithm. A trial trains the profile's job with the trial's values in
FLARE's simulator on ``SEEDS`` seeds, one after the other, and scores what each site ends with on its own validation
split (``final_split`` validation: no site checks or reads a test file, :mod:`brats_fl.site.client`); the trial's
value is the validation Dice pooled over the sites' cases, averaged over the seeds. Every algorithm gets the same
number of trials, counted over every worker of the study; the jobs' untuned defaults are always its first trial.

While a run trains, each site's per-round validation Dice of the model it received (``rounds.jsonl``, as
:mod:`brats_fl.jobs.live` reads it) goes to Optuna's median pruner, pooled over the sites once every site has
reported the round, at the step of the epochs trained so far (seed k's rounds after seed k-1's whole budget). A
trial that trails the median of the finished trials at the same step is pruned: its simulation, every process of
it, is killed at once and the trial's other seeds never run.

``DIR`` holds::

    study.db                                the Optuna studies (SQLite), unless --storage names another database
    profile.json, partitions/, cache/       as a benchmark folder: the profile, its partitions, decoded cases
    trials/<partition>/<algorithm>/<trial>/seed<k>/   one simulator run: site_config.json, run.log, workspace/
    tuned/<partition>/<algorithm>.json|.md  the space, every trial and the chosen values; tuned/index.md all of them

Several workers, on one machine or several, share a study by naming one database (``--storage``, any SQLAlchemy URL
Optuna accepts): each runs trials until the study holds the number asked for. A worker that dies leaves its trial
running in the database until its heartbeat is missed; the next worker marks it failed and runs another in its place.

Optuna, FLARE and torch are imported inside the functions that need them: ``brats-fl --help`` stays instant.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import socket
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from brats_fl.results.benchmark import Profile, _write_json, check_profile, job_params, prepare_partition

#: seeds each trial trains; its value is the mean of their pooled validation Dice
SEEDS = 2
#: the default storage, in the output folder
STUDY_FILE = "study.db"
#: seconds between two looks at a running simulation's rows
POLL = 2.0
#: a worker's heartbeat in the database (s), and how long one may be missed before its trial counts as abandoned
HEARTBEAT, GRACE = 30, 180
#: Optuna's median pruner: no pruning before this many trials have finished, nor in the first quarter of a trial's
#: first seed (the first rounds of a run say little about where it ends)
STARTUP_TRIALS = 5
#: seconds to wait for a stopped simulation's processes to end
STOP_WAIT = 30.0
#: the key of the pooled per-round value in a site's ``rounds.jsonl`` row: the received model's validation Dice
VAL_KEY = "val_dice_mean"


class RunFailed(RuntimeError):
    """A trial's simulation failed: the trial counts, as a failure of its values, and the study goes on."""


class OverBudget(RuntimeError):
    """Another worker took the study's last trial first: this one never runs and does not count."""


@dataclass(frozen=True)
class Study:
    """One study: an algorithm tuned on one partition of a profile, ``trials`` trials in all, results in ``out``."""

    profile: Profile
    algorithm: str
    partition: str
    trials: int
    out: Path

    @property
    def name(self) -> str:
        return f"{self.algorithm}/{self.partition}/{self.profile.name}"

    def base(self, seed: int = 0) -> Any:
        """The job's untuned parameters for ``seed``: the profile's."""
        return job_params(self.profile, self.algorithm, seed, self.partition)

    def results(self) -> Path:
        return self.out / "tuned" / self.partition / f"{self.algorithm}.json"

    def trial_folder(self, number: int, seed: int) -> Path:
        return self.out / "trials" / self.partition / self.algorithm / f"{number:03d}" / f"seed{seed}"


def storage_url(storage: str | None, out: Path) -> str:
    """``storage``, or the SQLite file in ``out``."""
    return storage or f"sqlite:///{(Path(out) / STUDY_FILE).resolve()}"


#: tries at opening a database storage (``open_storage``)
STORAGE_ATTEMPTS = 5


def open_storage(url: str) -> Any:
    """Optuna's database storage with heartbeats (a dead worker's trial is failed, not counted for ever); SQLite
    waits for a lock rather than fail when several workers write at once."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    failed = 0
    while True:
        try:
            # heartbeats are "experimental" in Optuna 5.1, and what a shared study needs
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT, grace_period=GRACE
                )
        except SQLAlchemyError:
            # two workers that start at once on a new database both create its tables, and one of them loses the
            # race (seen in the suite's two-worker test); the tables are there when it tries again
            failed += 1
            if failed == STORAGE_ATTEMPTS:
                raise
            time.sleep(failed)


def default_pruner(total: int) -> Any:
    """The median pruner at the steps of a trial's first seed's budget of ``total`` epochs."""
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=STARTUP_TRIALS, n_warmup_steps=total // 4)


def counted(trials: list) -> list:
    """The trials that count towards a study's number: finished, pruned, running, or failed by their values (a run
    that failed), not those a dead worker abandoned nor those that found the study full."""
    from optuna.trial import TrialState

    ran = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return [t for t in trials if t.state in ran or (t.state == TrialState.FAIL and "failed_run" in t.user_attrs)]


def over_budget(trials: list, number: int, asked: int) -> bool:
    """Whether trial ``number`` comes after ``asked`` counted trials with smaller numbers: two workers that ask for
    the study's last trial at once get two numbers, and only the smaller runs."""
    return len([t for t in counted(trials) if t.number < number]) >= asked


def site_weights(partition_config: Path) -> dict[str, int]:
    """Validation cases per site, from the partition's datalists (the per-round value pools the sites' means)."""
    from brats_fl.results.benchmark import site_data

    folder = Path(site_data(partition_config)["datalist_dir"])
    return {p.stem: len(json.loads(p.read_text())["validation"]) for p in sorted(folder.glob("site-*.json"))}


def round_values(
    rows: dict[str, list[dict]], sites: int, weights: dict[str, int], epochs_per_round: int
) -> dict[int, float]:
    """Epochs trained -> the sites' validation Dice of the model they received after that many epochs, pooled over
    their validation cases, for each round from round 1 that all ``sites`` have reported (round 0 scores the
    untrained model, the same in every trial of a seed)."""
    if len(rows) < sites:
        return {}
    by_round: dict[int, dict[str, float]] = {}
    for site, site_rows in rows.items():
        for row in site_rows:
            if row["round"] >= 1 and VAL_KEY in row:
                by_round.setdefault(row["round"], {})[site] = row[VAL_KEY]
    out = {}
    for rnd, scores in sorted(by_round.items()):
        if len(scores) == sites:
            total = sum(weights.get(s, 1) for s in scores)
            out[rnd * epochs_per_round] = sum(v * weights.get(s, 1) for s, v in scores.items()) / total
    return out


def _simulate(algorithm: str, params: Any, site_config: Path, folder: Path) -> None:
    """A child's work: one simulator run, FLARE's output and the sites' into ``run.log``."""
    from brats_fl.jobs.simulate import run_simulation

    fd = os.open(folder / "run.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    run_simulation(algorithm, params, site_config, folder / "workspace")


def stop(pid: int) -> list[int]:
    """Kill process ``pid`` (a simulation) and every process it started (FLARE's site workers run in sessions of their
    own, so a process group would miss them): each is suspended as it is found, so that none starts another while
    the tree is read, then all are killed; returns their ids once they have ended."""
    import psutil

    tree: list[psutil.Process] = []
    try:
        top = psutil.Process(pid)
        while new := [p for p in [top, *top.children(recursive=True)] if p.pid not in {q.pid for q in tree}]:
            for p in new:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.suspend()
            tree += new
    except psutil.NoSuchProcess:  # the simulation ended by itself meanwhile
        pass
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    deadline = time.monotonic() + STOP_WAIT
    while any(_alive(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p.pid for p in tree]


def _alive(process: Any) -> bool:
    """Running, or stopped: neither ended nor a zombie (an orphan no process has reaped yet, harmless)."""
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _scored_split(summary: dict) -> set[str]:
    """The splits the sites' final scores name (``brats_fl.site.client.Site._score_and_keep``)."""
    files = [Path(r["dir"]) / "personalised_test.json" for r in summary["site_records"].values()]
    return {json.loads(f.read_text()).get("split", "test") for f in files}


def run_seed(study: Study, trial: Any, seed: int, params: Any, partition_config: Path, offset: int) -> float:
    """Train one seed of a trial in the simulator, reporting each round to the pruner at ``offset`` + epochs; its
    pooled validation Dice. Raises ``optuna.TrialPruned`` once the simulation is stopped, ``RunFailed`` if it failed."""
    import optuna

    from brats_fl.jobs.catalogue import planned_rounds
    from brats_fl.jobs.live import read_rows
    from brats_fl.jobs.registry import get_job
    from brats_fl.results.benchmark import run_site_config
    from brats_fl.results.report import summarise_run

    folder = study.trial_folder(trial.number, seed)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    site_config = run_site_config(folder, partition_config, study.out)
    run_dir = folder / "workspace" / study.algorithm
    job = get_job(study.algorithm)
    sites = 1 if job.pooled else params.sites
    total = params.rounds * params.local_epochs
    per_round = params.local_epochs
    if job.sequential:
        per_round = params.visit_epochs or max(1, total // planned_rounds(study.algorithm, params))
    weights = site_weights(partition_config)
    start = time.perf_counter()
    process = multiprocessing.get_context("spawn").Process(
        target=_simulate, args=(study.algorithm, params, site_config, folder), daemon=False
    )
    process.start()
    reported: dict[int, float] = {}
    try:
        while True:
            process.join(POLL)
            finished = not process.is_alive()
            for epochs, value in round_values(read_rows(run_dir), sites, weights, per_round).items():
                if epochs in reported:
                    continue
                reported[epochs] = value
                trial.report(value, offset + epochs)
                if trial.should_prune():
                    stopped = stop(process.pid)
                    process.join()
                    record = {"seed": seed, "epochs": epochs, "value": value, "stopped_processes": stopped}
                    trial.set_user_attr("pruned", record)
                    raise optuna.TrialPruned(f"seed {seed} after {epochs} epochs: pooled validation Dice {value:.4f}")
            if finished:
                break
    finally:
        if process.is_alive():  # anything else that ends the trial early (an interrupt) stops its simulation too
            stop(process.pid)
            process.join()
    log = os.path.relpath(folder / "run.log", study.out)
    if process.exitcode != 0:
        trial.set_user_attr("failed_run", {"seed": seed, "log": log, "exitcode": process.exitcode})
        raise RunFailed(f"seed {seed} of trial {trial.number} failed; see {folder / 'run.log'}")
    summary = summarise_run(run_dir)
    if not summary["complete"]:
        trial.set_user_attr("failed_run", {"seed": seed, "log": log, "reason": summary["incomplete_reason"]})
        raise RunFailed(f"seed {seed} of trial {trial.number} did not complete: {summary['incomplete_reason']}")
    splits = _scored_split(summary)
    if splits != {"validation"}:  # a defect, not a bad trial: the study must not go on choosing on test scores
        raise AssertionError(f"{run_dir}: the sites scored {sorted(splits)}, not the validation split")
    dice = summary["test"]["dice_mean"]
    record = {"dice": dice, "wall_time": time.perf_counter() - start, "folder": os.path.relpath(folder, study.out)}
    trial.set_user_attr(f"seed{seed}", record)
    return dice


def _settings(study: Study) -> dict[str, Any]:
    """What makes a study what it is: the profile's settings, the space and the seeds. A worker that finds a study
    of the same name made otherwise refuses to add trials to it."""
    from brats_fl.jobs.space import budget, space

    base = study.base()
    profile = {k: v for k, v in asdict(study.profile).items() if k in ("name", "cases", "shape", "split", "params")}
    doc = {
        "algorithm": study.algorithm,
        "partition": study.partition,
        "profile": profile,
        "seeds": SEEDS,
        "budget_epochs": budget(base),
        "space": [d.describe() for d in space(study.algorithm, base)],
    }
    return json.loads(json.dumps(doc))


def open_study(study: Study, url: str, pruner: Any = None) -> Any:
    """Create the study with its settings and the untuned values as its first trial, or join the one that exists
    (made by another worker) after checking it was made with the same settings."""
    import optuna

    from brats_fl.jobs.space import budget, space, untuned

    base = study.base()
    settings = _settings(study)
    storage = open_storage(url)
    # a worker's own sampler: TPE, which with constant_liar treats other workers' running trials as bad, so that
    # workers do not all try the same region at once
    kwargs = {
        "storage": storage,
        "study_name": study.name,
        "sampler": optuna.samplers.TPESampler(constant_liar=True),
        "pruner": pruner or default_pruner(budget(base)),
    }
    try:
        found = optuna.create_study(direction="maximize", **kwargs)
    except optuna.exceptions.DuplicatedStudyError:
        found = optuna.load_study(**kwargs)
        made = _wait_for_settings(found)
        if made != settings:
            raise ValueError(
                f"study {study.name} in {url.split('://')[0]} storage was made with other settings ({made}); "
                "use another --out or --storage"
            ) from None
        return found
    found.set_user_attr("settings", settings)
    found.enqueue_trial(untuned(study.algorithm, space(study.algorithm, base), base), user_attrs={"untuned": True})
    return found


def _wait_for_settings(study: Any, wait: float = 60.0) -> dict:
    """The settings a study's creator records just after creating it (another worker may be between the two)."""
    deadline = time.monotonic() + wait
    while "settings" not in study.user_attrs and time.monotonic() < deadline:
        time.sleep(1.0)
    return study.user_attrs.get("settings", {})


def tune(
    profile: Profile,
    algorithm: str,
    partition: str,
    trials: int,
    out: Path,
    storage: str | None = None,
    pruner: Any = None,
    stream: TextIO | None = None,
) -> Path:
    """Run trials of the study until it holds ``trials`` (this worker's and any other's), then write its results;
    returns the results' JSON. ``pruner`` replaces the median pruner (tests)."""
    import optuna

    from brats_fl.jobs.space import apply, budget, options, space

    stream = stream or sys.stdout
    if trials < 1:
        raise ValueError(f"--trials must be at least 1, got {trials}")
    study = Study(profile, algorithm, partition, trials, Path(out).resolve())
    study.out.mkdir(parents=True, exist_ok=True)
    check_profile(profile, study.out)
    partition_config = prepare_partition(partition, study.out, profile)
    url = storage_url(storage, study.out)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    found = open_study(study, url, pruner)
    dims = space(algorithm, study.base())
    total = budget(study.base())
    worker = f"{socket.gethostname()}:{os.getpid()}"

    def objective(trial: optuna.Trial) -> float:
        if over_budget(found.get_trials(deepcopy=False), trial.number, trials):
            trial.set_user_attr("over_budget", True)
            raise OverBudget(f"trial {trial.number}: the study already holds {trials} trials")
        values = {d.name: d.suggest(trial) for d in dims}
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("options", options(study.base(), values))
        scores = []
        for seed in range(SEEDS):
            params = replace(apply(study.base(seed), values), final_split="validation", cross_site="none")
            scores.append(run_seed(study, trial, seed, params, partition_config, offset=seed * total))
        return sum(scores) / len(scores)

    def report(_: Any, trial: Any) -> None:
        if not trial.user_attrs.get("over_budget"):
            stream.write(trial_line(trial) + "\n")
            stream.flush()

    while len(counted(found.get_trials(deepcopy=False))) < trials:
        found.optimize(objective, n_trials=1, catch=(RunFailed, OverBudget), callbacks=[report])
    return write_results(study, found, url)


def trial_line(trial: Any) -> str:
    """One line per finished trial: its state, its score and its values."""
    from brats_fl.jobs.space import flags

    shown = flags(trial.user_attrs.get("options", {}))
    state = trial.state.name.lower()
    if state == "complete":
        seeds = ", ".join(f"{trial.user_attrs[f'seed{s}']['dice']:.4f}" for s in range(SEEDS))
        return f"trial {trial.number} complete: pooled validation Dice {trial.value:.4f} (seeds {seeds}): {shown}"
    if state == "pruned" and "pruned" in trial.user_attrs:
        p = trial.user_attrs["pruned"]
        where = f"at seed {p['seed']} after {p['epochs']} epochs (Dice {p['value']:.4f}), simulation stopped"
        return f"trial {trial.number} pruned {where}: {shown}"
    failed = trial.user_attrs.get("failed_run")
    return f"trial {trial.number} {state}" + (f" (see {failed['log']})" if failed else "") + f": {shown}"


def trial_record(trial: Any) -> dict[str, Any]:
    """What the results keep of a trial."""
    from brats_fl.jobs.space import flags

    attrs = trial.user_attrs
    return {
        "number": trial.number,
        "state": trial.state.name.lower(),
        "untuned": bool(attrs.get("untuned")),
        "values": trial.params,
        "options": attrs.get("options", {}),
        "flags": flags(attrs.get("options", {})),
        "validation_dice": trial.value,
        "seeds": {str(s): attrs[f"seed{s}"] for s in range(SEEDS) if f"seed{s}" in attrs},
        "intermediate": {str(k): v for k, v in sorted(trial.intermediate_values.items())},
        "pruned": attrs.get("pruned"),
        "failed_run": attrs.get("failed_run"),
        "worker": attrs.get("worker"),
        "seconds": trial.duration.total_seconds() if trial.duration else None,
    }


def write_results(study: Study, found: Any, url: str) -> Path:
    """The study's settings, every trial that counts and the chosen values, as ``tuned/<partition>/<algorithm>.json``
    and a markdown table beside it; ``tuned/index.md`` is rebuilt from every study's JSON in the folder."""
    trials = [trial_record(t) for t in sorted(counted(found.get_trials(deepcopy=False)), key=lambda t: t.number)]
    complete = [t for t in trials if t["state"] == "complete"]
    best = max(complete, key=lambda t: t["validation_dice"], default=None)
    untuned = next((t for t in trials if t["untuned"]), None)
    doc = {
        "study": study.name,
        # the kind of database only: a URL may hold a password
        "storage": url.split("://")[0] if "://" in url else url,
        **found.user_attrs.get("settings", {}),
        "trials_asked": study.trials,
        "counts": {s: sum(t["state"] == s for t in trials) for s in ("complete", "pruned", "fail", "running")},
        "chosen": best and {k: best[k] for k in ("number", "values", "options", "flags", "validation_dice", "seeds")},
        "untuned": untuned and {k: untuned[k] for k in ("number", "state", "validation_dice")},
        "trials": trials,
    }
    path = study.results()
    _write_json(path, doc)
    path.with_suffix(".md").write_text(study_table(doc))
    index = path.parents[1] / "index.md"
    index.write_text(index_table([json.loads(p.read_text()) for p in sorted(path.parents[1].glob("*/*.json"))]))
    return path


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _state(trial: dict) -> str:
    if trial["state"] == "pruned" and trial["pruned"]:
        return f"pruned (seed {trial['pruned']['seed']}, epoch {trial['pruned']['epochs']})"
    return {"fail": "failed run"}.get(trial["state"], trial["state"])


def study_table(doc: dict) -> str:
    """A study as markdown a page can include: the space searched, the choice, and every trial."""
    counts = ", ".join(f"{n} {s}" for s, n in doc["counts"].items() if n)
    lines = [
        f"**{doc['algorithm'].removeprefix('brats_')}** on the {doc['partition']} partition (profile "
        f"{doc['profile']['name']}): {len(doc['trials'])} trials ({counts}) of {doc['seeds']} seeds each, "
        f"{doc['budget_epochs']} epochs per training case, chosen on the validation Dice pooled over the sites' cases "
        "and averaged over the seeds.",
        "",
    ]
    if doc["chosen"]:
        chosen, untuned = doc["chosen"], doc["untuned"]
        before = ""
        if untuned and untuned["validation_dice"] is not None:
            before = f"; the untuned defaults (trial {untuned['number']}): {untuned['validation_dice']:.4f}"
        lines += [f"Chosen: trial {chosen['number']}, `{chosen['flags']}`, validation Dice "
                  f"{chosen['validation_dice']:.4f}{before}.", ""]  # fmt: skip
    lines += ["| searched | range | why |", "|---|---|---|"]
    for d in doc["space"]:
        shown = ", ".join(map(str, d["choices"])) if "choices" in d else f"{d['low']:g} to {d['high']:g}"
        scale = "" if "choices" in d else (" (log)" if d["log"] else " (linear)")
        lines.append(f"| {d['name']} | {shown}{scale} | {d['why']} |")
    names = [d["name"] for d in doc["space"]]
    seeds = [f"seed {s}" for s in range(doc["seeds"])]
    lines += ["", "| trial | state | " + " | ".join([*names, *seeds]) + " | validation Dice |",
              "|---" * (len(names) + len(seeds) + 3) + "|"]  # fmt: skip
    for t in doc["trials"]:
        label = f"{t['number']} (untuned)" if t["untuned"] else str(t["number"])
        cells = [_value(t["values"].get(n)) for n in names]
        cells += [_value(t["seeds"].get(str(s), {}).get("dice")) for s in range(doc["seeds"])]
        lines.append(f"| {label} | {_state(t)} | " + " | ".join(cells) + f" | {_value(t['validation_dice'])} |")
    return "\n".join(lines) + "\n"


def index_table(docs: list[dict]) -> str:
    """Every study of a folder in one table: the chosen values beside the untuned defaults' validation Dice."""
    lines = ["| partition | algorithm | trials | chosen | validation Dice | untuned |", "|---|---|---|---|---|---|"]
    for doc in sorted(docs, key=lambda d: (d["partition"], d["algorithm"])):
        chosen, untuned = doc["chosen"], doc["untuned"]
        counts = "/".join(str(doc["counts"][s]) for s in ("complete", "pruned", "fail"))
        shown = f"`{chosen['flags']}`" if chosen else "-"
        lines.append(
            f"| {doc['partition']} | {doc['algorithm'].removeprefix('brats_')} | {counts} | {shown} | "
            f"{_value(chosen and chosen['validation_dice'])} | {_value(untuned and untuned['validation_dice'])} |"
        )
    return "trials: complete/pruned/failed runs\n\n" + "\n".join(lines) + "\n"
