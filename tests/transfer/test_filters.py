"""What crosses the wire: the sites' manifests, FLARE's privacy and quantisation filters, in real FLARE runs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from brats_fl.jobs.catalogue import JobParams
from brats_fl.jobs.export import export_jobs
from brats_fl.transfer.filters import PRIVACY
from brats_fl.transfer.quantization import Dequantizer, Quantizer
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.filters.percentile_privacy import PercentilePrivacy

TINY = {"patch_size": (32, 32, 32), "channels": (8, 16, 32), "lr": 3e-3, "local_epochs": 1}


def _walk(node: dict) -> Iterator[dict]:
    """Every node of a manifest's description, the node itself first."""
    yield node
    items = node.get("items", {})
    for child in items.values() if isinstance(items, dict) else items:
        yield from _walk(child)


def _client_chains(job: Path, kind: str) -> dict[tuple[str, ...], list[str]]:
    config = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())
    return {tuple(sorted(c["tasks"])): [f["path"].rsplit(".", 1)[1] for f in c["filters"]] for c in config[kind]}


@pytest.mark.parametrize(
    "changes",
    [
        {"privacy": "gaussian"},
        {"privacy": "svt", "cross_site": "global"},  # reads updates as differences: needs transfer diff
        {"privacy": "percentile", "transfer": "diff", "privacy_args": {"percentile": 120}, "cross_site": "global"},
        {"privacy": "svt", "transfer": "diff", "privacy_args": {"fraction": 0}, "cross_site": "global"},
        {"privacy": "svt", "transfer": "diff", "privacy_args": {"sigma": 1.0}, "cross_site": "global"},
        {"privacy": "exclude", "cross_site": "none"},
        {"privacy_args": {"fraction": 0.1}},
        {"quantize": "int3"},
        # a site's whole model for cross-site evaluation would pass no filter
        {"privacy": "percentile", "transfer": "diff", "cross_site": "all"},
        {"privacy": "exclude", "privacy_args": {"exclude_vars": "^net"}, "cross_site": "all"},
        {"dp_delta": 1e-6},  # DP-SGD's, without DP-SGD
        {"dp_epsilon": 8.0, "amp": "on"},
        {"dp_epsilon": 0},
    ],
)
def test_transfer_parameters_are_checked(changes: dict):
    with pytest.raises(ValueError, match="job parameter out of range"):
        JobParams(**changes)


def test_filters_act_in_order_on_every_task(tmp_path: Path):
    """A site's update meets the drill, privacy, quantisation, then the manifest; FLARE matches filters by exact
    task name, so each task a site answers is named."""
    params = JobParams(
        transfer="diff",
        privacy="svt",
        cross_site="global",
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
    for kind, names in (
        ("task_data_filters", ["Quantizer"]),
        ("task_result_filters", ["Dequantizer", "PrivacyLedger", "ChoiceCollector"]),
    ):
        assert [f["path"].rsplit(".", 1)[1] for c in server[kind] for f in c["filters"]] == names


def test_default_job_screens_updates_and_adds_no_filter(tmp_path: Path):
    exclude = {"privacy": "exclude", "privacy_args": {"exclude_vars": r"^net\.model\.0\."}, "cross_site": "global"}
    params = JobParams(channels=(8, 16, 32), **exclude)
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
    assert aggregator["path"] == "brats_fl.server.screening.ScreenedAggregator"
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
