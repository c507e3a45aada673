"""Partition invariants for every scheme: every case in exactly one place, relative paths, site sizes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from brats_fl.data.layout import Case
from brats_fl.data.partition import assign_sites, split_site, write_datalists

SCANNERS = ("clean", "gibbs", "spike")


def _cohort(root: Path, n: int = 30) -> list[Case]:
    cases = []
    for i in range(n):
        cid = f"BraTS20_Training_{i + 1:03d}"
        folder = root / cid
        files = {k: folder / f"{cid}_{k}.nii.gz" for k in ("t1", "t1ce", "t2", "flair", "seg")}
        attrs = {"scanner": SCANNERS[i % 3], "Grade": "HGG" if i % 4 else "LGG"}
        cases.append(Case(case_id=cid, folder=folder, files=files, attributes=attrs))
    return cases


def _ids(parts):
    return [c.case_id for p in parts.values() for c in p]


def _entries(doc: dict) -> list[dict]:
    return [e for split in ("training", "validation", "test") for e in doc[split]]


@pytest.mark.parametrize(
    "scheme,kwargs",
    [
        ("equal", {}),
        ("unequal", {}),
        ("unequal", {"fractions": [0.7, 0.2, 0.1]}),
        ("dirichlet", {"alpha": 0.3, "attribute": "scanner"}),
        ("dirichlet", {"alpha": 1.0, "attribute": "Grade"}),
        ("hybrid", {"alpha": 0.3, "attribute": "scanner"}),
        ("natural", {"attribute": "scanner"}),
    ],
)
def test_every_case_in_exactly_one_site(tmp_path, scheme, kwargs):
    cases = _cohort(tmp_path)
    parts = assign_sites(cases, 3, scheme, seed=1, **kwargs)
    assert list(parts) == ["site-1", "site-2", "site-3"]
    ids = _ids(parts)
    assert sorted(ids) == sorted(c.case_id for c in cases) and len(set(ids)) == len(ids)
    assert all(len(p) >= 3 for p in parts.values())


def test_equal_sizes_and_unequal_fractions(tmp_path):
    cases = _cohort(tmp_path)
    assert [len(p) for p in assign_sites(cases, 3, "equal").values()] == [10, 10, 10]
    assert [len(p) for p in assign_sites(cases, 3, "unequal").values()] == [15, 10, 5]
    assert [len(p) for p in assign_sites(cases, 3, "unequal", fractions=[0.6, 0.3, 0.1]).values()] == [18, 9, 3]


def test_natural_partition_gives_one_scanner_per_site(tmp_path):
    parts = assign_sites(_cohort(tmp_path), 3, "natural", attribute="scanner")
    assert [{c.attributes["scanner"] for c in p} for p in parts.values()] == [{"clean"}, {"gibbs"}, {"spike"}]


def test_dirichlet_skews_and_hybrid_keeps_every_stratum(tmp_path):
    cases = _cohort(tmp_path, 60)
    skewed = assign_sites(cases, 3, "dirichlet", seed=3, alpha=0.1, attribute="scanner")
    shares = [
        max(np.unique([c.attributes["scanner"] for c in p], return_counts=True)[1]) / len(p) for p in skewed.values()
    ]
    assert max(shares) > 0.6  # a small alpha concentrates a scanner at a site
    hybrid = assign_sites(cases, 3, "hybrid", seed=3, alpha=0.1, attribute="scanner")
    assert all({c.attributes["scanner"] for c in p} == set(SCANNERS) for p in hybrid.values())


def test_same_seed_same_partition(tmp_path):
    cases = _cohort(tmp_path)
    a = assign_sites(cases, 3, "dirichlet", seed=5, attribute="scanner")
    b = assign_sites(cases, 3, "dirichlet", seed=5, attribute="scanner")
    assert _ids(a) == _ids(b)


def test_csv_partition(tmp_path):
    cases = _cohort(tmp_path, 9)
    path = tmp_path / "partitioning.csv"
    rows = [f"{1 + i // 3},{c.case_id}" for i, c in enumerate(cases)]
    path.write_text("Partition_ID,Subject_ID\n" + "\n".join(rows) + "\n")
    parts = assign_sites(cases, 3, "csv", csv_path=path)
    assert [[c.case_id for c in p] for p in parts.values()] == [
        [c.case_id for c in cases[i : i + 3]] for i in (0, 3, 6)
    ]
    path.write_text(path.read_text() + "1,BraTS20_Training_999\n")
    with pytest.raises(ValueError, match="BraTS20_Training_999"):
        assign_sites(cases, 3, "csv", csv_path=path)


def test_bad_requests_are_refused(tmp_path):
    cases = _cohort(tmp_path)
    with pytest.raises(ValueError, match="unknown scheme"):
        assign_sites(cases, 3, "random")
    with pytest.raises(ValueError, match="'hospital' is unknown"):
        assign_sites(cases, 3, "dirichlet", attribute="hospital")
    with pytest.raises(ValueError, match="need 3 positive fractions"):
        assign_sites(cases, 3, "unequal", fractions=[1, 2])


def test_train_val_test_split_disjoint():
    cases = list(range(10))
    splits = split_site(cases, (0.6, 0.2, 0.2), np.random.default_rng(0))
    assert [len(v) for v in splits.values()] == [6, 2, 2]
    assert sorted(sum(splits.values(), [])) == cases


@pytest.mark.parametrize(
    ("split", "sizes"),
    [
        ((0.6, 0.2, 0.2), [2, 1, 1]),  # every part asked for gets a case
        ((0.75, 0.25, 0), [3, 1, 0]),  # no test split, as asked: not 2/1/1
        ((1, 0, 0), [4, 0, 0]),
        ((0, 0, 1), [0, 0, 4]),  # an evaluation list: rounding never puts a case in training
        ((0, 0.5, 0.5), [0, 2, 2]),
    ],
)
def test_a_split_of_zero_stays_empty(split: tuple, sizes: list[int]):
    for n, expected in ((4, sizes), (5, None)):
        parts = split_site(list(range(n)), split, np.random.default_rng(0))
        got = [len(v) for v in parts.values()]
        assert sum(got) == n
        assert [size == 0 for size in got] == [fraction == 0 for fraction in split]
        assert expected is None or got == expected


def test_datalists_relative_pooled_and_not_overwritten(tmp_path):
    cases = _cohort(tmp_path / "data")
    parts = assign_sites(cases, 3, "equal", seed=0)
    written = write_datalists(tmp_path / "data", parts, tmp_path / "lists")
    docs = {name: json.loads(p.read_text()) for name, p in written.items()}
    site_ids = []
    for name in ("site-1", "site-2", "site-3"):
        for split in ("training", "validation", "test"):
            for entry in docs[name][split]:
                assert not Path(entry["label"]).is_absolute() and entry["label"].startswith(entry["case_id"])
                site_ids.append((split, entry["case_id"]))
    assert len(site_ids) == len(set(c for _, c in site_ids)) == 30
    pooled = [(s, e["case_id"]) for s in ("training", "validation", "test") for e in docs["site-All"][s]]
    assert sorted(pooled) == sorted(site_ids)
    with pytest.raises(FileExistsError, match="not overwritten"):
        write_datalists(tmp_path / "data", parts, tmp_path / "lists")


def test_partial_annotations_are_recorded_per_entry_and_checked(tmp_path):
    cases = _cohort(tmp_path / "data", 12)
    parts = assign_sites(cases, 3, "equal", seed=0)
    annotated = {"site-1": ["WT"], "site-3": ["ET", "TC"]}
    written = write_datalists(tmp_path / "data", parts, tmp_path / "lists", annotated=annotated)
    docs = {name: json.loads(path.read_text()) for name, path in written.items()}
    assert all(e["annotated"] == ["WT"] for e in _entries(docs["site-1"]))
    assert all("annotated" not in e for e in _entries(docs["site-2"]))  # annotates every region
    assert all(e["annotated"] == ["TC", "ET"] for e in _entries(docs["site-3"]))  # REGIONS order
    assert sum("annotated" in e for e in _entries(docs["site-All"])) == 8
    with pytest.raises(ValueError, match="unknown site"):
        write_datalists(tmp_path / "data", parts, tmp_path / "other", annotated={"site-9": ["WT"]})
    with pytest.raises(ValueError, match="subset"):
        write_datalists(tmp_path / "data", parts, tmp_path / "third", annotated={"site-1": ["edema"]})


def test_partition_cli_honours_a_zero_split_and_says_what_it_means(good_cohort: Path, tmp_path: Path, capsys):
    from brats_fl.cli.main import main

    out = tmp_path / "lists"
    assert main(["partition", str(good_cohort), "--sites", "2", "--split", "0.75", "0.25", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "site-1: train/val/test 2/1/0" in printed and "site-All: train/val/test 4/2/0" in printed
    assert "no test split, as asked: `brats-fl run` refuses these datalists" in printed
    assert json.loads((out / "site-2.json").read_text())["test"] == []
