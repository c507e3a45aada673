"""What crosses the wire: the sites' manifests, FLARE's privacy and quantisation filters, in real FLARE runs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from brats_fl.algorithms.quantization import Dequantizer, Quantizer
from brats_fl.algorithms.transfer import PRIVACY
from brats_fl.jobs import JobParams, export_jobs, run_simulation
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.filters.percentile_privacy import PercentilePrivacy

SITES = ("site-1", "site-2", "site-3")
TINY = {"patch_size": (32, 32, 32), "channels": (8, 16, 32), "lr": 3e-3, "local_epochs": 1}
ARRAYS = ("torch.Tensor", "numpy.ndarray")


def _rows(run: Path, site: str, direction: str = "outgoing") -> list[dict]:
    path = run / site / "simulate_job" / "brats_fl" / f"{direction}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _walk(node: dict) -> Iterator[dict]:
    """Every node of a manifest's description, the node itself first."""
    yield node
    items = node.get("items", {})
    for child in items.values() if isinstance(items, dict) else items:
        yield from _walk(child)


def _state(path: Path) -> dict[str, torch.Tensor]:
    blob = torch.load(path, map_location="cpu", weights_only=False)
    return {k: torch.as_tensor(v) for k, v in blob.get("model", blob).items()}


def _training_cases(run: Path, site: str) -> int:
    doc = json.loads((run / site / "simulate_job" / "brats_fl" / "site.json").read_text())
    return len(json.loads(Path(doc["data"]["datalist"]).read_text())["training"])


@pytest.mark.parametrize(
    "changes",
    [
        {"privacy": "gaussian"},
        {"privacy": "svt"},  # reads updates as differences: needs transfer diff
        {"privacy": "percentile", "transfer": "diff", "privacy_args": {"percentile": 120}},
        {"privacy": "svt", "transfer": "diff", "privacy_args": {"fraction": 0}},
        {"privacy": "svt", "transfer": "diff", "privacy_args": {"sigma": 1.0}},
        {"privacy": "exclude"},
        {"privacy_args": {"fraction": 0.1}},
        {"quantize": "int3"},
    ],
)
def test_transfer_parameters_are_checked(changes: dict):
    with pytest.raises(ValueError, match="job parameter out of range"):
        JobParams(**changes)


def _client_chains(job: Path, kind: str) -> dict[tuple[str, ...], list[str]]:
    config = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())
    return {tuple(sorted(c["tasks"])): [f["path"].rsplit(".", 1)[1] for f in c["filters"]] for c in config[kind]}


def test_filters_act_in_order_on_every_task(tmp_path: Path):
    """A site's update meets the drill, privacy, quantisation, then the manifest; FLARE matches filters by exact
    task name, so each task a site answers is named."""
    params = JobParams(
        transfer="diff",
        privacy="svt",
        quantize="float16",
        audit_transfer=True,
        faults={"site-2": ["nan"]},
        channels=(8, 16, 32),
    )
    job = export_jobs(tmp_path, ["brats_fedavg"], params)[0]
    others = ("personalise", "submit_model", "validate", "validate_pass")
    results = _client_chains(job, "task_result_filters")
    assert results == {
        ("train",): ["FaultInjection", "FreshNoiseSVTPrivacy", "Quantizer", "TransferManifest"],
        others: ["Quantizer", "TransferManifest"],
    }
    assert _client_chains(job, "task_data_filters") == {
        ("train",): ["TransferManifest", "Dequantizer"],
        others: ["TransferManifest", "Dequantizer"],
    }
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    for kind, name in (("task_data_filters", "Quantizer"), ("task_result_filters", "Dequantizer")):
        assert [f["path"].rsplit(".", 1)[1] for c in server[kind] for f in c["filters"]] == [name]


def test_default_job_screens_updates_and_adds_no_filter(tmp_path: Path):
    params = JobParams(channels=(8, 16, 32), privacy="exclude", privacy_args={"exclude_vars": r"^net\.model\.0\."})
    job = export_jobs(tmp_path, ["brats_fedavg"], params)[0]
    # FLARE's job export cannot write a compiled regular expression back: the filter gets the matching keys
    (chain,) = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())["task_result_filters"]
    excluded = chain["filters"][0]["args"]["exclude_vars"]
    assert excluded and all(k.startswith("net.model.0.") for k in excluded)

    job = export_jobs(tmp_path, ["brats_fedper"], JobParams(channels=(8, 16, 32)))[0]
    client = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())
    assert client["task_data_filters"] == client["task_result_filters"] == []
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    aggregator = server["workflows"][0]["args"]["aggregator"]
    assert aggregator["path"] == "brats_fl.algorithms.screening.ScreenedAggregator"
    model = JobParams(channels=(8, 16, 32)).model()
    assert aggregator["args"]["expected"] == {k: list(v.shape) for k, v in model.state_dict().items()}


