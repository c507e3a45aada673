"""A short real training on a tiny phantom: validation Dice rises; evaluate and predict work end to end."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from brats_fl.cli.main import main
from brats_fl.data.checks import DataError
from brats_fl.data.datalist import load_datalist
from brats_fl.data.labels import regions_to_labels
from brats_fl.data.layout import find_cases
from brats_fl.data.loading import ANNOTATED, eval_loader, eval_transforms
from brats_fl.data.partition import assign_sites, write_datalists
from brats_fl.jobs.catalogue import JobParams
from brats_fl.seg.inference import load_for_inference
from brats_fl.seg.trainer import RECIPES, RegionLoss, TrainConfig, Trainer, make_train_loader, poly_lr
from brats_fl.settings.params import by_name
from monai.losses import DiceCELoss

TINY = {
    "model": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1},
    "patch_size": [32, 32, 32],
    "lr": 3e-3,
    "threads": 2,
    "seed": 0,
}


@pytest.fixture(scope="module")
def pooled(tiny_phantom: Path, tmp_path_factory) -> Path:
    lists = tmp_path_factory.mktemp("lists")
    parts = assign_sites(find_cases(tiny_phantom), 1, "equal", seed=0)
    write_datalists(tiny_phantom, parts, lists, split=(0.6, 0.2, 0.2))
    return lists / "site-1.json"


def test_training_refuses_bad_data_before_starting(tiny_phantom: Path, pooled: Path, tmp_path: Path, capsys):
    doc = json.loads(pooled.read_text())
    doc["training"][0]["image"][2] = "nowhere/missing_t2.nii.gz"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    assert (
        main(
            ["train-central", "--data-root", str(tiny_phantom), "--datalist", str(bad), "--out", str(tmp_path / "run")]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "nowhere/missing_t2.nii.gz: missing t2 file" in err and "nothing was trained" in err
    assert not (tmp_path / "run").exists()


def test_training_without_a_validation_split_is_refused_before_starting(
    tiny_phantom: Path, pooled: Path, tmp_path: Path, capsys
):
    doc = json.loads(pooled.read_text()) | {"validation": []}
    bare = tmp_path / "no_validation.json"
    bare.write_text(json.dumps(doc))
    args = ["train-central", "--data-root", str(tiny_phantom), "--datalist", str(bare), "--out", str(tmp_path / "run")]
    assert main(args) == 2
    assert "no validation case" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_datalist_entry_outside_the_root_is_refused(tiny_phantom: Path, pooled: Path, tmp_path: Path):
    doc = json.loads(pooled.read_text())
    doc["test"][0]["label"] = "../../etc/passwd"
    bad = tmp_path / "escape.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="outside the data root"):
        load_datalist(bad, tiny_phantom)


def test_unknown_training_option_is_refused():
    with pytest.raises(ValueError, match="unknown training option"):
        TrainConfig.from_dict({"learning_rate": 0.1})
    with pytest.raises(ValueError, match="patch_size"):
        TrainConfig.from_dict({"patch_size": [8, 8, 8]})


def test_poly_lr_is_nnunets_formula_from_step_0_and_never_reaches_0():
    rates = [poly_lr(1e-2, r, 4) for r in range(4)]
    assert rates == [1e-2 * (1 - r / 4) ** 0.9 for r in range(4)]
    assert rates[0] == 1e-2 and rates[-1] == pytest.approx(1e-2 * 0.25**0.9) and rates[-1] > 0
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False))
    for step, steps in ((4, 4), (-1, 4), (0, 0)):
        with pytest.raises(ValueError, match="has no step"):
            poly_lr(1e-2, step, steps)


def test_a_recipe_keeps_its_own_rate_and_momentum_unless_set():
    nnunet = TrainConfig.from_dict({"recipe": "nnunet", "lr": None, "momentum": None})
    assert (nnunet.optimizer, nnunet.loss, nnunet.lr_schedule) == ("sgd", "dice_ce", "poly")
    assert (nnunet.lr, nnunet.momentum, nnunet.weight_decay) == (1e-2, 0.9, 3e-5)
    adam = TrainConfig.from_dict({"recipe": "adam_dice"})
    assert (adam.optimizer, adam.lr, adam.momentum, adam.lr_schedule) == ("adam", 3e-3, None, "constant")
    assert TrainConfig.from_dict({"recipe": "nnunet", "lr": 0.05}).lr == 0.05
    # the job schema: no rate of its own, so every job trains at its recipe's, and the server schedules that one
    assert by_name("lr").default is None and by_name("momentum").default is None
    assert JobParams(recipe="nnunet").round_lr() == {"lr": 1e-2, "lr_schedule": "poly"}
    assert JobParams().round_lr() == {"lr": 3e-3, "lr_schedule": "constant"}
    assert JobParams(recipe="nnunet", lr=0.02, momentum=0.99).train_settings().momentum == 0.99
    stated = by_name("lr").unset  # the help states each recipe's rate: 3e-3, 1e-2
    assert all(f"{name} {recipe['lr']:.0e}".replace("e-0", "e-") in stated for name, recipe in RECIPES.items())


@pytest.mark.parametrize(("momentum", "nesterov"), [(0.9, True), (0.99, True), (0.0, False)])
def test_nnunet_trains_with_sgd_nesterov_and_weight_decay(momentum: float, nesterov: bool):
    """Nesterov momentum as nnU-Net, or at momentum 0 plain SGD, as SCAFFOLD is derived."""
    trainer = Trainer(TrainConfig.from_dict({**TINY, "lr": None, "recipe": "nnunet", "momentum": momentum}))
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    group = trainer.optimizer.param_groups[0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (momentum, nesterov, 3e-5)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"recipe": "adam_dice", "momentum": 0.9}, "momentum is SGD's"),
        ({"recipe": "nnunet", "momentum": 1.0}, "momentum must be in"),
        ({"recipe": "nnunet", "momentum": -0.1}, "momentum must be in"),
        ({"recipe": "nnunet", "lr": -1e-2}, "lr must be positive"),
    ],
)
def test_a_recipe_refuses_what_it_cannot_take(values: dict, message: str):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"momentum": 0.9}, "momentum is SGD's"),
        ({"recipe": "nnunet", "momentum": 1.0}, "0 <= momentum < 1"),
        ({"lr": 0.0}, "0 < lr < 1"),
        ({"finetune_lr": 1.5}, "0 < finetune_lr < 1"),
    ],
)
def test_a_job_refuses_bad_rates_before_it_is_built(values: dict, message: str):
    with pytest.raises(ValueError, match=message):
        JobParams(**values)


def _batches(n: int) -> list[dict]:
    torch.manual_seed(0)
    label = (torch.rand(1, 3, 16, 16, 16) > 0.7).float()
    return [{"image": torch.randn(1, 4, 16, 16, 16), "label": label, ANNOTATED: torch.ones(1, 3)}] * n


def test_train_epochs_takes_the_rate_it_is_given_for_every_epoch_else_its_own_poly():
    config = TrainConfig.from_dict({**TINY, "lr": None, "recipe": "nnunet", "patch_size": [16, 16, 16]})
    config.total_epochs = 3
    trainer = Trainer(config)
    given = trainer.train_epochs(_batches(1), epochs=2, lr=4e-3)
    assert given["lr"] == given["lr_last"] == trainer.optimizer.param_groups[0]["lr"] == 4e-3
    own = trainer.train_epochs(_batches(1), epochs=1)  # epoch 2 of 3 (from 0): the per-epoch schedule's last
    assert own["lr"] == own["lr_last"] == poly_lr(1e-2, 2, 3)
    with pytest.raises(ValueError, match="has no step 3"):
        trainer.train_epochs(_batches(1), epochs=1)


def test_the_nnunet_loss_is_monais_dice_ce_per_region_when_every_region_is_annotated():
    torch.manual_seed(1)
    logits, label = torch.randn(2, 3, 8, 8, 8), (torch.rand(2, 3, 8, 8, 8) > 0.6).float()
    monai = DiceCELoss(sigmoid=True, smooth_nr=0.0, smooth_dr=1e-5)
    per_region = torch.stack([monai(logits[:, [c]], label[:, [c]]) for c in range(3)]).mean()
    torch.testing.assert_close(RegionLoss(with_ce=True)(logits, label), per_region)
    torch.testing.assert_close(RegionLoss(with_ce=True)(logits, label, torch.ones(2, 3)), per_region)


@pytest.mark.slow
def test_validation_dice_rises(tiny_phantom: Path, pooled: Path):
    config = TrainConfig.from_dict(TINY)
    datalist = load_datalist(pooled, tiny_phantom)
    trainer = Trainer(config)
    train = make_train_loader(datalist.items("training"), config)
    val = eval_loader(datalist.items("validation"))
    before = trainer.evaluate(val)
    stats = trainer.train_epochs(train, epochs=12)
    after = trainer.evaluate(val)
    assert stats["steps"] == 12 * len(datalist.items("training"))
    assert after["dice_WT"] > before["dice_WT"] + 0.2, (before, after)
    assert after["dice_mean"] > before["dice_mean"] + 0.1
    assert after["val_loss"] < before["val_loss"]


@pytest.mark.slow
def test_train_central_evaluate_predict_commands(tiny_phantom: Path, pooled: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    args = ["--data-root", str(tiny_phantom), "--datalist", str(pooled)]
    assert (
        main(
            [
                "train-central",
                *args,
                "--out",
                str(out),
                "--epochs",
                "2",
                "--val-every",
                "1",
                "--patch",
                "32",
                "32",
                "32",
                "--channels",
                "8",
                "16",
                "32",
                "--threads",
                "2",
            ]
        )
        == 0
    )
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and (out / "best_model.pt").is_file()
    assert "| central |" in capsys.readouterr().out

    metrics_file = tmp_path / "eval.json"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(out / "last_model.pt"),
                *args,
                "--split",
                "test",
                "--patch",
                "32",
                "32",
                "32",
                "--json",
                str(metrics_file),
            ]
        )
        == 0
    )
    metrics = json.loads(metrics_file.read_text())
    assert 0 <= metrics["dice_mean"] <= 1 and len(metrics["per_case"]) == len(json.loads(pooled.read_text())["test"])

    case = sorted(p for p in tiny_phantom.iterdir() if p.is_dir())[0]
    target = tmp_path / "pred" / "seg.nii.gz"
    assert (
        main(
            [
                "predict",
                "--model",
                str(out / "last_model.pt"),
                "--case",
                str(case),
                "--out",
                str(target),
                "--patch",
                "32",
                "32",
                "32",
            ]
        )
        == 0
    )
    reference, pred = nib.load(str(next(case.glob("*_flair.nii.gz")))), nib.load(str(target))
    assert pred.shape == reference.shape and np.allclose(pred.affine, reference.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 4}
    assert main(["predict", "--model", str(out / "last_model.pt"), "--case", str(case), "--out", str(target)]) == 2
    assert "not overwritten" in capsys.readouterr().err

    # predict labels a case voxel for voxel as evaluation sees it: cropped to the brain, pasted back
    case = tiny_phantom / metrics["per_case"][0]["case_id"]
    target = tmp_path / "pred" / "test_case.nii.gz"
    model, patch = out / "last_model.pt", ["--patch", "32", "32", "32"]
    assert main(["predict", "--model", str(model), "--case", str(case), "--out", str(target), *patch]) == 0
    files = {m: str(next(case.glob(f"*_{m}.nii.gz"))) for m in ("t1", "t1ce", "t2", "flair", "seg")}
    item = eval_transforms()({"image": [files[m] for m in ("t1", "t1ce", "t2", "flair")], "label": files["seg"]})
    trainer = load_for_inference(model, (32, 32, 32))
    expected = regions_to_labels(torch.sigmoid(trainer.infer(item["image"].unsqueeze(0)))[0] > 0.5)
    pred = np.asarray(nib.load(str(target)).dataobj)
    assert (pred > 0).any()
    counts = [np.bincount(labels.ravel(), minlength=5)[1:].tolist() for labels in (pred, expected)]
    assert counts[0] == counts[1]
