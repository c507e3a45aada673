"""A MONAI bundle of a finished run's model, for MONAI's own runner, MONAI Deploy and MONAI Label.

``export_bundle`` writes ``configs/metadata.json``, ``configs/inference.json`` and ``models/model.pt`` (the weights,
a plain state dict). ``python -m monai.bundle run --config_file configs/inference.json --bundle_root DIR
--dataset_dir CASES --output_dir OUT`` then segments every case folder below CASES into ``OUT/<case id>.nii.gz``, the
same label map ``brats-fl predict`` writes (``brats_fl.seg.inference.Predictor``, one model, no flips): MONAI's
loading, ``CropForegroundd`` to the brain's bounding box, ``NormalizeIntensityd`` on the brain, Gaussian-weighted
sliding windows of the training patch, sigmoid, ``Invertd`` to paste the box back, each case's release labels,
``SaveImaged`` on the input's affine. The network is this package's wrapper (``brats_fl.seg.model``), so brats-fl
must be installed where the bundle runs; the two small pieces MONAI has no transform for are here: the case list
(BraTS file names per release) and the regions-to-labels conversion per release.

A model trained at another spacing (``--spacing``) is refused: ``predict`` resamples its logits back with the case's
own affine, which the bundle's inverted transforms would not reproduce voxel for voxel.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import monai
import nibabel
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from brats_fl import __version__
from brats_fl.data.labels import REGIONS, regions_to_labels
from brats_fl.data.layout import MODALITIES, find_cases
from brats_fl.protocol import SITE_FOLDER, SITE_MODEL_FILE, SITE_RECORD
from brats_fl.seg.inference import load_for_inference

#: the metadata schema MONAI's model zoo bundles name (``python -m monai.bundle verify_metadata`` fetches it)
SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
#: where a train-central output folder keeps its models, the one chosen on validation first
CENTRAL_MODELS = ("best_model.pt", "last_model.pt")


def bundle_datalist(dataset_dir: str) -> list[dict]:
    """Every case folder below ``dataset_dir``: its 4 modalities in the network's order and its release's label
    convention (``brats_fl.data.layout``)."""
    return [
        {"image": [str(c.files[m]) for m in MODALITIES], "case_id": c.case_id, "convention": c.convention}
        for c in find_cases(Path(dataset_dir))
    ]


class RegionsToLabelsd(MapTransform):
    """Region probabilities (3, X, Y, Z; REGIONS order) -> a label map (1, X, Y, Z) in the convention that the item's
    ``convention_key`` names (``brats_fl.data.labels.regions_to_labels``: a region where its probability is > 0.5),
    keeping the image's metadata."""

    def __init__(self, keys: str | Sequence[str], convention_key: str = "convention"):
        super().__init__(keys)
        self.convention_key = convention_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            labels = torch.as_tensor(regions_to_labels(d[key], d[self.convention_key]))[None]
            d[key] = MetaTensor(labels, meta=d[key].meta) if isinstance(d[key], MetaTensor) else labels
        return d


def case_name(metadict: dict, saver: object) -> dict:
    """``SaveImaged``'s file name: the case folder's name, as ``brats-fl predict`` names its outputs."""
    return {"subject": Path(str(metadict["filename_or_obj"])).parent.name, "idx": None}


def find_model(run: Path, site: str | None = None) -> tuple[Path, tuple[int, int, int]]:
    """The model file of a finished run and the patch it was trained on: a ``train-central`` output folder's best
    model, or a ``brats-fl run`` folder's global model (with ``site``: that site's own final model)."""
    run = Path(run)
    config = run / "config.json"
    if config.is_file():
        if site is not None:
            raise ValueError(f"{run} is a train-central output folder: it has no sites, --site is not used")
        model = next((run / m for m in CENTRAL_MODELS if (run / m).is_file()), None)
        if model is None:
            raise FileNotFoundError(f"{run}: a train-central folder without {' or '.join(CENTRAL_MODELS)}")
        return model, tuple(json.loads(config.read_text())["train"]["patch_size"])
    if not (run / "server").is_dir():
        raise FileNotFoundError(f"{run}: neither a train-central output folder (config.json) nor a brats-fl run")
    if site is not None:
        folder = run / site / "simulate_job" / SITE_FOLDER
        if not (folder / SITE_MODEL_FILE).is_file():
            sites = sorted(p.parent.parent.parent.name for p in run.glob(f"*/simulate_job/{SITE_FOLDER}/{SITE_RECORD}"))
            raise FileNotFoundError(f"{run}: no final model of site {site!r}; its sites: {sites}")
        train = json.loads((folder / SITE_RECORD).read_text())["train"]
        return folder / SITE_MODEL_FILE, tuple(train["patch_size"])
    app = run / "server" / "simulate_job" / "app_server"
    client = json.loads((app / "config" / "config_fed_client.json").read_text())
    (executor,) = client["executors"]
    return app / "FL_global_model.pt", tuple(executor["executor"]["args"]["config"]["patch"])


