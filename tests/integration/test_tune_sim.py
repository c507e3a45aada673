"""``brats-fl tune`` for real, in FLARE's simulator on the tune-ci profile (tiny cohort and network, 2 rounds):
two workers share one study with every test file removed, and a pruned trial's simulation is stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import optuna
import psutil
import pytest
from brats_fl.results.benchmark import PROFILES, prepare_partition, site_data
from brats_fl.results.tune import SEEDS, Study, tune

PROFILE = PROFILES["tune-ci"]
JOB = "brats_fedavg"


def _remove_test_files(out: Path, profile=PROFILE) -> int:
    """The partition, made now, without its test files: a site that reads one fails loudly (running as root, a
    chmod would not stop it)."""
    data = site_data(prepare_partition("iid", out, profile))
    files = set()
    for datalist in Path(data["datalist_dir"]).glob("*.json"):
        for item in json.loads(datalist.read_text())["test"]:
            files |= {Path(data["data_root"]) / p for p in (*item["image"], item["label"])}
    for f in files:
        f.unlink()
    return len(files)


def _gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.slow
def test_two_workers_share_a_study_and_never_read_a_test_file(tmp_path: Path):
    outs = [tmp_path / "machine-a", tmp_path / "machine-b"]
    assert all(_remove_test_files(out) > 0 for out in outs)
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    command = [sys.executable, "-m", "brats_fl.cli.main", "tune", "--algorithm", JOB, "--profile", PROFILE.name]
    command += ["--trials", "2", "--storage", url]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    workers = [
        subprocess.Popen([*command, "--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for out in outs
    ]
    printed = [w.communicate(timeout=900)[0].decode() for w in workers]
    assert [w.returncode for w in workers] == [0, 0], printed

    study = optuna.load_study(study_name=Study(PROFILE, JOB, "iid", 2, tmp_path).name, storage=url)
    trials = study.get_trials()
    # exactly the trials asked for, over both workers, each of which ran one; the untuned defaults first
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2, printed
    assert len({t.user_attrs["worker"] for t in trials}) == 2
    assert trials[0].user_attrs.get("untuned") and trials[0].params["lr"] == 3e-3
    for trial in trials:
        assert trial.value == pytest.approx(sum(trial.user_attrs[f"seed{s}"]["dice"] for s in range(SEEDS)) / SEEDS)
        assert trial.intermediate_values  # per-round values went to the pruner
    # each worker wrote the results as it saw them; the one that finished last saw both trials complete
    docs = [json.loads((out / "tuned" / "iid" / f"{JOB}.json").read_text()) for out in outs]
    last = max(docs, key=lambda d: d["counts"]["complete"])
    assert last["counts"]["complete"] == 2 and last["chosen"]["number"] in (0, 1)
    assert "--lr" in last["chosen"]["flags"] and last["space"][0]["name"] == "lr"
    assert any("chosen (trial" in text for text in printed)
    assert all((out / "tuned" / "index.md").is_file() for out in outs)
    # the sites scored their validation split
    scored = list(tmp_path.glob("machine-*/trials/**/personalised_test.json"))
    assert len(scored) == 2 * SEEDS * 3 and all(json.loads(f.read_text())["split"] == "validation" for f in scored)


class _AlwaysPrune(optuna.pruners.BasePruner):
    """Prunes at the first value a trial reports."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return True


@pytest.mark.slow
def test_a_pruned_trial_stops_its_simulation(tmp_path: Path):
    profile = replace(PROFILE, name="tune-ci-3", params={**PROFILE.params, "rounds": 3})
    results = tune(profile, JOB, "iid", 1, tmp_path, pruner=_AlwaysPrune())
    doc = json.loads(results.read_text())
    assert doc["counts"]["pruned"] == 1 and doc["chosen"] is None
    pruned = doc["trials"][0]["pruned"]
    # pruned at the first round every site reported: round 1's validation, after 1 epoch of 3
    assert (pruned["seed"], pruned["epochs"]) == (0, 1)
    assert pruned["stopped_processes"] and all(_gone(pid) for pid in pruned["stopped_processes"])
    seed0 = tmp_path / "trials" / "iid" / JOB / "000" / "seed0"
    rows = [json.loads(line) for f in seed0.glob("workspace/*/*/*/brats_fl/rounds.jsonl") for line in f.open()]
    assert rows and max(r["round"] for r in rows) < 2  # round 2 never finished
    assert not list(seed0.glob("**/personalised_test.json"))
    assert not (seed0.parent / "seed1").exists()
