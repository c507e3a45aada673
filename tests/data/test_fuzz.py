"""Fuzzing with hypothesis: mutated NIfTI headers and payloads, datalists and site configurations.

Every example must end either in success (a harmless mutation) or in the project's own error naming the file and
the problem (``DataError``, ``SiteConfigError``, or ``FileNotFoundError`` naming the configuration): never another
exception, never a traceback, and never an allocation beyond what the files can hold (peak memory is measured with
tracemalloc, which numpy reports its arrays to). The NIfTI cases go through ``load_datalist``, the path a site takes
before training, and through ``check-data``'s own search of a folder; both must find the same problems.
The fast examples run with the fast suite; the ``slow`` ones run many more. Each test prints how many examples it
tried and how many were refused (``pytest -s``).
"""

from __future__ import annotations

import gzip
import json
import shutil
import struct
import tempfile
import tracemalloc
import zlib
from collections import Counter
from pathlib import Path

import nibabel as nib
import pytest
from brats_fl.data.checks import DataError, check_cases
from brats_fl.data.datalist import load_datalist
from brats_fl.data.layout import MODALITIES, SEG, find_cases
from brats_fl.site.config import ENV_VAR, THREADS_VAR, SiteConfigError, resolve
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import rewrite_nifti, write_case

CASE = "BraTS20_Training_001"
KINDS = (*MODALITIES, SEG)
#: peak memory one example may take: the tiny case's files hold well under a MiB of voxels
PEAK_BYTES = 64 * 2**20
#: examples per test: the fast suite's few keep it under a minute, the full suite's many search further (each example
#: of the datalist test reads a whole tiny case)
FAST = {"nifti": 25, "datalist": 60, "site": 40}
SLOW = {"nifti": 300, "datalist": 300, "site": 300}


def _budget(size: str) -> dict:
    return FAST if size == "fast" else SLOW


SIZES = [pytest.param("fast", id="fast"), pytest.param("slow", id="slow", marks=pytest.mark.slow)]


def _settings(examples: int):
    # no example database: nothing is written into the checkout; module-scoped fixtures are shared on purpose
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


def _entry() -> dict:
    return {
        "case_id": CASE,
        "image": [f"{CASE}/{CASE}_{m}.nii.gz" for m in MODALITIES],
        "label": f"{CASE}/{CASE}_seg.nii.gz",
    }


def _valid_datalist() -> dict:
    return {"training": [_entry()], "validation": [_entry()], "test": [_entry()], "site": "site-1"}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root with one valid case, a case outside it and a symbolic link from inside the root to it."""
    base = tmp_path_factory.mktemp("fuzz")
    write_case(base / "data", CASE)
    write_case(base / "elsewhere", "BraTS20_Training_002")
    (base / "data" / "linked").symlink_to(base / "elsewhere" / "BraTS20_Training_002")
    return base


class Measured:
    """Counts each example's outcome and holds its peak memory under ``PEAK_BYTES``."""

    def __init__(self):
        self.outcomes: Counter[str] = Counter()
        self.base = 0

    def __enter__(self):
        tracemalloc.start()
        return self

    def __exit__(self, *exc):
        tracemalloc.stop()

    def example(self):
        tracemalloc.reset_peak()
        self.base = tracemalloc.get_traced_memory()[0]
        return self

    def done(self, outcome: str) -> None:
        peak = tracemalloc.get_traced_memory()[1] - self.base
        assert peak < PEAK_BYTES, f"an example took {peak / 2**20:.0f} MiB"
        self.outcomes[outcome] += 1

    def report(self, what: str) -> str:
        total = sum(self.outcomes.values())
        text = f"{what}: {total} examples, {self.outcomes['refused']} refused with a named file, "
        print(f"\n{text}{self.outcomes['passed']} harmless")
        return text


# --- NIfTI headers and payloads -------------------------------------------------------------------------------

FLOAT32 = st.floats(width=32)
INT16 = st.integers(-(2**15), 2**15 - 1)
_PLAUSIBLE_DIMS = st.sampled_from([0, 1, 2, 3, 4, 16, 24, 240, 4000, 32767, -1])
HEADER_FIELDS = {
    "dim": st.lists(st.one_of(_PLAUSIBLE_DIMS, INT16), min_size=8, max_size=8),
    "datatype": st.one_of(st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792,
                                           2048, 2304]), INT16),
    "bitpix": st.one_of(st.sampled_from([8, 16, 24, 32, 64, 128]), INT16),
    "pixdim": st.lists(st.one_of(st.sampled_from([1.0, -1.0, 0.0, 1e-9, 1e9]), FLOAT32), min_size=8, max_size=8),
    "vox_offset": st.one_of(st.sampled_from([0.0, 348.0, 352.0, 353.0, 1e9]), FLOAT32),
    "scl_slope": FLOAT32,
    "scl_inter": FLOAT32,
    "qform_code": st.one_of(st.sampled_from([0, 1, 2, 3, 4]), INT16),
    "sform_code": st.one_of(st.sampled_from([0, 1, 2, 3, 4]), INT16),
    "quatern_b": FLOAT32,
    "quatern_d": FLOAT32,
    "qoffset_x": FLOAT32,
    "srow_x": st.lists(FLOAT32, min_size=4, max_size=4),
    "srow_y": st.lists(FLOAT32, min_size=4, max_size=4),
    "srow_z": st.lists(FLOAT32, min_size=4, max_size=4),
    "sizeof_hdr": st.sampled_from([348, 540, 0, -1, 2**31 - 1]),
    "magic": st.sampled_from([b"n+1", b"ni1", b"n+2", b"abc", b""]),
}  # fmt: skip

