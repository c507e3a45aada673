"""The sites' post-processing choices reach the final task pooled (brats_fl.server.postprocess): the server's filter
keeps each site's latest, and the pooled sums are every site's sums added."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from brats_fl.data.labels import REGIONS
from brats_fl.protocol import CHOICE_META, CHOICES_FILE, POOLED_META
from brats_fl.seg.postprocess import Choice, received_pool
from brats_fl.server.postprocess import ChoiceCollector, pooled_meta
from nvflare.apis.dxo import DXO, DataKind


class _Context:
    """The little of FLARE's FLContext the filter reads: the sending site and the server's run folder."""

    def __init__(self, site: str, run_dir: Path):
        self.site, self.run_dir = site, run_dir

    def get_peer_context(self):
        return SimpleNamespace(get_identity_name=lambda: self.site)

    def get_job_id(self) -> str:
        return "job"

    def get_engine(self):
        workspace = SimpleNamespace(get_run_dir=lambda job: str(self.run_dir))
        return SimpleNamespace(get_workspace=lambda: workspace)


def _site_choice(cases: int, score: float) -> Choice:
    choice = Choice(rule="2023")
    for region in REGIONS:
        choice.totals[region] += score * cases
        choice.cases[region] = cases
    return choice


def _result(meta: dict):
    return DXO(DataKind.WEIGHTS, data={}, meta=meta).to_shareable()


def test_the_server_keeps_each_sites_latest_choice_and_sends_their_sum(tmp_path: Path):
    collector = ChoiceCollector()
    assert pooled_meta(tmp_path) == {}  # no site sent one: the final task carries nothing
    collector.process(_result({"site": "site-1"}), _Context("site-1", tmp_path))  # a result without a choice
    assert not (tmp_path / CHOICES_FILE).exists()
    sent = {"site-1": _site_choice(1, 0.5), "site-2": _site_choice(2, 0.25)}
    collector.process(
        _result({CHOICE_META: _site_choice(5, 0.9).to_dict() | {"round": 1}}), _Context("site-1", tmp_path)
    )
    for site, choice in sent.items():  # a later result of site-1 replaces its earlier one
        collector.process(_result({CHOICE_META: choice.to_dict() | {"round": 2}}), _Context(site, tmp_path))
    kept = json.loads((tmp_path / CHOICES_FILE).read_text())
    assert set(kept) == {"site-1", "site-2"} and kept["site-1"]["cases"]["WT"] == 1

    meta = pooled_meta(tmp_path)
    assert meta[POOLED_META]["sites"] == ["site-1", "site-2"]
    pooled, over = received_pool(meta)
    assert over == "site-1, site-2's validation splits, the model received in round 2"
    for region in REGIONS:
        assert pooled.cases[region] == 3
        np.testing.assert_allclose(pooled.totals[region], 0.5 * 1 + 0.25 * 2)
    assert received_pool({}) == (None, "")