def inference_config(network: dict, patch_size: Sequence[int]) -> dict:
    """MONAI's bundle configuration that segments like ``brats-fl predict`` with one model (module docstring)."""
    network_def = {"_target_": f"{network['class']}"} | network["args"]
    keys = "image"
    return {
        "imports": [
            "$from brats_fl.seg.bundle import bundle_datalist",
            "$from brats_fl.seg.bundle import case_name",
            "$import numpy",
        ],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "dataset_dir": "/data",
        "output_dir": "$@bundle_root + '/eval'",
        "datalist": "$bundle_datalist(@dataset_dir)",
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": keys, "image_only": True},
                {"_target_": "EnsureChannelFirstd", "keys": keys},
                {"_target_": "CropForegroundd", "keys": keys, "source_key": keys, "allow_smaller": True},
                {"_target_": "NormalizeIntensityd", "keys": keys, "nonzero": True, "channel_wise": True},
            ],
        },
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": list(patch_size),
            "sw_batch_size": 2,
            "overlap": 0.25,
            "mode": "gaussian",
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
                {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": keys},
                {"_target_": "brats_fl.seg.bundle.RegionsToLabelsd", "keys": "pred"},
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "output_dir": "@output_dir",
                    "output_postfix": "",
                    "separate_folder": False,
                    "resample": False,
                    "output_dtype": "$numpy.uint8",
                    "output_name_formatter": "$case_name",
                },
            ],
        },
        # MONAI Deploy and MONAI Label read network_def, preprocessing, inferer and postprocessing; ``run`` loops over
        # the cases itself, so that the bundle needs no pytorch-ignite (MONAI's evaluators do)
        "initialize": [
            "$torch.set_grad_enabled(False)",
            "$@network.load_state_dict(torch.load(@bundle_root + '/models/model.pt', map_location=@device))",
            "$@network.eval()",
        ],
        "run": [
            "$[@postprocessing(item | {'pred': @inferer(item['image'][None].to(@device), @network)[0].cpu()})"
            " for item in @dataset]"
        ],
    }


def metadata(source: Path, config: dict, patch_size: Sequence[int]) -> dict:
    """MONAI's bundle metadata: versions, what goes in and comes out, and where the model came from."""
    return {
        "schema": SCHEMA,
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by brats-fl {__version__}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"nibabel": nibabel.__version__, "brats-fl": __version__},
        "name": f"brats-fl {config['network']}",
        "task": "Brain tumour segmentation (BraTS): tumour core, whole tumour and enhancing tumour",
        "description": f"A {config['network']} trained by brats-fl; model file {source.name} of {source.parent}",
        "authors": "brats-fl",
        "copyright": "the model's owners",
        "data_source": "BraTS-style multi-parametric MRI (T1, T1ce, T2, FLAIR)",
        "data_type": "nibabel",
        "image_classes": f"4 channels: {', '.join(MODALITIES)}, each normalised on the brain",
        "label_classes": f"3 sigmoid channels {', '.join(REGIONS)}, written as each case's release labels",
        "pred_classes": "the case's release labels (2020: 1 NCR, 2 ED, 4 ET; 2023 and later: 1, 2, 3 ET)",
        "eval_metrics": {},
        "intended_use": "research",
        "references": [],
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "MR",
                    "num_channels": len(MODALITIES),
                    "spatial_shape": list(patch_size),
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": dict(enumerate(MODALITIES)),
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": len(REGIONS),
                    "spatial_shape": list(patch_size),
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": dict(enumerate(REGIONS)),
                }
            },
        },
        "brats_fl": {"model": str(source), "model_config": config, "python": platform.python_version()},
    }


def export_bundle(run: Path, out: Path, site: str | None = None) -> Path:
    """Write the MONAI bundle of ``run``'s model (``find_model``) into ``out``, which must not exist; refuses a global
    model whose personal layers no site trained (``brats_fl.seg.inference.untrained_layers``) and a model trained at
    another spacing."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: exists already, not overwritten")
    source, patch_size = find_model(run, site)
    trainer = load_for_inference(source, patch_size)
    if trainer.config.spacing is not None:
        raise ValueError(
            f"{source} was trained at {trainer.config.spacing} mm; the bundle segments on each case's own grid only"
        )
    model = trainer.model
    config = model.config()
    network = {"class": f"{type(model).__module__}.{type(model).__name__}"}
    network["args"] = {k: v for k, v in config.items() if k != "network"}
    (out / "configs").mkdir(parents=True)
    (out / "models").mkdir()
    torch.save(model.state_dict(), out / "models" / "model.pt")
    (out / "configs" / "inference.json").write_text(json.dumps(inference_config(network, patch_size), indent=1))
    (out / "configs" / "metadata.json").write_text(json.dumps(metadata(source, config, patch_size), indent=1))
    return out
