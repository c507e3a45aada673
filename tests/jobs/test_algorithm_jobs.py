"""The FedProx, SCAFFOLD and Ditto jobs as exported: FLARE's components with the schema's parameters, and every
option they do not use refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from brats_fl.cli.main import main
from brats_fl.jobs.catalogue import JobParams, build, refuse_unused
from brats_fl.jobs.export import export_jobs
from brats_fl.site.client import site_args


def _config(job: Path, side: str) -> dict:
    return json.loads((job / "app" / "config" / f"config_fed_{side}.json").read_text())


def test_exported_algorithm_jobs_carry_their_parameters(tmp_path: Path):
    params = JobParams(mu=0.3, ditto_lambda=0.2, personal_epochs=2)
    fedprox, scaffold, ditto = export_jobs(tmp_path, ["brats_fedprox", "brats_scaffold", "brats_ditto"], params)
    (controller,) = [w for w in _config(fedprox, "server")["workflows"] if w["id"] == "controller"]
    assert controller["path"] == "brats_fl.server.fedavg.DeadlineFedAvg" and controller["args"]["fedprox_mu"] == 0.3
    paths = [w["path"] for w in _config(scaffold, "server")["workflows"]]
    assert paths[0] == "brats_fl.server.scaffold.ResumableScaffold"
    (executor,) = _config(ditto, "client")["executors"]
    site = site_args(executor["executor"]["args"]["config"])
    assert (site.ditto_lambda, site.personal_epochs, site.personal) == (0.2, 2, "none")
    for job in (fedprox, scaffold):
        (executor,) = _config(job, "client")["executors"]
        assert site_args(executor["executor"]["args"]["config"]).ditto_lambda is None, "no personal model"


@pytest.mark.parametrize(
    ("job", "option"),
    [
        ("brats_fedavg", "--mu"),
        ("brats_scaffold", "--norm-ratio"),
        ("brats_scaffold", "--min-good"),
        ("brats_fedprox", "--ditto-lambda"),
        ("brats_scaffold", "--mu"),
        ("brats_scaffold", "--personal"),
        ("brats_scaffold", "--min-responses"),
        ("brats_ditto", "--personal"),
        ("brats_ditto", "--mu"),
        ("brats_fedbn", "--personal-epochs"),
    ],
)
def test_options_an_algorithm_job_does_not_use_are_refused(job: str, option: str, capsys):
    value = "norm" if option == "--personal" else "1"
    assert main(["run", job, option, value, "--workspace", "/nonexistent/never-written"]) == 2
    assert f"{job} does not use {option}" in capsys.readouterr().err


def test_algorithm_parameters_out_of_range_are_refused_and_every_algorithm_resumes():
    refuse_unused("brats_fedprox", {"mu": 0.1})
    refuse_unused("brats_ditto", {"ditto_lambda": 1.0, "personal_epochs": 2})
    for bad in ({"mu": 0.0}, {"mu": -1.0}, {"ditto_lambda": -0.1}, {"personal_epochs": 0}):
        with pytest.raises(ValueError, match="out of range"):
            JobParams(**bad)
    # the sites keep Ditto's personal model and SCAFFOLD's c_i, the server c (brats_fl.server.scaffold)
    for job in ("brats_ditto", "brats_scaffold"):
        build(job, JobParams(resume_from="/server/FL_global_model.pt"))