header_change = st.tuples(st.just("header"), st.sampled_from(sorted(HEADER_FIELDS))).flatmap(
    lambda t: st.tuples(st.just(t[0]), st.just(t[1]), HEADER_FIELDS[t[1]])
)
payload_change = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(0, 255)),
    st.tuples(st.just("overwrite"), st.floats(0, 1), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("poison"), st.floats(0, 1), st.sampled_from([float("nan"), float("inf"), -float("inf"), 3e38])),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=4096)),
    st.tuples(st.just("replace"), st.binary(max_size=512)),
    st.tuples(
        st.just("uncompressed"),
    ),
)
changes = st.lists(st.tuples(st.sampled_from(KINDS), st.one_of(header_change, payload_change)), min_size=1, max_size=3)


def _mutate(path: Path, change: tuple) -> None:
    """Apply one change to a ``.nii.gz`` file, at the level a damaged or hostile file would have it; a change to the
    header or the voxels of a file an earlier change left unreadable leaves it as it is."""
    what, *args = change
    data = path.read_bytes()
    if what == "truncate":
        path.write_bytes(data[: int(len(data) * args[0])])
        return
    if what == "flip":
        at = min(int(len(data) * args[0]), len(data) - 1)
        path.write_bytes(data[:at] + bytes([args[1]]) + data[at + 1 :])
        return
    if what == "replace":
        path.write_bytes(args[0])
        return
    try:
        raw = bytearray(gzip.decompress(data))
    except (OSError, EOFError, zlib.error):
        return
    if len(raw) < 356:
        return
    if what == "header":
        rewrite_nifti(path, **{args[0]: args[1]})
        return
    if what == "overwrite":
        at = int(len(raw) * args[0])
        raw[at : at + len(args[1])] = args[1]
    elif what == "poison":  # a float32 NaN, Inf or huge value at an aligned voxel of the payload
        at = 352 + 4 * int((len(raw) - 356) // 4 * args[0])
        raw[at : at + 4] = struct.pack("<f", args[1])
    elif what == "append":
        raw += args[0]
    path.write_bytes(bytes(raw) if what == "uncompressed" else gzip.compress(bytes(raw)))


def _files(root: Path) -> set[Path]:
    return {root / CASE / f"{CASE}_{k}.nii.gz" for k in KINDS}


@pytest.mark.parametrize("size", SIZES)
def test_mutated_nifti_files_end_in_a_named_problem(template: Path, size: str, tmp_path: Path):
    datalist = tmp_path / "site-1.json"
    datalist.write_text(json.dumps(_valid_datalist() | {"validation": [], "test": []}))

    @_settings(_budget(size)["nifti"])
    @given(changes)
    def run(todo: list[tuple[str, tuple]]) -> None:
        with tempfile.TemporaryDirectory(dir=tmp_path) as folder:
            root = Path(folder) / "data"
            shutil.copytree(template / "data" / CASE, root / CASE)
            for kind, change in todo:
                _mutate(root / CASE / f"{CASE}_{kind}.nii.gz", change)
            measured.example()
            try:
                load_datalist(datalist, root)
            except DataError as err:
                assert err.problems and all(p.path in _files(root) and p.message for p in err.problems), err
                # check-data finds the same problems through its own search of the folder
                assert [str(p) for p in check_cases(find_cases(root))] == [str(p) for p in err.problems]
                measured.done("refused")
            else:
                measured.done("passed")

    with Measured() as measured:
        run()
    measured.report("NIfTI fuzz")
    assert measured.outcomes["refused"] > 0


# --- datalists ------------------------------------------------------------------------------------------------

HOSTILE_PATHS = st.sampled_from([
    "../elsewhere/BraTS20_Training_002/BraTS20_Training_002_seg.nii.gz", "/etc/passwd", "a\0b", "x" * 5000, "", ".",
    "linked/BraTS20_Training_002_seg.nii.gz", CASE, f"{CASE}/../../data/{CASE}/{CASE}_t1.nii.gz", "nowhere.nii.gz",
])  # fmt: skip
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20) | HOSTILE_PATHS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
DATALIST_KEYS = st.sampled_from(["training", "validation", "test", "site", "case_id", "image", "label", "annotated",
                                 "release", 0, 1, 3])  # fmt: skip


