"""Training at a coarser spacing: inference resamples back, so predictions are written and scored on each case's own
grid; HD95 reads the voxel size from the header; a model keeps its spacing; the disk cache never serves a stale
pipeline."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from brats_fl.data import loading
from brats_fl.data.layout import MODALITIES, SEG, find_cases
from brats_fl.data.loading import eval_loader, eval_transforms, train_loader
from brats_fl.jobs.catalogue import JobParams, build
from brats_fl.seg.inference import load_for_inference, predict_case, trained_spacing
from brats_fl.seg.trainer import TrainConfig, Trainer
from brats_fl.settings.params import by_name
from brats_fl.version import code_sha256
from conftest import write_case
from monai.transforms import Spacing

TINY = {"channels": [4, 8], "strides": [2], "num_res_units": 1, "init_seed": 0}


def _trainer(spacing: float | None) -> Trainer:
    return Trainer(TrainConfig.from_dict({"model": TINY, "patch_size": [16, 16, 16], "threads": 1, "spacing": spacing}))


def _items(root: Path) -> list[dict]:
    """Datalist items (``brats_fl.data.datalist``) of every case under ``root``."""
    return [
        {"image": [c.files[m] for m in MODALITIES], "label": c.files[SEG], "case_id": c.case_id}
        for c in find_cases(root)
    ]


def _oracle(trainer: Trainer, monkeypatch: pytest.MonkeyPatch, truth_at: dict, shift: int = 0) -> None:
    """Make ``trainer``'s network answer with the true regions (shifted by ``shift`` voxels along z) on the grid it
    is asked about: the perfect prediction at that grid."""

    def sliding(image: torch.Tensor) -> torch.Tensor:
        truth = truth_at[tuple(image.shape[2:])]
        return (torch.roll(truth, shift, dims=-1)[None].float() * 2 - 1) * 20

    monkeypatch.setattr(trainer, "_sliding", sliding)


def _big_tumour_case(root: Path) -> dict:
    """A 64 x 64 x 48 case at 1 mm whose regions are a few voxels of 2 mm thick (a BraTS tumour's scale), unlike
    ``write_case``'s, whose enhancing shell is thinner than a 2 mm voxel."""
    folder = write_case(root, "BraTS20_Training_001", shape=(64, 64, 48))
    radius = np.sqrt(((np.indices((64, 64, 48)) - np.array([32, 32, 24])[:, None, None, None]) ** 2).sum(0))
    seg = np.select([radius < 7, radius < 11, radius < 16], [1, 4, 2], 0).astype(np.uint8)
    nib.save(nib.Nifti1Image(seg, np.diag([-1.0, -1.0, 1.0, 1.0])), str(folder / f"{folder.name}_seg.nii.gz"))
    return _items(root)[0]


def test_a_perfect_prediction_at_2_mm_scores_near_1_on_the_full_grid(tmp_path, monkeypatch):
    item = _big_tumour_case(tmp_path / "data")
    case = eval_transforms()({"image": [str(p) for p in item["image"]], "label": str(item["label"])})
    coarse = Spacing(pixdim=(2.0,) * 3, mode="nearest")(case["label"])
    assert coarse.shape[1:] != case["label"].shape[1:]  # the network really sees another grid
    trainer = _trainer(2.0)
    _oracle(trainer, monkeypatch, {tuple(coarse.shape[1:]): coarse.as_tensor()})
    logits = trainer.infer_case(case["image"])
    assert logits.shape == case["label"].shape  # back on the label's own (cropped, full-resolution) grid
    scores = trainer.evaluate(eval_loader([item]))
    assert min(scores[f"dice_{r}"] for r in ("WT", "TC", "ET")) > 0.9, scores
    # the same oracle at the files' own grid is exact: the loss above is the 2 mm grid's, nothing else
    native = _trainer(None)
    _oracle(native, monkeypatch, {tuple(case["label"].shape[1:]): case["label"].as_tensor()})
    assert native.evaluate(eval_loader([item]))["dice_mean"] == pytest.approx(1.0)


def test_hd95_is_in_mm_of_the_header_spacing(tmp_path: Path, monkeypatch):
    folder = write_case(tmp_path / "data", "BraTS20_Training_001", shape=(32, 32, 24))
    for path in folder.glob("*.nii.gz"):  # voxels of 1 x 1 x 3 mm
        img = nib.load(str(path))
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), np.diag([-1.0, -1.0, 3.0, 1.0])), str(path))
    (item,) = _items(folder.parent)
    label = eval_transforms()({"image": [str(p) for p in item["image"]], "label": str(item["label"])})["label"]
    trainer = _trainer(None)
    _oracle(trainer, monkeypatch, {tuple(label.shape[1:]): label.as_tensor()}, shift=1)
    scores = trainer.evaluate(eval_loader([item]))
    assert scores["hd95_WT"] == pytest.approx(3.0)  # one slice off along z is 3 mm, not 1


