"""Whole-case prediction: a label map in the input's grid and its release's labels, written as NIfTI, of one case or
of a folder or datalist of cases in one process, by one model or an ensemble, optionally with flip test-time
augmentation; and which saved models may predict at all, and at which spacing.

A model trained at a coarser ``spacing`` (``brats_fl.settings.params``) predicts at it: a site's or a central run's
model file records it (``Trainer.save``), a FLARE global model's job configuration beside it does. Its prediction is
resampled back and written on the input's own grid and affine.

The server's global model (``FL_global_model.pt``, FLARE's persistor file) of a job with personal layers (FedPer,
FedBN, the local-only baseline, HyperSeg) is no model any site uses: no site ever sends its personal layers, so
they keep their initial values there (HyperSeg's hold the tensors generated for an average site, which no site
trained). Alone it predicts noise. Which layers a job keeps personal is read from the job's own configuration in
the server's app folder, where ``load_model`` reads the model's architecture too: the sites' ``personal``
selection (``brats_fl.server.personalise``) and HyperSeg's ``personal_keys``. A global model whose job keeps none
is that job's final model and predicts as any other; the model a site ends with
(``<site workspace>/<job id>/brats_fl/personalised_model.pt``) always does.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import CropForeground, Flip, MeanEnsemble, NormalizeIntensity, SpatialCrop

from brats_fl.data.checks import require_valid
from brats_fl.data.datalist import load_datalist
from brats_fl.data.labels import REGIONS, regions_to_labels
from brats_fl.data.layout import MODALITIES, Case, find_cases, read_case
from brats_fl.data.loading import inference_transforms
from brats_fl.protocol import SITE_FOLDER, SITE_MODEL_FILE
from brats_fl.seg.postprocess import remove_small_components
from brats_fl.seg.trainer import TrainConfig, Trainer, load_model

#: where a site keeps the model it ends with, its personal layers included (``brats_fl.site.client``)
SITE_MODEL = Path("<site workspace>") / "<job id>" / SITE_FOLDER / SITE_MODEL_FILE
#: the same in FLARE's simulator
SIMULATED_SITE_MODEL = Path("<workspace>") / "<site>" / "simulate_job" / SITE_FOLDER / SITE_MODEL_FILE


class UntrainedLayersError(ValueError):
    """A global model whose personal layers no site trained: it must not predict on its own."""


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def personal_layers(app_config: Path) -> tuple[str | None, str | None]:
    """(job name, what the job keeps at its sites, or None if nothing) from a FLARE app's ``config`` folder."""
    client, server = _json(app_config / "config_fed_client.json"), _json(app_config / "config_fed_server.json")
    job, kept = None, []
    for executor in client.get("executors", []):
        site = executor.get("executor", {}).get("args", {}).get("config") or {}
        job = job or site.get("job")
        if site.get("personal") not in (None, "none"):
            kept.append(f"personal layers {site['personal']!r}")
    for workflow in server.get("workflows", []):
        generated = workflow.get("args", {}).get("personal_keys")
        if generated:
            kept.append(f"{len(generated)} tensors a hypernetwork generates for each site, e.g. {generated[0]}")
    return job, "; ".join(kept) or None


def site_models(global_model: Path) -> list[Path]:
    """The sites' own final models of the job whose server app folder holds ``global_model``, where the folder
    holds the sites' workspaces too: the simulator's ``<site>/simulate_job``, a POC's ``<site>/<job id>``."""
    app = Path(global_model).resolve().parent
    if len(app.parents) < 3:
        return []
    run = app.parent
    return sorted(run.parents[1].glob(f"*/{run.name}/{SITE_MODEL.parent.name}/{SITE_MODEL.name}"))


def untrained_layers(model_path: Path) -> str | None:
    """Why ``model_path`` must not predict on its own, or None if it may: a FLARE global model whose job keeps
    layers at its sites, or one whose job cannot be told (no job configuration beside it)."""
    model_path = Path(model_path)
    try:
        blob = torch.load(model_path, map_location="cpu", weights_only=False)
    except Exception:  # not a model file at all: load_model says so, naming the error
        return None
    if not (isinstance(blob, dict) and "state_dict" not in blob and isinstance(blob.get("model"), dict)):
        return None  # a model a site or a central training saved (``Trainer.save``), whole
    config = model_path.parent / "config"
    if not (config / "config_fed_client.json").is_file():
        return (
            f"{model_path} is a FLARE global model with no job configuration beside it ({config}/), so whether its "
            f"job kept layers at the sites, which it would hold untrained, cannot be told. Use it where its job left "
            f"it, in the server's app folder, or a site's own model, {SITE_MODEL}"
        )
    job, kept = personal_layers(config)
    if kept is None:
        return None
    found = ", ".join(str(p) for p in site_models(model_path))
    where = f"; here: {found}" if found else ""
    return (
        f"{model_path} is the server's global model of job {job}, which keeps {kept} at the sites: no site ever sent "
        f"them, so this model holds values no site trained and predicts nothing useful on its own. Use a site's own "
        f"model, {SITE_MODEL} ({SIMULATED_SITE_MODEL} in the simulator){where}"
    )


