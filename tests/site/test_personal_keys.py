"""FedPer, FedBN and fine-tuning: personal layers never leave a site, and the server never changes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from brats_fl.jobs.catalogue import JobParams
from brats_fl.seg.model import BratsUNet, parameter_groups
from brats_fl.server.personalise import personal_keys

SITES = ("site-1", "site-2", "site-3")

TINY = JobParams(rounds=2, local_epochs=2, patch_size=(32, 32, 32), channels=(8, 16, 32), lr=3e-3, audit=True)


def _site(run: Path, site: str) -> Path:
    return run / site / "simulate_job" / "brats_fl"


def _weights(run: Path) -> dict[str, int]:
    out = {}
    for site in SITES:
        doc = json.loads((_site(run, site) / "site.json").read_text())
        out[site] = len(json.loads(Path(doc["data"]["datalist"]).read_text())["training"])
    return out


def _check_aggregation(run: Path, params: JobParams, personal: set[str]) -> dict[str, torch.Tensor]:
    """No personal key was sent; shared keys are the case-weighted mean; personal keys are the initial ones."""
    weights, total = _weights(run), sum(_weights(run).values())
    sent = {s: torch.load(_site(run, s) / f"sent_round_{params.rounds - 1}.pt") for s in SITES}
    for site in SITES:
        for rnd in range(params.rounds):
            assert not personal & set(torch.load(_site(run, site) / f"sent_round_{rnd}.pt")), (site, rnd)
    blob = torch.load(run / "server/simulate_job/app_server/FL_global_model.pt", weights_only=False)
    global_model = {k: torch.as_tensor(v) for k, v in blob["model"].items()}
    initial = params.model().state_dict()
    for key, value in global_model.items():
        if key in personal:
            torch.testing.assert_close(value, initial[key], rtol=0, atol=0, msg=key)
        else:
            expected = sum(sent[s][key].double() * w for s, w in weights.items()) / total
            torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6, msg=key)
    return global_model


def _rows(run: Path, site: str) -> list[dict]:
    return [json.loads(line) for line in (_site(run, site) / "rounds.jsonl").read_text().splitlines()]


def test_selections_follow_the_model_groups():
    model = BratsUNet(channels=(8, 16, 32), strides=(2, 2), norm="batch")
    state = set(model.state_dict())
    assert personal_keys(model, "none") == [] and set(personal_keys(model, "all")) == state
    norm = set(personal_keys(model, "norm"))
    assert norm == set(parameter_groups(model)["norm"]) and any(k.endswith("running_mean") for k in norm)
    head = set(personal_keys(model, "head:2"))
    assert head == set(parameter_groups(model, head_layers=2)["head"]) and head < state
    assert set(personal_keys(model, "head:1+norm")) == norm | set(parameter_groups(model, 1)["head"])
    for bad in ("bn", "head", "head:0", "head:x", "norm:2"):
        with pytest.raises(ValueError, match="unknown personal-key selection"):
            personal_keys(model, bad)
