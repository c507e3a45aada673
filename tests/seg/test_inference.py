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


def _tiny(path: Path, seed: int, bias: float | None = None) -> Path:
    """A saved 2-level U-Net; with ``bias`` every region's last logit is shifted by it (all regions everywhere)."""
    model = build_model({"channels": [4, 8], "strides": [2], "init_seed": seed})
    if bias is not None:
        with torch.no_grad():
            model.net.model[-1][-1].conv.unit0.conv.bias.fill_(bias)
    Trainer(TrainConfig(model=model.config(), patch_size=(16, 16, 16)), model=model).save(path)
    return path


def test_predict_segments_a_folder_and_a_datalist_each_case_in_its_release_labels(tmp_path: Path, capsys):
    """One process segments every case, an ensemble with flips, each in its own release's labels: a model that
    calls every region everywhere writes ET 4 for a 2020 case and ET 3 for a 2023 case, inside the brain."""
    import nibabel as nib
    import numpy as np
    from brats_fl.data.layout import MODALITIES, SEG, find_cases
    from brats_fl.seg.inference import input_cases, predict_cases

    old = write_case(tmp_path / "2020", "BraTS20_Training_001", release="2020")
    new = write_case(tmp_path / "2023", "BraTS-GLI-00001-000", release="2023")
    models = [_tiny(tmp_path / "a.pt", 0, bias=20.0), _tiny(tmp_path / "b.pt", 1, bias=20.0)]
    cases = input_cases(tmp_path / "2020") + input_cases(tmp_path / "2023")
    written = predict_cases(models, cases, tmp_path / "out", (16, 16, 16), threads=1, tta=True, log=lambda _: None)
    for path, case, et in zip(written, (old, new), (4, 3), strict=True):
        labels = np.asarray(nib.load(str(path)).dataobj)
        assert path.name == f"{case.name}.nii.gz" and set(np.unique(labels)) == {0, et}
        assert labels[2:-2, 2:-2, 2:-2].min() == et  # the brain box of write_case
    with pytest.raises(FileExistsError, match="not overwritten"):
        predict_cases(models, cases, tmp_path / "out", (16, 16, 16), threads=1)

    # a datalist's test split, from the command line
    files = {k: str(p.relative_to(tmp_path)) for k, p in find_cases(tmp_path / "2020")[0].files.items()}
    entry = {"case_id": old.name, "image": [files[m] for m in MODALITIES], "label": files[SEG]}
    datalist = tmp_path / "site-1.json"
    datalist.write_text(json.dumps({"training": [entry], "validation": [], "test": [entry]}))
    argv = ["predict", "--model", str(models[0]), "--input", str(datalist), "--out", str(tmp_path / "dl"), *PATCH[:1]]
    assert main([*argv, "16", "16", "16", "--data-root", str(tmp_path)]) == 0
    assert (tmp_path / "dl" / f"{old.name}.nii.gz").is_file()
    assert main([*argv, "16", "16", "16"]) == 2 and "give --data-root" in capsys.readouterr().err


def test_ensemble_averages_probabilities_and_flips_make_the_prediction_flip_equivariant(tmp_path: Path):
    from brats_fl.seg.inference import Predictor

    a, b = _tiny(tmp_path / "a.pt", 0), _tiny(tmp_path / "b.pt", 1)
    x = torch.randn(4, 16, 16, 16)
    one, two = Predictor([a], (16, 16, 16)), Predictor([b], (16, 16, 16))
    both = Predictor([a, b], (16, 16, 16))
    torch.testing.assert_close(both.probabilities(x), (one.probabilities(x) + two.probabilities(x)) / 2)
    mirrored = x.flip(1, 3)
    plain, tta = Predictor([a], (16, 16, 16)), Predictor([a], (16, 16, 16), tta=True)
    assert not torch.allclose(plain.probabilities(mirrored), plain.probabilities(x).flip(1, 3), atol=1e-3)
    torch.testing.assert_close(tta.probabilities(mirrored), tta.probabilities(x).flip(1, 3))
