"""FedPer, FedBN and fine-tuning: personal layers never leave a site, and the server never changes them."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from brats_fl.jobs.catalogue import JobParams
from brats_fl.jobs.simulate import run_simulation
from brats_fl.results.report import overlay_rows, run_test_cases, summarise_run
from brats_fl.seg.inference import untrained_layers
from brats_fl.seg.model import fingerprint, personal_keys
from brats_fl.seg.trainer import poly_lr
from conftest import tiny_params

SITES = ("site-1", "site-2", "site-3")

TINY = tiny_params(rounds=2, local_epochs=2, lr=3e-3, audit=True)


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


@pytest.mark.slow
def test_fedper_keeps_the_head_at_each_site(sim_data: Path, tmp_path: Path):
    """The server never changes a site's head, and each round's record names the head the site kept (what a
    resumed job goes back to; resuming itself is tested in a POC, tests/test_deploy.py). On DynUNet: its head takes
    the deep-supervision outputs beside the output, and its state dict names each of its twice-registered layers
    once."""
    params = replace(TINY, network="dynunet")
    run = run_simulation("brats_fedper", params, sim_data, tmp_path)
    personal = set(personal_keys(params.model(), "head:2"))
    assert any(".deep_supervision_heads." in k for k in personal)
    _check_aggregation(run, params, personal)
    kept = {site: _rows(run, site)[-1]["kept"] for site in SITES}
    assert len(set(kept.values())) == len(SITES), "personal layers should differ between sites"
    for site in SITES:
        local = torch.load(_site(run, site) / "local_model.pt", weights_only=False)["state_dict"]
        assert kept[site] == fingerprint({k: local[k] for k in personal}), site
    summary = summarise_run(run)
    assert set(summary["test_per_site"]) == set(SITES)

    # the global model holds the initial head: it never predicts alone, and says where the sites' models are
    why = untrained_layers(run / "server" / "simulate_job" / "app_server" / "FL_global_model.pt")
    assert "global model of job brats_fedper" in why
    assert all(str((_site(run, s) / "personalised_model.pt").resolve()) in why for s in SITES)
    # the report draws each site's own model; from the server's results alone it leaves the run out of the overlay
    cases = run_test_cases(summary)
    case_id, (_, site) = sorted(cases.items())[0]
    _, _, (row,) = overlay_rows(case_id, [("fedper", summary, cases)])
    assert f"{site}'s final model" in row.label
    downloaded = Path(shutil.copytree(run / "server" / "simulate_job", tmp_path / "download" / "job-1"))
    alone = summarise_run(downloaded.parent)
    config = json.loads(sim_data.read_text())
    alone_cases = run_test_cases(alone, Path(config["data_root"]), Path(config["datalist_dir"]))
    assert case_id in alone_cases and overlay_rows(case_id, [("fedper", alone, alone_cases)])[2] == []


@pytest.mark.slow
def test_fedbn_with_diff_transfer_and_personal_finetuning_under_the_nnunet_recipe(sim_data: Path, tmp_path: Path):
    """FedBN's aggregation and fine-tuning, trained with the nnU-Net recipe at its own rate: every site trains each
    round at the rate the server's poly schedule gives that round, and fine-tunes at its own rate, not at the
    schedule's last (a schedule that decayed to 0 would leave the fine-tuned layers unchanged)."""
    params = JobParams(
        **{
            **vars(TINY),
            "transfer": "diff",
            "finetune_epochs": 1,
            "recipe": "nnunet",
            "lr": None,
            "norm": "batch",
            "cross_site": "all",
        }
    )
    run = run_simulation("brats_fedbn_ft", params, sim_data, tmp_path)
    record = json.loads((run / "server" / "simulate_job" / "brats_fl_run.json").read_text())
    controller = next(c for c in record["server_config"]["workflows"] if c["id"] == "controller")
    assert (controller["args"]["lr"], controller["args"]["lr_schedule"]) == (1e-2, "poly")
    for site in SITES:
        rates = [(row["round"], row["lr"], row["lr_last"]) for row in _rows(run, site)]
        assert rates == [(r, poly_lr(1e-2, r, params.rounds), poly_lr(1e-2, r, params.rounds)) for r in range(2)]
        assert json.loads((_site(run, site) / "site.json").read_text())["finetune_lr"] == pytest.approx(1e-3)
    personal = set(personal_keys(params.model(), "norm"))
    global_model = _check_aggregation(run, params, personal)
    for site in SITES:
        blob = torch.load(_site(run, site) / "personalised_model.pt", weights_only=False)
        final = blob["state_dict"]
        assert blob["meta"]["finetune_lr"] == pytest.approx(1e-3)
        trained = torch.load(_site(run, site) / "local_model.pt", weights_only=False)["state_dict"]
        for key in final:
            if key in personal:  # fine-tuned at the site, starting from its own federated-trained layers
                assert not torch.equal(final[key], trained[key]), (site, key)
            else:  # frozen during fine-tuning: exactly the final global model
                torch.testing.assert_close(final[key], global_model[key].to(final[key].dtype), rtol=0, atol=0)
    summary = summarise_run(run)  # fine-tuned models score differently from the global model they came from
    assert set(summary["test_per_site"]) == set(summary["global_test_per_site"]) == set(SITES)
