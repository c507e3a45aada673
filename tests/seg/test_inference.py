"""Which saved models may predict: never a global model whose personal layers no site trained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from brats_fl.cli.main import main
from brats_fl.seg.inference import UntrainedLayersError, load_for_inference, untrained_layers
from brats_fl.seg.model import build_model
from brats_fl.seg.trainer import TrainConfig, Trainer
from conftest import write_case

#: the repository's exported jobs: the configuration a real run's server app folder holds
JOBS = Path(__file__).resolve().parents[2] / "jobs"
PATCH = ["--patch", "32", "32", "32"]


def _persistor_model(config: Path) -> torch.nn.Module:
    """The initial model the job's persistor builds (the model a global model of that job has)."""
    server = json.loads((config / "config_fed_server.json").read_text())
    (args,) = [c["args"]["model"]["args"] for c in server["components"] if c["id"] == "persistor"]
    return build_model(args)


def _run(workspace: Path, job: str) -> Path:
    """A simulator workspace of ``job`` as a finished run leaves it: the server's global model in its app folder
    with the job's configuration, and site-1's own final model; returns the global model's path."""
    app = workspace / "server" / "simulate_job" / "app_server"
    shutil.copytree(JOBS / job / "app" / "config", app / "config")
    model = _persistor_model(app / "config")
    torch.save({"model": model.state_dict(), "meta_props": {"current_round": 1}}, app / "FL_global_model.pt")
    site = workspace / "site-1" / "simulate_job" / "brats_fl" / "personalised_model.pt"
    Trainer(TrainConfig(model=model.config()), model=model).save(site, site="site-1")
    return app / "FL_global_model.pt"


@pytest.mark.parametrize(
    ("job", "kept"),
    [
        ("brats_fedper", "personal layers 'head:2'"),
        ("brats_fedbn", "personal layers 'norm'"),
        ("brats_local", "personal layers 'all'"),
        ("brats_segviz_fedbn", "personal layers 'norm'"),
        ("brats_hyperseg_conv", "2 tensors a hypernetwork generates for each site"),
    ],
)
def test_a_global_model_with_untrained_personal_layers_is_refused(job: str, kept: str, tmp_path: Path):
    global_model = _run(tmp_path, job)
    why = untrained_layers(global_model)
    assert why is not None and f"global model of job {job}, which keeps {kept}" in why
    # the pattern of a site's own model, and the ones the folder holds
    assert "<site workspace>/<job id>/brats_fl/personalised_model.pt" in why
    assert str(tmp_path.resolve() / "site-1" / "simulate_job" / "brats_fl" / "personalised_model.pt") in why
    with pytest.raises(UntrainedLayersError):
        load_for_inference(global_model)
    assert untrained_layers(tmp_path / "site-1" / "simulate_job" / "brats_fl" / "personalised_model.pt") is None


@pytest.mark.parametrize("job", ["brats_fedavg", "brats_fedavg_ft", "brats_cyclic", "brats_segviz_fedavg"])
def test_a_global_model_of_a_job_without_personal_layers_is_its_model(job: str, tmp_path: Path):
    assert untrained_layers(_run(tmp_path, job)) is None


def test_predict_refuses_the_global_model_and_takes_the_sites(tmp_path: Path, capsys):
    case = write_case(tmp_path / "cases", "BraTS20_Training_001")
    global_model = _run(tmp_path / "fedper", "brats_fedper")
    out = tmp_path / "pred.nii.gz"
    assert main(["predict", "--model", str(global_model), "--case", str(case), "--out", str(out), *PATCH]) == 2
    assert "global model of job brats_fedper" in capsys.readouterr().err and not out.exists()
    site_model = tmp_path / "fedper" / "site-1" / "simulate_job" / "brats_fl" / "personalised_model.pt"
    assert main(["predict", "--model", str(site_model), "--case", str(case), "--out", str(out), *PATCH]) == 0

    # a FedAvg job's global model is its final model: it predicts from the file alone
    fedavg = _run(tmp_path / "fedavg", "brats_fedavg")
    out = tmp_path / "fedavg.nii.gz"
    assert main(["predict", "--model", str(fedavg), "--case", str(case), "--out", str(out), *PATCH]) == 0

    # moved away from its job's configuration, a global model cannot tell whether its layers were trained
    moved = Path(shutil.copy(fedavg, tmp_path / "moved.pt"))
    out = tmp_path / "moved.nii.gz"
    assert main(["predict", "--model", str(moved), "--case", str(case), "--out", str(out), *PATCH]) == 2
    assert "no job configuration beside it" in capsys.readouterr().err
