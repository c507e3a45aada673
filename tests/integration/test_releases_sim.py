"""One federation whose sites hold four BraTS releases, end to end: phantom files of each release, its datalists,
FedAvg in FLARE's simulator on the same three regions, and predictions written in each case's own labels."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from brats_fl.cli.main import main
from brats_fl.data.labels import convention
from brats_fl.data.layout import PHANTOM_RELEASES, release
from brats_fl.jobs.simulate import run_simulation
from conftest import tiny_params

#: site-1 2020, site-2 2021, site-3 2023, site-4 2024-gli-post
SITES = {f"site-{k}": name for k, name in enumerate(PHANTOM_RELEASES, start=1)}
#: three cases per site; in 2024-gli-post the first (the test case) has no cavity and the second (the training case)
#: has one
SEED = "4"


def _prepare(tmp_path: Path) -> Path:
    """Each release's phantom in its own folder, its datalist written by ``brats-fl partition``, and a site
    configuration giving site k the k-th release."""
    sites = {}
    for site, name in SITES.items():
        data, lists = tmp_path / "data" / name, tmp_path / "lists" / name
        phantom = ["phantom", "--out", str(data), "--release", name, "--cases", "3", "--sites", "1", "--seed", SEED]
        assert main([*phantom, "--shape", "64", "64", "48"]) == 0
        declared = ["--release", name] if release(name).declared else []
        split = ["--split", "0.34", "0.33", "0.33"]
        assert main(["partition", str(data), "--sites", "1", "--out", str(lists), *split, *declared]) == 0
        sites[site] = {"data_root": str(data), "datalist": str(lists / "site-1.json")}
    config = tmp_path / "sites.json"
    config.write_text(json.dumps({"threads": 1, "state_dir": str(tmp_path / "state"), "sites": sites}))
    return config


@pytest.mark.slow
def test_sites_on_four_releases_train_on_the_same_regions_and_predict_in_their_own_labels(tmp_path: Path):
    config = _prepare(tmp_path)
    params = tiny_params(rounds=2, local_epochs=1, sites=len(SITES), cross_site="none")
    run = run_simulation("brats_fedavg", params, config, tmp_path / "ws")

    sent = {}
    for site, name in SITES.items():
        record = run / site / "simulate_job" / "brats_fl"
        doc = json.loads(Path(json.loads((record / "site.json").read_text())["data"]["datalist"]).read_text())
        assert {e["release"] for split in ("training", "validation", "test") for e in doc[split]} == {name}
        rows = [json.loads(line) for line in (record / "rounds.jsonl").read_text().splitlines()]
        sent[site] = [r["sent"] for r in rows]  # fingerprints of the exact weights sent each round
        assert len(sent[site]) == params.rounds
    # 2020, 2021 and 2023 sites hold the same phantom cases under their own names and label values: read by their
    # own conventions they are the same regions, so the three sites sent the same weights, bit for bit
    assert sent["site-1"] == sent["site-2"] == sent["site-3"]
    # the 2024 site's training case has a resection cavity (label 4, in no region): other regions, other weights
    meta = json.loads((tmp_path / "data" / SITES["site-4"] / "phantom.json").read_text())["cases"]
    training = json.loads((tmp_path / "lists" / SITES["site-4"] / "site-1.json").read_text())["training"]
    assert [c["rc_cm3"] > 0 for c in meta if c["case_id"] == training[0]["case_id"]] == [True]
    assert sent["site-4"][0] != sent["site-3"][0]

    model = run / "server" / "simulate_job" / "app_server" / "FL_global_model.pt"
    predicted = {}
    for name in PHANTOM_RELEASES:
        case = tmp_path / "data" / name / release(name).case_format.format(1)
        out = tmp_path / "pred" / f"{name}.nii.gz"
        options = ["--model", str(model), "--case", str(case), "--out", str(out), "--patch", "32", "32", "32"]
        assert main(["predict", *options]) == 0
        predicted[name] = np.asarray(nib.load(str(out)).dataobj)
        assert set(np.unique(predicted[name]).tolist()) <= set(convention(release(name).convention).labels), name
    first = predicted["2020"]
    assert (first == 4).any(), "no enhancing tumour predicted: the ET values below would go unchecked"
    # the same images give the same prediction, written with each release's ET value: 4 until 2021, 3 from 2023
    assert np.array_equal(predicted["2021"], first)
    assert np.array_equal(predicted["2023"], np.where(first == 4, 3, first))
    # case 1 of the 2024 site has no cavity: it is the 2023 case, and its prediction never holds a 4
    assert np.array_equal(predicted["2024-gli-post"], predicted["2023"])
