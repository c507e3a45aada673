"""Every BraTS release since 2020 is told from its file names, labelled by its own convention, checked on its grid."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from brats_fl.cli.main import main
from brats_fl.data.checks import check_cases
from brats_fl.data.datalist import load_datalist
from brats_fl.data.labels import REGIONS, labels_to_regions, regions_to_labels
from brats_fl.data.layout import SEG, find_cases
from brats_fl.data.partition import assign_sites, write_datalists

from tests.conftest import write_case

CASES = {
    "2020": "BraTS20_Training_{:03d}",
    "2021": "BraTS2021_{:05d}",
    "2023": "BraTS-GLI-{:05d}-000",
}


def _cohort(root: Path, release: str, n: int = 3, case: str | None = None) -> Path:
    for i in range(n):
        write_case(root, (case or CASES[release]).format(i), seed=i, release=release)
    return root


@pytest.mark.parametrize("release", sorted(CASES))
def test_each_release_is_recognised_from_its_names(tmp_path: Path, release: str):
    cases = find_cases(_cohort(tmp_path, release))
    assert {c.release for c in cases} == {release}
    assert all(all(c.files.values()) and not c.duplicates for c in cases)
    assert check_cases(cases) == []


def test_2023_names_map_to_the_package_modalities(tmp_path: Path):
    case = find_cases(_cohort(tmp_path, "2023", 1))[0]
    names = {k: p.name for k, p in case.files.items()}
    assert names == {
        "t1": "BraTS-GLI-00000-000-t1n.nii.gz",
        "t1ce": "BraTS-GLI-00000-000-t1c.nii.gz",
        "t2": "BraTS-GLI-00000-000-t2w.nii.gz",
        "flair": "BraTS-GLI-00000-000-t2f.nii.gz",
        SEG: "BraTS-GLI-00000-000-seg.nii.gz",
    }
    assert case.convention == "brats2023"


@pytest.mark.parametrize("sub", ["MEN", "MET", "PED", "SSA"])
def test_every_2023_sub_challenge(tmp_path: Path, sub: str):
    cases = find_cases(_cohort(tmp_path, "2023", 1, case=f"BraTS-{sub}-{{:05d}}-000"))
    assert cases[0].release == "2023"


def test_a_folder_mixing_releases_is_refused_naming_a_file_of_each(tmp_path: Path):
    _cohort(tmp_path / "a", "2021", 1)
    _cohort(tmp_path / "b", "2023", 1)
    with pytest.raises(ValueError, match="2 BraTS releases") as err:
        find_cases(tmp_path)
    assert "BraTS2021_00000_" in str(err.value) and "BraTS-GLI-00000-000-" in str(err.value)


def test_one_case_folder_mixing_names_is_refused(tmp_path: Path):
    folder = write_case(tmp_path, "BraTS-GLI-00000-000", release="2023")
    (folder / "BraTS-GLI-00000-000-t1n.nii.gz").rename(folder / "BraTS-GLI-00000-000_t1.nii.gz")
    with pytest.raises(ValueError, match="files of 2 BraTS releases"):
        find_cases(tmp_path)


def _relabel(case_folder: Path, change) -> Path:
    path = next(case_folder.glob("*seg.nii.gz"))
    img = nib.load(str(path))
    nib.save(nib.Nifti1Image(change(np.asarray(img.dataobj)).astype(np.uint8), img.affine), str(path))
    return path


def test_a_label_outside_the_release_is_refused_with_file_and_value(tmp_path: Path):
    _cohort(tmp_path, "2023", 1)
    path = _relabel(tmp_path / "BraTS-GLI-00000-000", lambda a: np.where(a == 2, 4, a))
    problems = [str(p) for p in check_cases(find_cases(tmp_path))]
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}: unknown label values {{4}}; BraTS 2023")
    assert "post-treatment" in problems[0]
    # declared as 2024 post-treatment glioma, 4 is the resection cavity
    assert check_cases(find_cases(tmp_path, "2024-gli-post")) == []


def test_et_label_of_another_release_is_refused(tmp_path: Path):
    _cohort(tmp_path, "2020", 1)
    path = _relabel(tmp_path / "BraTS20_Training_000", lambda a: np.where(a == 4, 3, a))
    assert [str(p) for p in check_cases(find_cases(tmp_path))] == [
        f"{path}: unknown label values {{3}}; BraTS 2020 labels are 1 NCR/NET, 2 ED, 4 ET"
    ]


def test_regions_are_the_same_in_every_convention():
    seg_2020 = np.array([0, 1, 2, 4], dtype=np.uint8).reshape(4, 1, 1)
    seg_2023 = np.array([0, 1, 2, 3], dtype=np.uint8).reshape(4, 1, 1)
    same = labels_to_regions(seg_2020, "brats2020")
    assert np.array_equal(labels_to_regions(seg_2023, "brats2023"), same)
    assert np.array_equal(labels_to_regions(seg_2023, "brats2024-post"), same)
    # a resection cavity (2024's 4) is in no region; in 2020 a 4 is enhancing tumour
    cavity = np.full((1, 1, 1), 4, np.uint8)
    assert not labels_to_regions(cavity, "brats2024-post").any()
    assert labels_to_regions(cavity, "brats2020")[REGIONS.index("ET")].all()


def test_predictions_are_written_in_the_case_convention():
    seg = np.array([0, 1, 2, 3], dtype=np.uint8).reshape(4, 1, 1)
    regions = labels_to_regions(seg, "brats2023")
    assert np.array_equal(regions_to_labels(regions, "brats2023"), seg)
    assert regions_to_labels(regions, "brats2020").ravel().tolist() == [0, 1, 2, 4]
    with pytest.raises(ValueError, match="unknown label convention"):
        regions_to_labels(regions, "brats2019")


def _regrid(case_folder: Path, affine: np.ndarray) -> None:
    for path in case_folder.glob("*.nii.gz"):
        img = nib.load(str(path))
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), str(path))


@pytest.mark.parametrize(
    ("affine", "found"),
    [
        (np.diag([-1.0, -1.0, 5.0, 1.0]), "voxel size 1.00x1.00x5.00 mm, orientation LPS"),
        (np.diag([1.0, 1.0, 1.0, 1.0]), "voxel size 1.00x1.00x1.00 mm, orientation RAS"),
    ],
)
def test_a_case_off_the_brats_grid_is_refused_unless_resampled(tmp_path: Path, affine, found):
    _cohort(tmp_path, "2021", 2)
    _regrid(tmp_path / "BraTS2021_00001", affine)
    problems = [str(p) for p in check_cases(find_cases(tmp_path))]
    assert len(problems) == 1 and found in problems[0] and "BraTS2021_00001_t1.nii.gz" in problems[0]
    assert "not the BraTS grid" in problems[0]
    assert check_cases(find_cases(tmp_path), grid_required=False) == []


def test_check_data_names_the_release_and_every_grid(tmp_path: Path, capsys):
    _cohort(tmp_path, "2023", 2)
    _regrid(tmp_path / "BraTS-GLI-00001-000", np.diag([-1.0, -1.0, 5.0, 1.0]))
    assert main(["check-data", str(tmp_path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("2 case(s) named as BraTS 2023 and later") and "3 ET" in out[0]
    assert out[1:3] == [
        "BraTS-GLI-00000-000: 24x24x16 voxels of 1.00x1.00x1.00 mm, LPS",
        "BraTS-GLI-00001-000: 24x24x16 voxels of 1.00x1.00x5.00 mm, LPS",
    ]
    assert main(["check-data", str(tmp_path), "--resample"]) == 0


def test_datalists_record_the_release_and_sites_on_two_releases_share_regions(tmp_path: Path):
    """A federation whose sites hold different releases: each datalist keeps its cases' release, so each site reads
    its labels by its own convention into the same three regions."""
    for release in ("2021", "2023"):
        root = _cohort(tmp_path / release / "data", release)
        write_datalists(
            root, assign_sites(find_cases(root), 1, "equal"), tmp_path / release / "lists", (0.34, 0.33, 0.33)
        )
        doc = json.loads((tmp_path / release / "lists" / "site-1.json").read_text())
        assert {e["release"] for s in ("training", "test") for e in doc[s]} == {release}
        datalist = load_datalist(tmp_path / release / "lists" / "site-1.json", root)
        item = datalist.items("training")[0]
        regions = labels_to_regions(
            np.asarray(nib.load(str(item["label"])).dataobj), "brats2020" if release == "2021" else "brats2023"
        )
        assert item["release"] == release and regions[REGIONS.index("ET")].any()


def test_a_datalist_without_releases_takes_them_from_the_file_names(tmp_path: Path):
    root = _cohort(tmp_path / "data", "2023")
    write_datalists(root, assign_sites(find_cases(root), 1, "equal"), tmp_path / "lists", (0.34, 0.33, 0.33))
    path = tmp_path / "lists" / "site-1.json"
    doc = json.loads(path.read_text())
    for split in ("training", "validation", "test"):
        for entry in doc[split]:
            del entry["release"]
    path.write_text(json.dumps(doc))
    assert load_datalist(path, root).items("training")[0]["release"] == "2023"


def test_the_pipelines_read_each_item_by_its_release(tmp_path: Path):
    """Items of two releases in one loader: each one's ET is its own release's label (4 in 2021, 3 in 2023)."""
    from brats_fl.data.loading import eval_loader

    items = []
    for release in ("2021", "2023"):
        root = _cohort(tmp_path / release, release, 1)
        case = find_cases(root)[0]
        items.append(
            {"case_id": case.case_id, "image": [case.files[m] for m in ("t1", "t1ce", "t2", "flair")],
             "label": case.files[SEG], "release": release}
        )  # fmt: skip
    for batch, item in zip(eval_loader(items), items, strict=True):
        seg = np.asarray(nib.load(str(item["label"])).dataobj)
        et = 4 if item["release"] == "2021" else 3
        assert int(batch["label"][0, REGIONS.index("ET")].sum()) == int((seg == et).sum()) > 0
