"""What crosses the wire: the sites' manifests, FLARE's privacy and quantisation filters, in real FLARE runs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from brats_fl.jobs.catalogue import JobParams
from brats_fl.jobs.simulate import run_simulation
from conftest import tiny_params

SITES = ("site-1", "site-2", "site-3")

TINY = {"lr": 3e-3, "local_epochs": 1}

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
    params = tiny_params(
        rounds=1, transfer="diff", privacy="svt", cross_site="global", audit_transfer=True, audit=True, **TINY
    )
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
    params = tiny_params(
        rounds=2,
        quantize="float16",
        privacy="exclude",
        privacy_args={"exclude_vars": r"^net\.model\.0\."},
        cross_site="global",
        audit_transfer=True,
        audit=True,
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
