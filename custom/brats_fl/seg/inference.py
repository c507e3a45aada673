"""Whole-case prediction: a 0/1/2/4 label map in the input's grid, written as NIfTI."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import torch
from monai.transforms import CropForeground, NormalizeIntensity

from brats_fl.data.checks import require_valid
from brats_fl.data.labels import REGIONS, regions_to_labels
from brats_fl.data.layout import MODALITIES, read_case
from brats_fl.data.loading import inference_transforms
from brats_fl.seg.trainer import TrainConfig, Trainer, load_model


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
    image = inference_transforms()({"image": [str(case.files[m]) for m in MODALITIES]})["image"]
    # segment the brain's bounding box (found on raw intensities, where background is 0), normalised as in
    # evaluation and training, and paste it back into the full grid: windows over the air around the head
    # would meet inputs the network never saw
    start, end = CropForeground(allow_smaller=True).compute_bounding_box(image)
    box = (slice(None), *(slice(int(a), int(b)) for a, b in zip(start, end, strict=True)))
    brain = NormalizeIntensity(nonzero=True, channel_wise=True)(image[box])
    regions = torch.zeros((len(REGIONS), *image.shape[1:]), dtype=torch.bool)
    regions[box] = torch.sigmoid(trainer.infer(brain.unsqueeze(0)))[0] > 0.5
    labels = regions_to_labels(regions)
    reference = nib.load(str(case.files[MODALITIES[0]]))
    out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(labels, reference.affine), str(out))
    return out