def _set_at(doc: object, path: list, value: object, delete: bool) -> object:
    """``doc`` with the value at ``path`` (keys or indices, as far as they reach) replaced or deleted."""
    if not path:
        return value
    key, rest = path[0], path[1:]
    if isinstance(doc, dict) and isinstance(key, str):
        if delete and not rest:
            return {k: v for k, v in doc.items() if k != key}
        return doc | {key: _set_at(doc.get(key), rest, value, delete)}
    if isinstance(doc, list) and isinstance(key, int) and doc:
        i = key % len(doc)
        return [*doc[:i], _set_at(doc[i], rest, value, delete), *doc[i + 1 :]]
    return value


datalist_changes = st.lists(
    st.tuples(st.lists(DATALIST_KEYS, min_size=1, max_size=4), JSON, st.booleans()), min_size=1, max_size=3
)


@pytest.mark.parametrize("size", SIZES)
def test_mutated_datalists_end_in_a_named_problem(template: Path, size: str, tmp_path: Path):
    root, datalist = template / "data", tmp_path / "site-1.json"
    inside = {p.resolve() for p in _files(root)}

    @_settings(_budget(size)["datalist"])
    @given(datalist_changes, st.one_of(st.none(), st.binary(max_size=200)))
    def run(todo: list[tuple[list, object, bool]], raw: bytes | None) -> None:
        doc: object = _valid_datalist()
        for path, value, delete in todo:
            doc = _set_at(doc, path, value, delete)
        datalist.write_bytes(raw if raw is not None else json.dumps(doc).encode())
        measured.example()
        try:
            loaded = load_datalist(datalist, root)
        except DataError as err:
            assert err.problems and all(p.path == datalist or p.path in inside for p in err.problems), err
            measured.done("refused")
        else:
            named = {p for s in ("training", "validation", "test") for i in loaded.items(s) for p in i["image"]}
            assert named <= inside, named - inside
            measured.done("passed")

    with Measured() as measured:
        run()
    measured.report("datalist fuzz")
    assert measured.outcomes["refused"] > 0 and measured.outcomes["passed"] > 0


# --- site configurations --------------------------------------------------------------------------------------

SITE_KEYS = st.sampled_from(["data_root", "datalist_dir", "datalist", "threads", "state_dir", "cache_dir", "sites",
                             "site-1", "site-2", "other", 0])  # fmt: skip
SITE_VALUES = st.one_of(JSON, st.sampled_from(["data", "lists", "../data", "/", "lists/site-1.json", 1, 2, 0]))


@pytest.mark.parametrize("size", SIZES)
def test_mutated_site_configurations_end_in_a_named_problem(
    template: Path, size: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "site-1.json").write_text("{}")
    (tmp_path / "data").symlink_to(template / "data")
    config = tmp_path / "config.json"
    monkeypatch.setenv(ENV_VAR, str(config))
    monkeypatch.delenv(THREADS_VAR, raising=False)

    @_settings(_budget(size)["site"])
    @given(
        st.lists(st.tuples(st.lists(SITE_KEYS, min_size=1, max_size=3), SITE_VALUES, st.booleans()), max_size=4),
        st.one_of(st.none(), st.sampled_from(["site-All", "../lists/site-1", "/etc/passwd", ""]), st.text(max_size=8)),
        st.one_of(st.none(), st.binary(max_size=100)),
    )
    def run(todo: list, datalist_name: str | None, raw: bytes | None) -> None:
        doc: object = {"data_root": "data", "datalist_dir": "lists", "threads": 1}
        for path, value, delete in todo:
            doc = _set_at(doc, path, value, delete)
        config.write_bytes(raw if raw is not None else json.dumps(doc).encode())
        measured.example()
        try:
            resolve("site-1", datalist_name, workspace=tmp_path)
        except (SiteConfigError, FileNotFoundError) as err:
            assert str(err).startswith(f"{config}: "), err
            measured.done("refused")
        except ValueError as err:
            assert "is not a plain datalist name" in str(err) or "site configuration" in str(err), err
            measured.done("refused")
        else:
            measured.done("passed")

    with Measured() as measured:
        run()
    measured.report("site configuration fuzz")
    assert measured.outcomes["refused"] > 0 and measured.outcomes["passed"] > 0


def test_fuzzed_headers_reach_the_size_guard(template: Path, tmp_path: Path):
    """The guard the fuzz relies on: the issue's 4000³ header is refused before any voxel is allocated."""
    root = tmp_path / "data"
    shutil.copytree(template / "data" / CASE, root / CASE)
    path = root / CASE / f"{CASE}_t1.nii.gz"
    rewrite_nifti(path, dim=[3, 4000, 4000, 4000, 1, 1, 1, 1])
    with Measured() as measured:
        measured.example()
        problems = check_cases(find_cases(root))
        measured.done("refused")
    assert [p.path for p in problems] == [path] and "64,000,000,000 voxels" in problems[0].message
    assert nib.load(str(path)).shape == (4000, 4000, 4000)
