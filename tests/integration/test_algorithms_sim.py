"""FedProx, SCAFFOLD and Ditto in FLARE's simulator: one tiny run each, checking what defines the algorithm on the
wire, at the sites and on the server (their math is tested fast in tests/site/test_algorithms.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from brats_fl.jobs.simulate import run_simulation
from brats_fl.results.report import summarise_run
from brats_fl.seg.model import fingerprint
from conftest import tiny_params
from nvflare.app_common.app_constant import AlgorithmConstants

SITES = ("site-1", "site-2", "site-3")


def _site(run: Path, site: str) -> Path:
    return run / site / "simulate_job" / "brats_fl"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _train_rows(run: Path, site: str, direction: str) -> list[dict]:
    return [r for r in _jsonl(_site(run, site) / f"{direction}.jsonl") if r["task"] == "train"]


def _global_model(run: Path) -> dict[str, torch.Tensor]:
    blob = torch.load(run / "server/simulate_job/app_server/FL_global_model.pt", weights_only=False)
    return {k: torch.as_tensor(v) for k, v in blob["model"].items()}


def _datalist(run: Path, site: str) -> dict:
    doc = json.loads((_site(run, site) / "site.json").read_text())
    return json.loads(Path(doc["data"]["datalist"]).read_text())


@pytest.mark.slow
def test_fedprox_sends_mu_and_every_site_adds_the_proximal_term(sim_data: Path, tmp_path: Path):
    """mu travels with every training task (FLARE's FedProx contract), each site trains with the proximal term
    (non-zero once its weights leave the received ones), and the server averages as FedAvg."""
    params = tiny_params(rounds=1, local_epochs=1, mu=0.5, audit_transfer=True)
    run = run_simulation("brats_fedprox", params, sim_data, tmp_path)
    for site in SITES:
        (incoming,) = _train_rows(run, site, "incoming")
        assert incoming["meta"]["items"][AlgorithmConstants.FEDPROX_MU] == {"type": "float"}
        (row,) = _jsonl(_site(run, site) / "rounds.jsonl")
        assert row["fedprox"]["mu"] == 0.5 and row["fedprox"]["proximal_term"] > 0, site
        assert "scaffold" not in row and "ditto" not in row
    assert set(summarise_run(run)["test_per_site"]) == set(SITES)


@pytest.mark.slow
def test_scaffold_control_variates_travel_both_ways_and_change(sim_data: Path, tmp_path: Path):
    """The server's control variate reaches every site with each training task, covering every trainable
    parameter; each site's change of its own goes back with its update; the server's variate starts at zero and
    then is the sites' changes averaged (weighted as FLARE's Scaffold weighs them, by the sites' case counts)."""
    params = tiny_params(rounds=2, local_epochs=1, audit_transfer=True, audit=True)
    run = run_simulation("brats_scaffold", params, sim_data, tmp_path)
    trainable = {k: list(p.shape) for k, p in params.model().named_parameters()}
    controls = {}
    for site in SITES:
        for direction, key in (("incoming", "SCAFFOLD_CTRL_GLOBAL"), ("outgoing", "SCAFFOLD_CTRL_DIFF")):
            rows = _train_rows(run, site, direction)
            assert len(rows) == params.rounds
            for row in rows:
                entry = row["meta"]["items"][getattr(AlgorithmConstants, key)]["items"]
                assert {k: d["shape"] for k, d in entry.items()} == trainable, (site, direction)
        controls[site] = [torch.load(_site(run, site) / f"controls_round_{r}.pt") for r in range(params.rounds)]
        records = [r["scaffold"] for r in _jsonl(_site(run, site) / "rounds.jsonl")]
        assert records[0]["c_global_norm"] == 0 and records[1]["c_global_norm"] > 0
        assert records[0]["c_delta"] != records[1]["c_delta"] and min(r["c_delta_norm"] for r in records) > 0
    received = [controls[s][1]["c_global"] for s in SITES]
    assert len({fingerprint(c) for c in received}) == 1, "every site receives the same server control variate"
    weights = {s: len(_datalist(run, s)["training"]) for s in SITES}
    for key in trainable:
        expected = sum(controls[s][0]["c_delta"][key].double() * w for s, w in weights.items()) / sum(weights.values())
        torch.testing.assert_close(received[0][key].double(), expected, rtol=1e-5, atol=1e-7, msg=key)
    assert set(summarise_run(run)["test_per_site"]) == set(SITES)


@pytest.mark.slow
def test_ditto_keeps_a_personal_model_and_scores_it_on_the_site_test_split(sim_data: Path, tmp_path: Path):
    """Each site trains a personal model in every round besides the global one; it never leaves the site, differs from
    the final global model, and is what the site scores on its own test split after training, recorded per site
    beside the global model's scores on the same cases."""
    params = tiny_params(rounds=1, local_epochs=1, ditto_lambda=0.1, personal_epochs=1, audit=True, cross_site="all")
    run = run_simulation("brats_ditto", params, sim_data, tmp_path)
    global_model = _global_model(run)
    summary = summarise_run(run)
    for site in SITES:
        rows = _jsonl(_site(run, site) / "rounds.jsonl")
        assert [r["ditto"]["steps"] > 0 for r in rows] == [True] * params.rounds
        assert rows[0]["ditto"]["extra_loss"] > 0, "the personal model is pulled towards the global one"
        scored = torch.load(_site(run, site) / "personalised_model.pt", weights_only=False)["state_dict"]
        kept = torch.load(_site(run, site) / "ditto" / "personalized_model.pt")["model"]
        assert fingerprint(scored) == fingerprint(kept)
        assert not any(torch.equal(scored[k], global_model[k].to(scored[k].dtype)) for k in scored), site
        sent = torch.load(_site(run, site) / "sent_round_0.pt")
        assert fingerprint(sent) != fingerprint(kept), "what a site sends is its global model, not its personal one"
        scores = json.loads((_site(run, site) / "personalised_test.json").read_text())
        assert sorted(c["case_id"] for c in scores["per_case"]) == sorted(
            c["case_id"] for c in _datalist(run, site)["test"]
        )
        assert summary["test_per_site"][site]["dice_mean"] == pytest.approx(scores["dice_mean"])
    assert summary["global_test_per_site"] is not None and summary["global_test_per_site"] != summary["test_per_site"]