def test_flare_percentile_filter_takes_our_torch_updates():
    """Our sites send torch tensors (server_expected_format pytorch); FLARE's percentile filter is written with
    numpy calls, which torch tensors pass through: the smallest changes are zeroed and the rest clipped."""
    rng = torch.Generator().manual_seed(0)
    diff = {"w": torch.randn(40, 50, generator=rng) * 0.01, "b": torch.randn(50, generator=rng) * 0.01}
    dxo = DXO(DataKind.WEIGHT_DIFF, data={k: v.clone() for k, v in diff.items()})
    dxo.set_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND, 4)
    out = PercentilePrivacy(percentile=90, gamma=0.004).process_dxo(dxo, dxo.to_shareable(), FLContext())
    values = torch.cat([torch.as_tensor(out.data[k]).flatten() for k in diff])
    assert 0.85 < float((values == 0).float().mean()) < 0.95
    assert float(values.abs().max()) <= 0.004 * 4 + 1e-7
    assert float((values != 0).float().mean()) > 0


@pytest.mark.slow
def test_nothing_but_weights_and_scores_leave_a_site(fedavg_run: tuple[Path, JobParams]):
    """Every message each site sent in the shared FedAvg run: the model's tensors under its own keys and shapes,
    scalar scores and FLARE's bookkeeping; no path, no case name, no image- or label-shaped array."""
    workspace, params = fedavg_run
    run = workspace / "brats_fedavg"
    shapes = {k: list(v.shape) for k, v in params.model().state_dict().items()}
    for site in SITES:
        rows = _rows(run, site)
        tasks = [r["task"] for r in rows]
        assert tasks.count("train") == params.rounds and {"personalise", "submit_model", "validate"} <= set(tasks)
        assert [r["round"] for r in rows if r["task"] == "train"] == list(range(params.rounds))
        for row in rows:
            assert row["return_code"] == "OK", row
            data = row["data"]["items"]
            if row["kind"] == "WEIGHTS":
                assert {k: d["shape"] for k, d in data.items()} == shapes, (site, row["task"])
                assert {(d["type"], d["dtype"]) for d in data.values()} == {("torch.Tensor", "torch.float32")}
                assert row["payload_bytes"] == 4 * sum(int(np.prod(s)) for s in shapes.values())
            else:
                assert row["kind"] == "METRICS" and row["payload_bytes"] == 0
                assert {d["type"] for d in data.values()} <= {"float", "int"}, (site, row["task"])
            for part in ("meta", "headers"):
                nodes = list(_walk(row[part]))
                assert not [n for n in nodes if n["type"] in ARRAYS], (site, row["task"], part)
            strings = [n["value"] for part in ("data", "meta", "headers") for n in _walk(row[part]) if "value" in n]
            assert strings, "every message carries FLARE's content type, at least"
            leaks = [s for s in strings if "/" in s or "\\" in s or "BraTS" in s or ".nii" in s]
            assert not leaks, (site, row["task"], leaks)
            arrays = [n["shape"] for n in _walk(row["data"]) if n["type"] in ARRAYS]
            assert not [s for s in arrays if len(s) >= 3 and min(s[-3:]) > 3], "image- or label-shaped array"
        metrics = next(r for r in rows if r["task"] == "train")["meta"]["items"]["initial_metrics"]["items"]
        assert "dice_mean" in metrics and {d["type"] for d in metrics.values()} <= {"float", "int"}


@pytest.mark.slow
def test_svt_sends_a_sparse_noisy_difference(sim_data: Path, tmp_path: Path):
    """FLARE's SVT filter on the sites' updates: what left each site is a difference with at most a tenth of
    its entries non-zero, so the global model moves in at most three tenths of its weights, where each
    site's own update changed nearly all of them."""
    params = JobParams(rounds=1, transfer="diff", privacy="svt", audit_transfer=True, extra_args=["--audit"], **TINY)
    run = run_simulation("brats_fedavg", params, sim_data, tmp_path)
    for site in SITES:
        (train,) = [r for r in _rows(run, site) if r["task"] == "train"]
        assert train["kind"] == "WEIGHT_DIFF" and "svt_privacy_budget" in train["meta"]["items"]
        assert {d["type"] for d in train["data"]["items"].values()} == {"numpy.ndarray"}  # what FLARE's SVT returns
    record = run / "site-1" / "simulate_job" / "brats_fl"
    received, sent = torch.load(record / "received_round_0.pt"), torch.load(record / "sent_round_0.pt")
    global_model = _state(run / "server" / "simulate_job" / "app_server" / "FL_global_model.pt")

    def changed(after: dict, before: dict) -> float:
        flags = torch.cat([(after[k].double() != before[k].double()).flatten() for k in before])
        return float(flags.double().mean())

    assert changed(sent, received) > 0.9
    assert 0 < changed(global_model, received) <= 0.3 + 1e-3


