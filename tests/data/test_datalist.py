"""A datalist of the wrong shape, or naming files outside the site's data root, is refused naming the datalist and
every bad entry; the same code reads it at a site before training (``brats_fl.site.client``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from brats_fl.data import jsonfile
from brats_fl.data.checks import DataError
from brats_fl.data.datalist import load_datalist
from brats_fl.data.layout import MODALITIES

from tests.conftest import write_case

CASE = "BraTS20_Training_001"


def _entry(case: str = CASE) -> dict:
    return {
        "case_id": case,
        "image": [f"{case}/{case}_{m}.nii.gz" for m in MODALITIES],
        "label": f"{case}/{case}_seg.nii.gz",
    }


@pytest.fixture
def site(tmp_path: Path) -> tuple[Path, Path]:
    """A data root with one case, and a valid datalist for it outside the root."""
    root = tmp_path / "data"
    write_case(root, CASE)
    path = tmp_path / "site-1.json"
    path.write_text(json.dumps({"training": [_entry()], "validation": [], "test": []}))
    return root, path


def _refusal(root: Path, path: Path, doc: object) -> str:
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError) as err:
        load_datalist(path, root)
    assert all(p.path == path for p in err.value.problems)
    return str(err.value)


def test_valid_datalist_loads(site):
    root, path = site
    datalist = load_datalist(path, root)
    assert [i["case_id"] for i in datalist.items("training")] == [CASE]
    assert datalist.items("training")[0]["label"] == root.resolve() / CASE / f"{CASE}_seg.nii.gz"


def test_a_site_being_tuned_checks_no_test_file(site):
    """``brats-fl tune`` removes the test files: the checks of the other splits pass, the full checks name them."""
    root, path = site
    write_case(root, "BraTS20_Training_002")
    path.write_text(json.dumps({"training": [_entry()], "validation": [], "test": [_entry("BraTS20_Training_002")]}))
    for f in (root / "BraTS20_Training_002").iterdir():
        f.unlink()
    assert load_datalist(path, root, checked=("training", "validation")).items("test")[0]["case_id"].endswith("002")
    with pytest.raises(DataError, match="BraTS20_Training_002"):
        load_datalist(path, root)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: [d], "expected an object with ['training', 'validation', 'test'], got a list"),
        (lambda d: d | {"test": {"a": 1}}, "test: expected a list of cases, got an object"),
        (lambda d: d | {"training": ["case"]}, "training[0]: expected a case (an object with"),
        (lambda d: d | {"training": [{"case_id": CASE}]}, f"[0] (case '{CASE}'): missing key(s) ['image', 'label']"),
        (lambda d: d | {"training": [_entry() | {"case_id": 7}]}, "case_id must be a non-empty string, got 7"),
        (lambda d: d | {"training": [_entry() | {"image": ["a", "b"]}]}, "image must be a list of 4 paths"),
        (lambda d: d | {"training": [_entry() | {"label": 3.5}]}, "path 3.5 is not a non-empty string"),
        (lambda d: d | {"training": [_entry() | {"label": "../../etc/passwd"}]}, "outside the data root"),
        (lambda d: d | {"training": [_entry() | {"label": "/etc/passwd"}]}, "resolves to /etc/passwd, outside"),
        (lambda d: d | {"training": [_entry() | {"label": "a\0b"}]}, "holds a NUL character"),
        (lambda d: d | {"training": [_entry() | {"label": "x" * 5000}]}, "cannot be resolved: [Errno 36]"),
        (lambda d: d | {"training": [_entry() | {"annotated": "WT"}]}, "annotated must be a list of region names"),
        (lambda d: d | {"training": [_entry() | {"annotated": [["WT"]]}]}, "annotated must be a list of region names"),
        (lambda d: d | {"training": [_entry() | {"release": 2021}]}, "release must be a string, got a number"),
        (lambda d: d | {"training": [_entry() | {"release": "2099"}]}, "unknown BraTS release '2099'"),
        (lambda d: d | {"site": ["site-1"]}, "site must be a string, got a list"),
        (lambda d: {"training": []}, "missing split(s) ['validation', 'test']"),
    ],
)
def test_datalist_of_the_wrong_shape_is_refused_naming_it(site, change, message: str):
    root, path = site
    doc = json.loads(path.read_text())
    text = _refusal(root, path, change(doc))
    assert f"{path}: " in text and message in text


def test_every_bad_entry_is_named_at_once(site):
    root, path = site
    doc = {"training": [_entry() | {"label": "../x"}], "validation": [7], "test": [_entry() | {"image": None}]}
    text = _refusal(root, path, doc)
    assert "3 data problem(s)" in text
    assert "training[0]" in text and "validation[0]" in text and "test[0]" in text


def test_symbolic_link_out_of_the_data_root_is_refused(site, tmp_path: Path):
    root, path = site
    elsewhere = tmp_path / "elsewhere"
    write_case(elsewhere, "BraTS20_Training_002")
    (root / "linked").symlink_to(elsewhere / "BraTS20_Training_002")
    doc = json.loads(path.read_text())
    doc["training"][0]["label"] = "linked/BraTS20_Training_002_seg.nii.gz"
    text = _refusal(root, path, doc)
    assert "resolves through a symbolic link to" in text and str(elsewhere) in text


def test_symbolic_link_inside_the_data_root_is_followed(site):
    root, path = site
    (root / "alias").symlink_to(root / CASE)
    doc = json.loads(path.read_text())
    doc["training"][0]["label"] = f"alias/{CASE}_seg.nii.gz"
    path.write_text(json.dumps(doc))
    assert load_datalist(path, root).items("training")[0]["label"] == root.resolve() / CASE / f"{CASE}_seg.nii.gz"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "not valid JSON: Expecting property name"),
        (b'{"training": "\x80"}', "not UTF-8 text"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b" " * 2048, "not valid JSON"),
    ],
)
def test_unreadable_datalist_is_named(site, content: bytes, message: str):
    root, path = site
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        load_datalist(path, root)
    assert str(err.value).count(str(path)) == 1


def test_oversized_datalist_is_refused_unread(site, monkeypatch: pytest.MonkeyPatch):
    root, path = site
    monkeypatch.setattr(jsonfile, "MAX_JSON_BYTES", 100)
    with pytest.raises(DataError, match=r"bytes, more than the 100 a datalist or configuration may have"):
        load_datalist(path, root)