def test_predict_writes_the_input_grid_at_the_spacing_the_model_was_trained_at(tmp_path: Path):
    folder = write_case(tmp_path / "data", "BraTS20_Training_001", shape=(40, 36, 30))
    coarse, native = tmp_path / "coarse.pt", tmp_path / "native.pt"
    _trainer(2.0).save(coarse)
    _trainer(None).save(native)
    assert (trained_spacing(coarse), trained_spacing(native)) == (2.0, None)
    assert load_for_inference(coarse, (16, 16, 16)).config.spacing == 2.0
    out = predict_case(coarse, folder, tmp_path / "pred.nii.gz", patch_size=(16, 16, 16), threads=1)
    written, source = nib.load(str(out)), nib.load(str(folder / f"{folder.name}_t1.nii.gz"))
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine)
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2, 4}


def test_a_flare_global_model_takes_the_spacing_of_its_job(tmp_path: Path):
    app = tmp_path / "app_server"
    build("brats_fedavg", JobParams(spacing=2.0)).export(str(tmp_path / "job"))
    (config,) = (tmp_path / "job").rglob("config_fed_client.json")
    (app / "config").mkdir(parents=True)
    (app / "config" / "config_fed_client.json").write_text(config.read_text())
    torch.save({"model": {}}, app / "FL_global_model.pt")
    assert trained_spacing(app / "FL_global_model.pt") == 2.0


def test_spacing_and_cross_site_are_checked_and_sent():
    assert JobParams(spacing=2.0).client_config()["spacing"] == 2.0
    assert JobParams().client_config()["spacing"] is None
    for bad in (0, -1.0, "2"):
        with pytest.raises(ValueError, match="spacing"):
            JobParams(spacing=bad)
    with pytest.raises(ValueError, match="cross_site"):
        JobParams(cross_site="sites")
    with pytest.raises(ValueError, match="spacing"):
        TrainConfig.from_dict({"spacing": 0.0})
    assert by_name("cross_site").site is None  # the server's choice alone


def _cse(job: Path) -> dict:
    (server,) = job.rglob("config_fed_server.json")
    doc = json.loads(server.read_text())
    return next(w for w in doc["workflows"] if w["path"].endswith("CrossSiteModelEval"))["args"]


def test_cross_site_global_sends_no_submit_model_task(tmp_path: Path):
    build("brats_fedavg", JobParams(cross_site="global")).export(str(tmp_path / "global"))
    build("brats_fedavg", JobParams(cross_site="all")).export(str(tmp_path / "all"))
    assert _cse(tmp_path / "global")["submit_model_task_name"] == ""
    assert "submit_model_task_name" not in _cse(tmp_path / "all")  # FLARE's default: every site submits


@pytest.mark.parametrize(
    ("job", "mode"), [("brats_fedavg", None), ("brats_fedper", None), ("brats_fedavg_ft", ""), ("brats_ditto", "")]
)
def test_cross_site_auto_scores_the_global_model_only_where_sites_end_with_another(tmp_path: Path, job, mode):
    """``auto`` (the default): FedAvg's and FedPer's sites end with the federation's model (and their own layers),
    which their own scores already score; fine-tuning and Ditto end with another, so the global model is scored too."""
    build(job, JobParams()).export(str(tmp_path / job))
    config = json.loads(next((tmp_path / job).rglob("config_fed_server.json")).read_text())
    evaluations = [w for w in config["workflows"] if w["path"].endswith("CrossSiteModelEval")]
    if mode is None:
        assert not evaluations
    else:
        assert evaluations[0]["args"]["submit_model_task_name"] == mode


