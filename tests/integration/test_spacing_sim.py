"""FedAvg at 2 mm in FLARE's simulator, with cheap evaluation, the sites' disk cache and the post-processing whose
volumes the sites choose on their validation splits, pooled where a site's split is too small."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from brats_fl.data.labels import REGIONS
from brats_fl.jobs.simulate import run_simulation
from brats_fl.protocol import CHOICES_FILE
from brats_fl.results.report import FINAL_GLOBAL, summarise_run
from brats_fl.seg.inference import trained_spacing
from brats_fl.seg.postprocess import CANDIDATES, MIN_CASES
from conftest import tiny_params

SITES = ("site-1", "site-2", "site-3")


@pytest.mark.slow
def test_fedavg_at_2_mm_scores_every_site_and_evaluates_the_global_model_only(sim_data: Path, tmp_path: Path):
    config = tmp_path / "simulation.json"
    config.write_text(json.dumps(json.loads(sim_data.read_text()) | {"cache_dir": str(tmp_path / "cache")}))
    params = tiny_params(rounds=2, local_epochs=1, spacing=2.0, cross_site="global", min_volume="auto")
    run = run_simulation("brats_fedavg", params, config, tmp_path / "ws")

    summary = summarise_run(tmp_path / "ws")
    assert set(summary["test_per_site"]) == set(SITES)
    # each site sent its last round's choice (1 or 2 validation cases: too few alone), the server pooled them
    server = run / "server" / "simulate_job"
    sent = json.loads((server / CHOICES_FILE).read_text())
    assert set(sent) == set(SITES) and {c["round"] for c in sent.values()} == {1}
    assert all(c["cases"]["WT"] < MIN_CASES for c in sent.values())
    assert sum(c["cases"]["WT"] for c in sent.values()) >= MIN_CASES
    assert all(0 <= m["dice_mean"] <= 1 for m in summary["test_per_site"].values())
    (cse,) = run.rglob("cross_val_results.json")
    scored = json.loads(cse.read_text())
    # every site scored the server's models, and no site's own: no site was asked to submit one
    assert set(scored) == set(SITES)
    assert all(FINAL_GLOBAL in models and all(m.startswith("SRV_") for m in models) for models in scored.values())
    for site in SITES:
        record = run / site / "simulate_job" / "brats_fl"
        site_json = json.loads((record / "site.json").read_text())
        assert site_json["train"]["spacing"] == 2.0
        assert site_json["data"]["cache_dir"] == str(tmp_path / "cache")
        test = json.loads((record / "personalised_test.json").read_text())
        assert {c["case_id"] for c in test["per_case"]} and "hd95_WT" in test and "lesion_dice_ET" in test
        chosen = test["min_volume"]
        assert set(chosen["volumes"]) == set(REGIONS) and all(v in CANDIDATES for v in chosen["volumes"].values())
        assert site_json["min_volume"] == {"personalised": chosen}
        assert chosen["pooled"] == list(REGIONS) and "notes" not in chosen
        assert chosen["chosen"]["WT"].startswith("pooled over site-1, site-2, site-3's validation splits")
        assert summary["post_processing"][site] == chosen
        # the scores without post-processing, from the same predictions, beside those with it
        assert "unprocessed_dice_WT" in test and "unprocessed_lesion_dice_WT" in test["per_case"][0]
        assert "unprocessed_hd95_WT" not in test
        assert {c["lesion_rule"] for c in test["per_case"]} == {"2023"}  # the phantom's 2020-style cases
        assert trained_spacing(record / "personalised_model.pt") == 2.0
    assert trained_spacing(run / "server" / "simulate_job" / "app_server" / "FL_global_model.pt") == 2.0
    assert any((tmp_path / "cache").glob("*.pt"))
