"""Whole-case prediction: a 0/1/2/4 label map in the input's grid, written as NIfTI."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import torch

from brats_fl.data.checks import require_valid
from brats_fl.data.labels import regions_to_labels
from brats_fl.data.layout import MODALITIES, read_case
from brats_fl.data.loading import inference_transforms
from brats_fl.training import TrainConfig, Trainer, load_model


def load_for_inference(
    model_path: Path,
    patch_size: tuple[int, int, int] = (64, 64, 64),
    threads: int | None = None,
    model_config: dict | None = None,
) -> Trainer:
    """A Trainer around a saved model, ready for ``infer`` and ``evaluate`` with sliding windows of ``patch_size``.

    ``model_config`` is needed only for FLARE's weights-only files (see ``load_model``).
    """
    model = load_model(model_path, model_config)
    return Trainer(TrainConfig(model=model.config(), patch_size=tuple(patch_size), threads=threads), model=model)


def predict_case(
    model_path: Path,
    case_dir: Path,
    out: Path,
    patch_size: tuple[int, int, int] = (64, 64, 64),
    threads: int | None = None,
) -> Path:
    """Segment one case folder; refuses a bad case and an existing output file."""
    case_dir, out = Path(case_dir), Path(out)
    if not case_dir.is_dir():
        raise FileNotFoundError(f"{case_dir}: case folder does not exist")
    if out.exists():
        raise FileExistsError(f"{out}: exists already, not overwritten")
    case = read_case(case_dir)
    require_valid([case], with_label=False)
    trainer = load_for_inference(model_path, patch_size, threads)
    data = inference_transforms()({"image": [str(case.files[m]) for m in MODALITIES]})
    probs = torch.sigmoid(trainer.infer(data["image"].unsqueeze(0)))[0]
    labels = regions_to_labels(probs > 0.5)
    reference = nib.load(str(case.files[MODALITIES[0]]))
    out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(labels, reference.affine), str(out))
    return out
