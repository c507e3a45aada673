"""The phantom writes every BraTS release: names, label values and metadata of that release, the same cases in each,
and in 2024's post-treatment data resection cavities (label 4) that belong to no region."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from brats_fl.cli.main import main
from brats_fl.data.checks import check_cases
from brats_fl.data.labels import REGIONS, convention, labels_to_regions
from brats_fl.data.layout import MODALITIES, PHANTOM_RELEASES, SEG, find_cases, release

SHAPE = ("48", "48", "32")
#: of 4 cases, the first has no cavity and the other three have one (CAVITY_SHARE 0.75)
SEED = "4"
POST = "2024-gli-post"


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same four phantom cases written by ``brats-fl phantom`` in every release it writes."""
    root = tmp_path_factory.mktemp("releases")
    for name in PHANTOM_RELEASES:
        args = ["phantom", "--out", str(root / name), "--release", name, "--cases", "4", "--sites", "2"]
        assert main([*args, "--seed", SEED, "--shape", *SHAPE]) == 0
    return {name: root / name for name in PHANTOM_RELEASES}


def _cases(root: Path, name: str):
    return find_cases(root, name if release(name).declared else None)


def _array(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def test_the_phantom_writes_every_release_but_the_catch_all():
    assert PHANTOM_RELEASES == ("2020", "2021", "2023", POST)


@pytest.mark.parametrize("name", PHANTOM_RELEASES)
def test_each_release_is_found_as_written_and_passes_the_checks(cohorts: dict[str, Path], name: str):
    rel = release(name)
    cases = _cases(cohorts[name], name)
    assert {c.release for c in cases} == {name}
    assert [c.case_id for c in cases] == [rel.case_format.format(i) for i in range(1, 5)]
    for case in cases:
        assert {k: p.name for k, p in case.files.items()} == {
            k: rel.file_name(case.case_id, k) for k in (*MODALITIES, SEG)
        }
    assert check_cases(cases) == []
    labels = convention(rel.convention)
    found = set().union(*(np.unique(_array(c.files[SEG])).tolist() for c in cases))
    assert found <= set(labels.labels) and labels.et in found
    # the metadata table names the release and holds its subject ids
    with (cohorts[name] / "name_mapping.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r[f"BraTS_{name[:4]}_subject_ID"] for r in rows] == [c.case_id for c in cases]
    assert {r["release"] for r in rows} == {name} and cases[0].attributes["release"] == name
    meta = json.loads((cohorts[name] / "phantom.json").read_text())
    assert meta["release"] == name and meta["declared"] == rel.declared


def test_the_same_cases_in_2020_2021_and_2023_differ_only_in_names_and_et_value(cohorts: dict[str, Path]):
    for before, after in zip(_cases(cohorts["2020"], "2020"), _cases(cohorts["2023"], "2023"), strict=True):
        for kind in MODALITIES:
            assert np.array_equal(_array(before.files[kind]), _array(after.files[kind]))
        seg_2020, seg_2023 = _array(before.files[SEG]), _array(after.files[SEG])
        assert np.array_equal(np.where(seg_2020 == 4, 3, seg_2020), seg_2023)
        assert np.array_equal(labels_to_regions(seg_2020, "brats2020"), labels_to_regions(seg_2023, "brats2023"))
    for before, after in zip(_cases(cohorts["2020"], "2020"), _cases(cohorts["2021"], "2021"), strict=True):
        assert np.array_equal(_array(before.files[SEG]), _array(after.files[SEG]))


def test_post_treatment_cavities_replace_part_of_the_core_and_are_in_no_region(cohorts: dict[str, Path]):
    """Regions read from the 2024 files are the generator's: the 2020 case's regions less its cavity, whose voxels
    (label 4) were core; the volumes in the metadata are those regions'. A case without a cavity is the 2023 case."""
    meta = {c["case_id"]: c for c in json.loads((cohorts[POST] / "phantom.json").read_text())["cases"]}
    pairs = zip(_cases(cohorts["2023"], "2023"), _cases(cohorts[POST], POST), strict=True)
    with_cavity = []
    for plain, post in pairs:
        seg_2023, seg = _array(plain.files[SEG]), _array(post.files[SEG])
        cavity = seg == 4
        with_cavity.append(bool(cavity.any()))
        assert meta[post.case_id]["rc_cm3"] == cavity.sum() / 1000
        regions = labels_to_regions(seg, "brats2024-post")
        assert not regions[:, cavity].any(), "a cavity voxel is in a region"
        core = (seg_2023 == 1) | (seg_2023 == 3)
        assert (cavity <= core).all(), "the cavity replaces core"
        intended = labels_to_regions(seg_2023, "brats2023") & ~cavity
        assert np.array_equal(regions, intended)
        volumes = [meta[post.case_id][f"{r.lower()}_cm3"] for r in REGIONS]
        assert volumes == [round(int(r.sum()) / 1000, 3) for r in regions]
        images = {k: _array(post.files[k]) for k in MODALITIES}
        if not cavity.any():
            assert np.array_equal(seg, seg_2023)
            assert all(np.array_equal(images[k], _array(plain.files[k])) for k in MODALITIES)
            continue
        # fluid: dark in FLAIR and T1ce, bright in T2, against the brain outside the tumour
        brain = (images["t1"] > 0) & (seg == 0)
        assert images["flair"][cavity].mean() < 0.5 * images["flair"][brain].mean()
        assert images["t1ce"][cavity].mean() < 0.6 * images["t1ce"][brain].mean()
        assert images["t2"][cavity].mean() > 1.5 * images["t2"][brain].mean()
    assert with_cavity == [False, True, True, True]


def test_post_treatment_phantom_is_checked_as_declared(cohorts: dict[str, Path], capsys):
    """Named as 2023, the cases with a cavity are refused with a hint; declared, the folder passes."""
    problems = [str(p) for p in check_cases(find_cases(cohorts[POST]))]
    assert len(problems) == 3 and all("unknown label values {4}" in p and "declare" in p for p in problems)
    assert main(["check-data", str(cohorts[POST]), "--release", POST]) == 0
    assert capsys.readouterr().out.startswith("4 case(s) named as BraTS 2024 post-treatment glioma")


def test_the_phantom_says_how_to_declare_what_it_wrote(tmp_path: Path, capsys):
    assert main(["phantom", "--out", str(tmp_path / "p"), "--release", POST, "--cases", "1", "--shape", *SHAPE]) == 0
    assert f"brats-fl check-data {tmp_path / 'p'} --release {POST}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("name", "share", "message"),
    [
        ("2023", "0.5", "--cavity-share makes no sense with release 2023: its labels (1 NETC, 2 SNFH, 3 ET) have no "
                        "resection cavity; only 2024-gli-post has"),
        ("2020", "0", "--cavity-share makes no sense with release 2020"),
        (POST, "1.5", "--cavity-share is the fraction of cases with a resection cavity, in [0, 1]; got 1.5"),
    ],
)  # fmt: skip
def test_a_cavity_share_without_cavities_is_refused_before_writing(tmp_path: Path, capsys, name, share, message):
    out = tmp_path / "p"
    assert main(["phantom", "--out", str(out), "--release", name, "--cavity-share", share, "--cases", "1"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_every_post_treatment_case_has_a_cavity_at_share_one(tmp_path: Path):
    out = tmp_path / "p"
    args = ["--release", POST, "--cavity-share", "1", "--cases", "3", "--seed", "0", "--shape", *SHAPE]
    assert main(["phantom", "--out", str(out), *args]) == 0
    assert all((_array(c.files[SEG]) == 4).any() for c in find_cases(out, POST))


def test_the_catch_all_release_is_no_phantom_choice(tmp_path: Path):
    with pytest.raises(SystemExit):
        main(["phantom", "--out", str(tmp_path / "p"), "--release", "other"])


def test_cavities_at_thick_slice_and_loose_or_tight_sites_stay_inside_the_lesion(tmp_path: Path):
    """The annotation knobs trace the tumour looser or tighter and thick slices blur it; the cavity stays inside the
    lesion the same site traces in 2023 (no cavity), in no region, and the metadata's volumes are still those of the
    regions read from the files."""
    from brats_fl.data.phantom import SiteKnobs, generate_cases

    knobs = [SiteKnobs("thick-tight", slice_mm=5, annotation_mm=-1), SiteKnobs("looser", annotation_mm=2)]
    records = generate_cases(tmp_path / "post", knobs, 0, (48, 48, 32), release=POST, cavity_share=1.0)
    generate_cases(tmp_path / "2023", knobs, 0, (48, 48, 32), release="2023")
    cases = find_cases(tmp_path / "post", POST)
    assert check_cases(cases) == []
    for case, plain, record in zip(cases, find_cases(tmp_path / "2023"), records, strict=True):
        seg, seg_2023 = _array(case.files[SEG]), _array(plain.files[SEG])
        cavity = seg == 4
        regions = labels_to_regions(seg, "brats2024-post")
        assert cavity.any() and (cavity <= (seg_2023 > 0)).all()
        assert np.array_equal(regions, labels_to_regions(seg_2023, "brats2023") & ~cavity)
        assert [record[f"{r.lower()}_cm3"] for r in REGIONS] == [round(int(r.sum()) / 1000, 3) for r in regions]
        assert record["rc_cm3"] == cavity.sum() / 1000
