"""FedBN as published (Li et al. 2021), in FLARE's simulator: batch norm, whose every key stays at its site."""

from __future__ import annotations

import json
from dataclasses import replace
from itertools import combinations
from pathlib import Path

import pytest
import torch
from brats_fl.data.datalist import load_datalist
from brats_fl.data.loading import eval_loader
from brats_fl.jobs.simulate import run_simulation
from brats_fl.seg.inference import load_for_inference
from brats_fl.seg.model import personal_keys
from conftest import tiny_params

SITES = ("site-1", "site-2", "site-3")


def _record(run: Path, site: str) -> Path:
    return run / site / "simulate_job" / "brats_fl"


def _state(path: Path) -> dict[str, torch.Tensor]:
    blob = torch.load(path, map_location="cpu", weights_only=False)
    return {k: torch.as_tensor(v) for k, v in blob.get("state_dict", blob.get("model", {})).items()}


@pytest.mark.slow
def test_fedbn_keeps_batch_norm_weights_and_statistics_at_each_site(sim_data: Path, tmp_path: Path):
    """One run checks what defines FedBN: the job's own norm is batch norm; no normalisation key (scale, shift,
    running mean and variance, batch count) ever leaves a site in any message; each site's statistics become its
    own; the server's normalisation tensors stay the initial ones; and a site's personalised model, whose scores it
    records, is the final global model with that site's own statistics."""
    # norm left to the job; cross-site evaluation on: the test checks its messages and scores too; on SegResNet, whose
    # normalisation MONAI names "norm" (the U-Net's "adn.N"): selected by module type on any network
    params = tiny_params(network="segresnet", rounds=2, local_epochs=1, lr=3e-3, audit_transfer=True, cross_site="all")
    run = run_simulation("brats_fedbn", params, sim_data, tmp_path)
    initial = replace(params, norm="batch").model().state_dict()
    norm = set(personal_keys(replace(params, norm="batch").model(), "norm"))
    means = {k for k in norm if k.endswith("running_mean")}
    assert means and {k.rsplit(".", 1)[1] for k in norm} == {
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    }

    local = {s: _state(_record(run, s) / "local_model.pt") for s in SITES}
    for site in SITES:
        saved = torch.load(_record(run, site) / "local_model.pt", weights_only=False)
        assert saved["model_config"]["norm"] == "batch", site
        rows = [json.loads(line) for line in (_record(run, site) / "outgoing.jsonl").read_text().splitlines()]
        assert {"train", "personalise", "submit_model", "validate"} <= {r["task"] for r in rows}
        weights = [r for r in rows if r["kind"] in ("WEIGHTS", "WEIGHT_DIFF")]
        assert len(weights) >= params.rounds + 1  # every training round and the model submitted for evaluation
        for row in rows:
            assert not norm & set(row["data"]["items"]), (site, row["task"])
        for row in weights:
            assert set(row["data"]["items"]) == set(initial) - norm, (site, row["task"])

    # each site's statistics are its own: they moved from the initial ones, and no two sites agree
    for key in means:
        assert all(not torch.equal(local[s][key], initial[key]) for s in SITES), key
    for a, b in combinations(SITES, 2):
        assert any(not torch.allclose(local[a][k], local[b][k]) for k in means), (a, b)

    # the server never changed a normalisation tensor, while it did average the shared weights
    global_model = _state(run / "server" / "simulate_job" / "app_server" / "FL_global_model.pt")
    for key in norm:
        torch.testing.assert_close(global_model[key], initial[key], rtol=0, atol=0, msg=key)
    assert any(not torch.equal(global_model[k], initial[k]) for k in set(initial) - norm)

    # a site's personalised model: the global shared weights with its own normalisation, scored as recorded
    for site in SITES:
        path = _record(run, site) / "personalised_model.pt"
        personalised = _state(path)
        for key, value in personalised.items():
            source = local[site] if key in norm else global_model
            torch.testing.assert_close(value, source[key].to(value.dtype), rtol=0, atol=0, msg=(site, key))
        doc = json.loads((_record(run, site) / "site.json").read_text())["data"]
        test = eval_loader(load_datalist(Path(doc["datalist"]), Path(doc["data_root"])).items("test"))
        trainer = load_for_inference(path, params.patch_size, threads=1)
        recorded = json.loads((_record(run, site) / "personalised_test.json").read_text())
        # scored as the site scored it: with the post-processing its record names (chosen on validation)
        scored = trainer.evaluate(test, min_volume=recorded.get("min_volume", {}).get("volumes"))
        assert scored["val_loss"] == pytest.approx(recorded["val_loss"], abs=1e-5), site
        assert scored["dice_mean"] == pytest.approx(recorded["dice_mean"], abs=1e-5), site
        # another site's statistics normalise the same case otherwise (compared on the network's output, which a
        # barely trained model's loss may not show)
        image = next(iter(test))["image"]
        own = trainer.infer(image)
        other = SITES[(SITES.index(site) + 1) % len(SITES)]
        stats = {k: local[other][k] for k in norm if "running" in k}
        trainer.model.load_state_dict(stats, strict=False)
        assert float((trainer.infer(image) - own).abs().max()) > 1e-3, (site, other)
