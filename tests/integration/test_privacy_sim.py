"""DP-SGD at the sites and the privacy ledger, in FLARE's simulator: what each site spent, what left it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from brats_fl.jobs.simulate import run_simulation
from brats_fl.protocol import PRIVACY_META
from brats_fl.results.privacy import ledger_summary
from brats_fl.results.report import summarise_run
from conftest import tiny_params

SITES = ("site-1", "site-2", "site-3")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_dp_sgd_fedavg_accounts_every_round_and_sends_only_dp_trained_weights(sim_data: Path, tmp_path: Path):
    """A FedAvg job whose sites train with DP-SGD at epsilon 8 under a budget of 8: the server's ledger holds each
    site's epsilon for each round, growing to at most 8 by the last; the run record, the report's summary and the
    sites' own records agree; and what left each site (its manifest) is its DP-trained weights with their privacy
    figures, the global model it holds for cross-site evaluation, and scores."""
    params = tiny_params(
        rounds=2, local_epochs=1, lr=3e-3, dp_epsilon=8.0, privacy_budget=8.0, audit_transfer=True, cross_site="all"
    )
    run = run_simulation("brats_fedavg", params, sim_data, tmp_path)
    summary = ledger_summary(run)
    assert summary["mechanisms"] == ["dp-sgd"] and summary["budget"] == 8.0
    assert sorted(summary["per_site"]) == list(SITES)
    for site in SITES:
        rows = [r for r in summary["rows"] if r["site"] == site]
        assert [r["round"] for r in rows] == [0, 1]
        dp = [r["mechanisms"][0] for r in rows]
        assert all(d["mechanism"] == "dp-sgd" and d["delta"] == 1e-5 for d in dp)
        assert 0 < dp[0]["epsilon"] < dp[1]["epsilon"] <= 8.0
        assert dp[1]["steps"] == dp[1]["planned_steps"]  # every planned step spent, none more
        assert dp[1]["epsilon"] > 7.5 and dp[1]["epsilon_round"] < dp[1]["epsilon"]
        assert rows[-1]["epsilon"] == dp[1]["epsilon"]
        site_dir = run / site / "simulate_job" / "brats_fl"
        recorded = [r["privacy"] for r in _lines(site_dir / "rounds.jsonl")]
        assert [r["epsilon"] for r in recorded] == [d["epsilon"] for d in dp]
        for row in _lines(site_dir / "outgoing.jsonl"):
            meta = row["meta"]["items"]
            if row["task"] == "train":
                assert row["kind"] == "WEIGHTS" and PRIVACY_META in meta
            elif row["task"] == "submit_model":
                # the final global model with nothing kept at the site: DP-SGD's guarantee covers it (post-processing)
                assert row["kind"] == "WEIGHTS"
            else:
                assert row["kind"] == "METRICS" and row["payload_bytes"] == 0, row["task"]
    record = json.loads(next(run.rglob("brats_fl_run.json")).read_text())
    assert record["privacy"] == {k: v for k, v in summary.items() if k != "rows"}
    assert summary["guarantee"].startswith("epsilon ") and summary["guarantee"].endswith("(dp-sgd)")
    assert summarise_run(run)["privacy"]["guarantee"] == summary["guarantee"]


@pytest.mark.slow
def test_filtered_job_sends_no_whole_model_and_records_no_guarantee(sim_data: Path, tmp_path: Path):
    """Percentile filtering with the server's models alone scored across sites: no site's whole model leaves (only
    filtered training differences and scores), and the ledger says, for every site and round, that percentile
    filtering gives no differential-privacy guarantee."""
    params = tiny_params(
        rounds=1, local_epochs=1, lr=3e-3, privacy="percentile", transfer="diff", cross_site="global",
        audit_transfer=True,
    )  # fmt: skip
    run = run_simulation("brats_fedavg", params, sim_data, tmp_path)
    for site in SITES:
        rows = _lines(run / site / "simulate_job" / "brats_fl" / "outgoing.jsonl")
        assert {r["task"] for r in rows if r["kind"] != "METRICS"} == {"train"}
        assert {r["kind"] for r in rows if r["task"] == "train"} == {"WEIGHT_DIFF"}
    summary = ledger_summary(run)
    assert summary["guarantee"] == "no differential-privacy guarantee" and summary["epsilon"] is None
    assert {(r["site"], r["round"]) for r in summary["rows"]} == {(s, 0) for s in SITES}
    assert all(r["mechanisms"][0]["mechanism"] == "percentile" for r in summary["rows"])
