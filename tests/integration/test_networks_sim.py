"""SegResNet and DynUNet in real FLARE jobs: what a site keeps never leaves it (the U-Net's FedPer and FedBN runs:
tests/integration/test_personalised_sim.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from brats_fl.jobs.simulate import run_simulation
from brats_fl.server.personalise import personal_keys
from conftest import tiny_params

SITES = ("site-1", "site-2", "site-3")
#: each network under another algorithm: FedBN keeps SegResNet's batch norms, FedPer DynUNet's last two convolutions
#: with the deep-supervision outputs beside them
CASES = {
    "segresnet": ("brats_fedbn", "norm", {"norm": "batch"}),
    "dynunet": ("brats_fedper", "head:2", {}),
}


@pytest.mark.slow
@pytest.mark.parametrize("network", sorted(CASES))
def test_kept_layers_never_leave_the_site(network: str, sim_data: Path, tmp_path: Path):
    job, spec, settings = CASES[network]
    params = tiny_params(network=network, rounds=1, local_epochs=1, audit_transfer=True, **settings)
    run = run_simulation(job, params, sim_data, tmp_path)
    model = params.model()
    keys = set(model.state_dict())
    kept = set(personal_keys(model, spec))
    assert kept and kept < keys
    if network == "dynunet":
        assert any(".deep_supervision_heads." in k for k in kept)
    for site in SITES:
        folder = run / site / "simulate_job" / "brats_fl"
        record = json.loads((folder / "site.json").read_text())
        assert set(record["personal_keys"]) == kept and record["personal_layers"]
        rows = [json.loads(line) for line in (folder / "outgoing.jsonl").read_text().splitlines()]
        weights = [r for r in rows if r["kind"] == "WEIGHTS"]
        assert [r["task"] for r in weights] == ["train"], site
        assert set(weights[0]["data"]["items"]) == keys - kept, site
        # the site trained what it kept: its final model's kept layers are no longer the initial ones
        final = torch.load(folder / "personalised_model.pt", weights_only=False)["state_dict"]
        learnable = [k for k in kept if final[k].is_floating_point()]
        assert any(not torch.equal(final[k], model.state_dict()[k]) for k in learnable), site
