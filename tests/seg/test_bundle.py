"""A MONAI bundle of a finished run's model segments as ``brats-fl predict`` does, voxel for voxel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from brats_fl.cli.main import main
from brats_fl.seg.bundle import export_bundle
from brats_fl.seg.model import model_args
from brats_fl.seg.trainer import TrainConfig, Trainer
from conftest import write_case

CUSTOM = Path(__file__).resolve().parents[2] / "custom"


@pytest.mark.slow
def test_monai_runs_the_bundle_to_the_label_maps_predict_writes(tmp_path: Path):
    """A train-central folder's DynUNet (two copies of each layer in MONAI's state dict, deep supervision) as a
    bundle: MONAI's own runner, in its own process, writes the label maps of predict, in each case's release labels."""
    central = tmp_path / "central"
    trainer = Trainer(TrainConfig.from_dict({"model": model_args("dynunet", (8, 16, 32), init_seed=0)} | PATCH))
    trainer.save(central / "best_model.pt")
    (central / "config.json").write_text(json.dumps({"train": trainer.config.to_dict()}))
    for case, seed in (("BraTS-GLI-00001-000", 1), ("BraTS-GLI-00002-000", 2)):
        write_case(tmp_path / "cases", case, shape=(28, 24, 20), seed=seed, release="2023")
    bundle = tmp_path / "bundle"
    assert main(["export-bundle", str(central), "--out", str(bundle)]) == 0
    assert {p.relative_to(bundle).as_posix() for p in bundle.rglob("*.*")} == {
        "configs/metadata.json",
        "configs/inference.json",
        "models/model.pt",
    }
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(CUSTOM), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs/inference.json")]
    command += ["--bundle_root", str(bundle), "--dataset_dir", str(tmp_path / "cases")]
    subprocess.run([*command, "--output_dir", str(tmp_path / "monai")], env=env, check=True, capture_output=True)
    argv = ["predict", "--model", str(central / "best_model.pt"), "--input", str(tmp_path / "cases")]
    assert main([*argv, "--out", str(tmp_path / "predict"), "--patch", "16", "16", "16"]) == 0
    for ours in sorted((tmp_path / "predict").iterdir()):
        theirs = nib.load(str(tmp_path / "monai" / ours.name))
        expected = np.asarray(nib.load(str(ours)).dataobj)
        assert set(np.unique(expected)) > {0} and not set(np.unique(expected)) - {0, 1, 2, 3}
        np.testing.assert_array_equal(np.asarray(theirs.dataobj), expected)
        np.testing.assert_array_equal(theirs.affine, nib.load(str(ours)).affine)


PATCH = {"patch_size": [16, 16, 16]}


def test_a_bundle_is_refused_where_predict_would_refuse(tmp_path: Path):
    central = tmp_path / "central"
    Trainer(TrainConfig.from_dict({"spacing": 2.0} | PATCH)).save(central / "best_model.pt")
    (central / "config.json").write_text(json.dumps({"train": PATCH}))
    with pytest.raises(ValueError, match="trained at 2.0 mm"):
        export_bundle(central, tmp_path / "b")
    with pytest.raises(ValueError, match="--site is not used"):
        export_bundle(central, tmp_path / "b", site="site-1")
    with pytest.raises(FileNotFoundError, match="neither a train-central output folder"):
        export_bundle(tmp_path, tmp_path / "b")
    assert not (tmp_path / "b").exists()