def trained_spacing(model_path: Path) -> float | None:
    """The spacing (mm) ``model_path`` was trained at: recorded in a model ``Trainer.save`` wrote, or in the job
    configuration beside a FLARE global model; None: the files' own grid (models saved before spacing existed)."""
    blob = torch.load(model_path, map_location="cpu", weights_only=False)
    if "state_dict" in blob:
        return blob.get("spacing")
    client = _json(Path(model_path).parent / "config" / "config_fed_client.json")
    sites = [
        executor.get("executor", {}).get("args", {}).get("config") or {} for executor in client.get("executors", [])
    ]
    return next((site.get("spacing") for site in sites), None)


def load_for_inference(
    model_path: Path,
    patch_size: tuple[int, int, int] = (64, 64, 64),
    threads: int | None = None,
    model_config: dict | None = None,
) -> Trainer:
    """A Trainer around a saved model, ready for ``infer`` and ``evaluate`` with sliding windows of ``patch_size``.

    ``model_config`` is needed only for FLARE's weights-only files (see ``load_model``). Refuses a global model
    whose personal layers no site trained (``untrained_layers``). Infers at the spacing the model was trained at
    (``trained_spacing``).
    """
    why = untrained_layers(model_path) if Path(model_path).is_file() else None
    if why:
        raise UntrainedLayersError(why)
    model = load_model(model_path, model_config)
    config = TrainConfig(
        model=model.config(), patch_size=tuple(patch_size), threads=threads, spacing=trained_spacing(model_path)
    )
    config.validate()
    return Trainer(config, model=model)


#: nnU-Net's test-time mirroring: every combination of flips along the three spatial axes, the identity first
FLIPS: tuple[tuple[int, ...], ...] = tuple(a for n in range(4) for a in itertools.combinations(range(3), n))


class Predictor:
    """One or more saved models, loaded once, that segment case after case: each case's region probabilities are
    averaged over the models (an ensemble of seeds, or of the sites' personalised models; MONAI's ``MeanEnsemble``)
    and, with ``tta``, over the 8 flips of ``FLIPS``, then thresholded at 0.5.

    Every model is refused as ``load_for_inference`` refuses it (a global model whose personal layers no site
    trained), before any case is read. Each model infers at the spacing it was trained at, so models of different
    spacings may be ensembled: their probabilities all come back on the case's own grid.
    """

    def __init__(
        self,
        model_paths: Sequence[Path],
        patch_size: tuple[int, int, int] = (64, 64, 64),
        threads: int | None = None,
        tta: bool = False,
    ):
        if not model_paths:
            raise ValueError("predict needs at least one model")
        self.trainers = [load_for_inference(p, patch_size, threads) for p in model_paths]
        self.flips = FLIPS if tta else FLIPS[:1]

    @property
    def resamples(self) -> bool:
        """Whether every model resamples what it segments (so a case off the BraTS grid may be segmented)."""
        return all(t.config.spacing is not None for t in self.trainers)

    @torch.no_grad()
    def probabilities(self, brain: torch.Tensor) -> torch.Tensor:
        """Region probabilities (3, X, Y, Z) of a normalised volume (4, X, Y, Z; a MetaTensor where a model resamples).

        A flip mirrors the voxels and keeps the affine (MONAI's ``Flip`` would flip the affine with them, and a model
        that resamples to the training orientation would then undo the flip); the prediction is flipped back."""
        members = []
        for trainer in self.trainers:
            flipped = []
            for axes in self.flips:
                flip = Flip(spatial_axis=axes)
                image = _with_meta(_plain(flip(_plain(brain))), brain) if axes else brain
                probabilities = torch.sigmoid(trainer.infer_case(image).cpu())
                flipped.append(_plain(flip(probabilities)) if axes else probabilities)
            members.append(torch.stack(flipped).mean(0))
        return MeanEnsemble()(members) if len(members) > 1 else members[0]

    def segment(self, case: Case, min_volume: dict[str, float] | None = None) -> np.ndarray:
        """The label map of ``case`` on its own grid, in its release's label convention."""
        image = inference_transforms()({"image": [str(case.files[m]) for m in MODALITIES]})["image"]
        # segment the brain's bounding box (found on raw intensities, where background is 0), normalised as in
        # evaluation and training, and paste it back into the full grid: windows over the air around the head
        # would meet inputs the network never saw
        # (a model trained at a coarser spacing segments the box at that spacing and is resampled back to it)
        start, end = CropForeground(allow_smaller=True).compute_bounding_box(image)
        box = (slice(None), *(slice(int(a), int(b)) for a, b in zip(start, end, strict=True)))
        brain = NormalizeIntensity(nonzero=True, channel_wise=True)(SpatialCrop(roi_start=start, roi_end=end)(image))
        regions = torch.zeros((len(REGIONS), *image.shape[1:]), dtype=torch.bool)
        regions[box] = self.probabilities(brain) > 0.5
        if min_volume:
            zooms = nib.load(str(case.files[MODALITIES[0]])).header.get_zooms()[:3]
            regions = remove_small_components(regions[None], [zooms], min_volume)[0]
        return regions_to_labels(regions, case.convention)  # written as the case's release labels its files

    def write(self, case: Case, out: Path, min_volume: dict[str, float] | None = None) -> Path:
        """Segment ``case`` and write its label map to ``out``, with the affine of its first modality; ``min_volume``
        (mm³ per region) removes smaller predicted components (``brats_fl.seg.postprocess``)."""
        labels = self.segment(case, min_volume)
        reference = nib.load(str(case.files[MODALITIES[0]]))
        out.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(labels, reference.affine), str(out))
        return out