@pytest.mark.slow
def test_float16_transfer_halves_the_bytes_and_keeps_excluded_layers_home(sim_data: Path, tmp_path: Path):
    """Quantised both ways with FLARE's float16 filters, with FLARE's ExcludeVars keeping the first block at the
    sites: every model on the wire is float16, half the bytes; the global model is still the case-weighted mean
    of the sites' models (to float16 precision), and the first block keeps its initial values."""
    params = JobParams(
        rounds=2,
        quantize="float16",
        privacy="exclude",
        privacy_args={"exclude_vars": r"^net\.model\.0\."},
        audit_transfer=True,
        extra_args=["--audit"],
        **TINY,
    )
    run = run_simulation("brats_fedavg", params, sim_data, tmp_path)
    initial = params.model().state_dict()
    home = {k for k in initial if k.startswith("net.model.0.")}
    assert home
    for site in SITES:
        for direction, task, keys in (("outgoing", "train", set(initial) - home), ("incoming", "train", set(initial))):
            rows = [r for r in _rows(run, site, direction) if r["task"] == task]
            assert len(rows) == params.rounds
            for row in rows:
                data = row["data"]["items"]
                assert set(data) == keys and {d["dtype"] for d in data.values()} == {"torch.float16"}
                assert row["payload_bytes"] == 2 * sum(initial[k].numel() for k in keys)

    global_model = _state(run / "server" / "simulate_job" / "app_server" / "FL_global_model.pt")
    weights = {s: _training_cases(run, s) for s in SITES}
    sent = {s: torch.load(run / s / "simulate_job" / "brats_fl" / "sent_round_1.pt") for s in SITES}
    total = sum(weights.values())
    for key, value in global_model.items():
        if key in home:
            torch.testing.assert_close(value, initial[key], rtol=0, atol=0, msg=key)
            assert not torch.equal(sent["site-1"][key], initial[key]), f"{key} was not trained at the site"
        else:
            expected = sum(sent[s][key].double() * w for s, w in weights.items()) / total
            torch.testing.assert_close(value.double(), expected, rtol=2e-3, atol=1e-5, msg=key)


def test_blockwise8_runs_on_the_cpu_through_flare_filters():
    """The jobs' quantisers send 8-bit codes with FLARE's wire format on a machine without CUDA, where FLARE's own
    filters fail, and restore every tensor to within a step of its 8-bit code book."""
    state = JobParams(**TINY).model().state_dict() | {"count": torch.tensor(3), "mask": torch.tensor([True, False])}
    message = DXO(DataKind.WEIGHTS, data={k: v.clone() for k, v in state.items()}).to_shareable()
    sent = Quantizer("blockwise8").process(message, FLContext())
    wire = from_shareable(sent)
    assert {v.dtype for k, v in wire.data.items() if k not in ("count", "mask")} == {torch.uint8}
    assert wire.get_meta_prop(MetaKey.PROCESSED_ALGORITHM) == "blockwise8"
    assert set(wire.meta["quant_state"]) == set(state)
    restored = from_shareable(Dequantizer().process(sent, FLContext())).data
    for key in ("count", "mask"):  # not floating point: sent as they are
        assert torch.equal(wire.data[key], state.pop(key)) and torch.equal(restored[key], wire.data[key])
    for key, value in state.items():
        assert restored[key].dtype == torch.float32
        step = float(value.abs().max()) / 100  # the code book's widest step is about 1/127 of a block's maximum
        torch.testing.assert_close(restored[key], value, rtol=0, atol=step, msg=key)
    assert any(not torch.equal(restored[k], v) for k, v in state.items()), "nothing was quantised"


def test_svt_noise_does_not_follow_the_job_seed():
    """Every site seeds NumPy's global generator from the job (MONAI's set_determinism); FLARE's SVT filter draws
    its noise from it. Ours draws fresh noise each time under the same seed, and leaves the generator as it was."""
    update = {"w": torch.linspace(-1e-3, 1e-3, 1000)}
    sent = []
    for _ in range(2):
        np.random.seed(0)
        message = DXO(DataKind.WEIGHT_DIFF, data=dict(update)).to_shareable()
        sent.append(from_shareable(PRIVACY["svt"](fraction=0.5, gamma=1e-3).process(message, FLContext())).data["w"])
        assert np.random.random() == np.random.RandomState(0).random(), "the global generator was left changed"
    assert np.count_nonzero(sent[0]) and not np.array_equal(sent[0], sent[1])