def _cache_files(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.pt")}


def _written(folder: Path) -> dict[str, int]:
    """Each cache file and when it was written: a file that could not be read back is deleted and written again."""
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.pt")}


def test_the_disk_cache_is_reused_only_for_the_same_files_and_pipeline(good_cohort: Path, tmp_path: Path):
    items, cache = _items(good_cohort)[:2], tmp_path / "cache"

    def batches(spacing: float | None, cache_dir: Path | None) -> list[torch.Tensor]:
        loader = train_loader(items, (16, 16, 16), 2, 2, seed=3, fg_ratio=0.5, spacing=spacing, cache_dir=cache_dir)
        return [b["image"] for b in loader]

    first = batches(None, cache)
    written = _written(cache)
    assert len(written) == len(items)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MONAI warns of a cache file it cannot read, then recomputes it
        again = batches(None, cache)  # read back from disk: the same batches as computed, no file written again
    assert _written(cache) == written
    eval_loader(items, cache)
    evaluation = _written(cache)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eval_loader(items, cache)  # evaluation's cases (MetaTensors with their affines) read back too
    assert _written(cache) == evaluation
    for name in set(evaluation) - set(written):
        (cache / name).unlink()
    for a, b, c in zip(first, again, batches(None, None), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    batches(2.0, cache)  # another spacing is another pipeline
    assert len(_cache_files(cache)) == 2 * len(items)
    label = Path(items[0]["label"])
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))  # a rewritten file
    batches(None, cache)
    assert len(_cache_files(cache)) == 2 * len(items) + 1
    eval_loader(items, cache)
    assert len(_cache_files(cache)) == 2 * len(items) + 1 + len(items)  # evaluation's pipeline is its own


def test_a_cached_case_is_the_same_bits_whatever_the_thread_count_of_the_process_that_prepared_it(
    tiny_phantom: Path,
):
    """A benchmark's runs share one disk cache, filled by whichever run comes first: centralized training with 2
    threads or a site of a 3-site job with 1. z-scoring sums over the brain, which torch splits among threads; the
    cases must come out the same either way, or the same seed trains another model depending on the order of runs."""
    items = _items(tiny_phantom)[:2]
    threads = torch.get_num_threads()
    prepared = {}
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            evaluation = [b["image"] for b in eval_loader(items)]
            training = [b["image"] for b in train_loader(items, (32, 32, 32), 2, 2, seed=3, fg_ratio=0.5)]
            prepared[count] = evaluation + training
            assert torch.get_num_threads() == count  # preparing a case leaves the process's own count alone
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(prepared[1], prepared[2], strict=True))


def test_validation_at_the_training_spacing_is_scored_there_without_resampling(tmp_path: Path, monkeypatch):
    """The validation loader resamples image and label to the training spacing, so a round's validation never pays
    for resampling back; the test loader keeps each case's own grid."""
    write_case(tmp_path, "BraTS20_Training_001", shape=(32, 32, 24))
    items = _items(tmp_path)
    coarse = next(iter(eval_loader(items, spacing=2.0)))
    native = next(iter(eval_loader(items)))
    assert tuple(coarse["label"].shape[2:]) == tuple(-(-n // 2) for n in native["label"].shape[2:])
    trainer = _trainer(2.0)
    calls = []
    monkeypatch.setattr("brats_fl.seg.trainer.ResampleToMatch.__call__", lambda *a, **k: calls.append(a))
    assert trainer.infer_case(coarse["image"][0]).shape[1:] == coarse["image"].shape[2:]
    assert calls == []


def test_the_cache_key_follows_the_data_code_not_the_rest_of_the_package(tmp_path: Path, monkeypatch):
    """A change to training or the jobs keeps a benchmark's cache of decoded cases; a change to the data package's
    code starts a new one."""
    package = Path(loading.__file__).resolve().parents[1]
    copy = Path(shutil.copytree(package, tmp_path / "brats_fl", ignore=shutil.ignore_patterns("__pycache__")))
    monkeypatch.setattr(loading, "PIPELINE_CODE", copy / "data")

    def key() -> bytes:
        code_sha256.cache_clear()
        return loading._pipeline_hash({"pipeline": "eval", "spacing": 2.0})([])

    before = key()
    with (copy / "seg" / "trainer.py").open("a") as fh:
        fh.write("# a change to training\n")
    assert key() == before
    with (copy / "data" / "loading.py").open("a") as fh:
        fh.write("# a change to the pipelines\n")
    assert key() != before