def _plain(image: torch.Tensor) -> torch.Tensor:
    return image.as_tensor() if isinstance(image, MetaTensor) else image


def _with_meta(voxels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return MetaTensor(voxels, affine=like.affine) if isinstance(like, MetaTensor) else voxels


def predict_case(
    model_path: Path | Sequence[Path],
    case_dir: Path,
    out: Path,
    patch_size: tuple[int, int, int] = (64, 64, 64),
    threads: int | None = None,
    min_volume: dict[str, float] | None = None,
    tta: bool = False,
) -> Path:
    """Segment one case folder with one model or an ensemble (``Predictor``); refuses a bad case and an existing
    output file. ``min_volume`` (mm³ per region) removes smaller predicted components (``brats_fl.seg.postprocess``)."""
    case_dir, out = Path(case_dir), Path(out)
    if not case_dir.is_dir():
        raise FileNotFoundError(f"{case_dir}: case folder does not exist")
    if out.exists():
        raise FileExistsError(f"{out}: exists already, not overwritten")
    case = read_case(case_dir)
    paths = [model_path] if isinstance(model_path, str | Path) else list(model_path)
    predictor = Predictor(paths, patch_size, threads, tta)
    # a case off the BraTS grid is refused unless the model resamples what it segments
    require_valid([case], with_label=False, grid_required=not predictor.resamples)
    return predictor.write(case, out, min_volume)


def input_cases(source: Path, data_root: Path | None = None, split: str = "test") -> list[Case]:
    """The cases of a folder of case folders, or of a datalist's ``split`` (its paths relative to ``data_root``)."""
    source = Path(source)
    if source.is_file():
        if data_root is None:
            raise ValueError(f"{source} is a datalist: its paths are relative to a data root; give --data-root")
        datalist = load_datalist(source, data_root, check=False)
        ids = {item["case_id"] for item in datalist.items(split)}
        cases = [c for c in datalist.cases() if c.case_id in ids]
        if not cases:
            raise ValueError(f"{source}: no case in its {split} split")
        return cases
    if data_root is not None:
        raise ValueError(f"--data-root is for a datalist; {source} is a folder of cases")
    return find_cases(source)


def predict_cases(
    model_paths: Sequence[Path],
    cases: Sequence[Case],
    out_dir: Path,
    patch_size: tuple[int, int, int] = (64, 64, 64),
    threads: int | None = None,
    min_volume: dict[str, float] | None = None,
    tta: bool = False,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Segment every case in one process, the models loaded once, into ``out_dir/<case id>.nii.gz`` (BraTS's naming
    of predictions), each in its own release's labels. Refuses, before any is segmented, a bad case and an existing
    output file."""
    out_dir = Path(out_dir)
    outs = [out_dir / f"{case.case_id}.nii.gz" for case in cases]
    existing = [str(p) for p in outs if p.exists()]
    if existing:
        raise FileExistsError(f"{len(existing)} output(s) exist already, not overwritten: {', '.join(existing[:3])}")
    predictor = Predictor(model_paths, patch_size, threads, tta)
    require_valid(list(cases), with_label=False, grid_required=not predictor.resamples)
    written = []
    for case, out in zip(cases, outs, strict=True):
        start = time.perf_counter()
        written.append(predictor.write(case, out, min_volume))
        log(f"{case.case_id}: {out} ({time.perf_counter() - start:.1f} s)")
    return written
