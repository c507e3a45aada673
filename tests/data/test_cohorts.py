"""The named partitions: which knob differs by site in each, the shares, and build_partition's resumability."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from brats_fl.cli.data import PARTITION_NAMES
from brats_fl.data.cohorts import PARTITIONS, build_partition
from brats_fl.data.phantom import generate_cases
from brats_fl.site.config import ENV_VAR, resolve

SHAPE = (40, 40, 32)
BIOLOGY = ("size_scale", "lgg_share")
IMAGING = ("scanner", "slice_mm")


def _site_knobs(name: str, cases: int) -> dict[int, Counter]:
    """Per site, how many of its cases have each knob set."""
    partition = PARTITIONS[name]
    out: dict[int, Counter] = {}
    for site, knob in zip(partition.sites(cases), partition.knobs(cases), strict=True):
        out.setdefault(site, Counter())[tuple(sorted(asdict(knob).items()))] += 1
    return out


def _differs(name: str, field: str) -> bool:
    values = {getattr(k, field) for k in PARTITIONS[name].strata}
    return len(values) > 1 and PARTITIONS[name].deal is None


def test_partition_names_and_sites():
    assert list(PARTITIONS) == ["iid", "quantity", "feature", "label", "mixed", "scanners"]
    assert tuple(PARTITIONS) == PARTITION_NAMES, "the command line's list must follow the partitions"
    for name in PARTITIONS:
        sites = 4 if name == "scanners" else 3
        assert sorted(set(PARTITIONS[name].sites(36))) == list(range(sites)) and PARTITIONS[name].n_sites == sites


def test_shares_and_which_knobs_differ_by_site():
    sizes = {name: Counter(p.sites(36)) for name, p in PARTITIONS.items()}
    for name in ("iid", "feature", "label"):
        assert sorted(sizes[name].values()) == [12, 12, 12], name
    for name in ("quantity", "mixed"):
        assert [sizes[name][k] for k in range(3)] == [18, 12, 6], name  # 1/2, 1/3, 1/6
    for name in ("iid", "quantity"):  # every site the same mix of knobs, in proportion to its size
        mixes = _site_knobs(name, 36)
        normalised = [{k: v / sum(c.values()) for k, v in c.items()} for c in mixes.values()]
        assert all(m == normalised[0] for m in normalised), name
        assert len(normalised[0]) > 1, "the mix holds several kinds of hospital"
    for field in IMAGING:
        assert _differs("feature", field) and not _differs("label", field)
    for field in BIOLOGY:
        assert not _differs("feature", field) and not _differs("label", field) and _differs("mixed", field)
    assert _differs("label", "annotation_mm") and not _differs("feature", "annotation_mm")
    # HyperSeg's setup: one scanner per site in equal shares, nothing else differs
    assert sorted(Counter(PARTITIONS["scanners"].sites(36)).values()) == [9, 9, 9, 9]
    assert _differs("scanners", "scanner")
    assert not any(_differs("scanners", f) for f in (*BIOLOGY, "slice_mm", "annotation_mm"))
    assert {k.scanner for k in PARTITIONS["scanners"].strata} == {"clean", "gibbs_strong", "gibbs_weak", "spike"}
    assert all(_differs("mixed", f) for f in (*IMAGING, "annotation_mm"))


def _case_images(root: Path) -> tuple[np.ndarray, np.ndarray]:
    folder = next(p for p in root.iterdir() if p.is_dir())
    load = lambda kind: np.asarray(nib.load(str(folder / f"{folder.name}_{kind}.nii.gz")).dataobj)  # noqa: E731
    return load("t1").astype(np.float32), load("seg")


def test_feature_sites_differ_in_images_not_labels_and_label_sites_the_reverse(tmp_path: Path):
    """The same underlying case (same number and seed) at each site of ``feature`` and of ``label``."""
    seen = {}
    for name in ("feature", "label"):
        for k, knob in enumerate(PARTITIONS[name].strata):
            generate_cases(tmp_path / f"{name}{k}", [knob], seed=2, shape=(64, 64, 48))
            seen[name, k] = _case_images(tmp_path / f"{name}{k}")
    feature = [seen["feature", k] for k in range(3)]
    means = [img[img > 0].mean() for img, _ in feature]
    assert max(means) > 1.2 * min(means), "scanners give the sites different intensities"
    assert np.array_equal(feature[0][1], feature[2][1]), "1 mm sites: the same labels whatever the scanner"
    wt = [int((seg > 0).sum()) for _, seg in feature]
    # 5 mm slices: traced at half height on the resampled image, a tumour a dozen voxels wide on this small grid
    # loses or gains a little at its top and bottom
    assert abs(wt[1] - wt[0]) < 0.25 * wt[0]
    label = [seen["label", k] for k in range(3)]
    assert all(np.array_equal(label[0][0], img) for img, _ in label), "label skew leaves the images alone"
    protocol, looser, tighter = ((seg > 0).sum() for _, seg in label)
    assert tighter < protocol < looser


def test_build_partition_writes_checks_reuses_and_refuses(tmp_path: Path, monkeypatch):
    out = tmp_path / "bench"
    (out / "cohorts" / "fets.partial").mkdir(parents=True)  # left over by an interrupted run
    lines: list[str] = []
    config = build_partition("quantity", out, cases=18, seed=1, shape=SHAPE, log=lines.append)
    assert any("half-written cohort" in line for line in lines)
    doc = json.loads(config.read_text())
    assert doc["threads"] == 1 and {"data_root", "datalist_dir", "state_dir"} <= set(doc)
    monkeypatch.setenv(ENV_VAR, str(config))
    sizes = []
    for site in ("site-1", "site-2", "site-3"):
        lists = json.loads(resolve(site).datalist.read_text())
        assert all(lists[s] for s in ("training", "validation", "test")), f"{site} lacks a split"
        sizes.append(sum(len(lists[s]) for s in ("training", "validation", "test")))
    assert sizes == [9, 6, 3]
    pooled = json.loads(resolve("site-All", "site-All").datalist.read_text())
    assert len(pooled["test"]) >= 0.4 * 18, "half the cases are for testing"
    mapping = (resolve("site-1").data_root / "name_mapping.csv").read_text().splitlines()[0]
    assert all(k in mapping for k in ("scanner", "slice_mm", "annotation_mm", "Grade", "wt_cm3"))

    cohort_json = out / "cohorts" / "fets" / "cohort.json"
    stamp = cohort_json.stat().st_mtime_ns
    lines.clear()
    assert build_partition("quantity", out, cases=18, seed=1, shape=SHAPE, log=lines.append) == config
    assert lines == [f"reusing partition {out / 'quantity'}"]
    build_partition("mixed", out, cases=18, seed=1, shape=SHAPE, log=lines.append)
    assert any("reusing cohort" in line for line in lines), "mixed deals out the cohort quantity made"
    assert cohort_json.stat().st_mtime_ns == stamp

    with pytest.raises(FileExistsError, match="seed"):
        build_partition("quantity", out, cases=18, seed=2, shape=SHAPE, log=lines.append)
    with pytest.raises(FileExistsError, match="other settings"):
        build_partition("iid", out, cases=24, seed=1, shape=SHAPE, log=lines.append)
    (out / "mixed" / "partition.json").unlink()  # as if interrupted before the end, or a fresh clone of results
    (out / "mixed" / "datalists" / "stale.json").write_text("{}")
    (out / "mixed" / "untrained.json").write_text("{}")  # a benchmark's own file, committed with its results
    lines.clear()
    build_partition("mixed", out, cases=18, seed=1, shape=SHAPE, log=lines.append)
    assert "half-written partition" in lines[0]
    assert not (out / "mixed" / "datalists" / "stale.json").exists(), "the datalists are written afresh"
    assert (out / "mixed" / "untrained.json").read_text() == "{}", "files it did not write are left alone"


def test_build_partition_refuses_bad_requests(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown partition"):
        build_partition("natural", tmp_path, cases=18)
    with pytest.raises(ValueError, match="at least 18"):
        build_partition("iid", tmp_path, cases=12)
    with pytest.raises(ValueError, match="sum to 1"):
        build_partition("iid", tmp_path, cases=18, split=(0.5, 0.5, 0.5))


def test_the_four_scanner_partition_has_four_sites_of_one_scanner_each(tmp_path: Path, monkeypatch):
    config = build_partition("scanners", tmp_path, cases=20, seed=1, shape=SHAPE, log=lambda _: None)
    monkeypatch.setenv(ENV_VAR, str(config))
    sites = [f"site-{k}" for k in range(1, 5)]
    lists = {s: json.loads(resolve(s).datalist.read_text()) for s in sites}
    assert [sum(len(v[k]) for k in ("training", "validation", "test")) for v in lists.values()] == [5, 5, 5, 5]
    record = json.loads((tmp_path / "scanners" / "partition.json").read_text())
    assert [list(record["site_mix"][s].values()).count(5) for s in sites] == [1, 1, 1, 1]
    assert [next(k for k, n in record["site_mix"][s].items() if n) for s in sites] == [
        "clean", "gibbs-0.5", "gibbs-0.2", "kspace-spike"]  # fmt: skip
