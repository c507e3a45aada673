"""SegViz partial labels: hidden labels, the masked loss, and the multi-head job in FLARE's simulator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from brats_fl.data.checks import DataError
from brats_fl.data.datalist import load_datalist
from brats_fl.data.labels import REGIONS
from brats_fl.data.loading import ANNOTATED, eval_loader
from brats_fl.jobs.catalogue import JobParams
from brats_fl.protocol import ANNOTATED_META
from brats_fl.seg.model import head_keys
from brats_fl.seg.trainer import RegionLoss
from brats_fl.server.screening import expected_shapes
from brats_fl.server.segviz import TaskHeadAggregator
from nvflare.app_common.abstract.fl_model import FLMetaKey, FLModel


def test_datalists_record_annotations_and_the_pipeline_hides_the_rest(partial_sites: Path, tiny_phantom: Path):
    lists = partial_sites.parent / "lists"
    site = load_datalist(lists / "site-3.json", tiny_phantom)
    assert site.annotated() == ["ET"]
    pooled = load_datalist(lists / "site-All.json", tiny_phantom)
    assert {tuple(i["annotated"]) for i in pooled.items("training")} == {("WT",), ("TC",), ("ET",)}
    items = site.items("training") + site.items("validation")
    hidden = list(eval_loader(items))
    full = list(eval_loader([{k: v for k, v in i.items() if k != ANNOTATED} for i in items]))
    assert all(b[ANNOTATED].tolist() == [[0.0, 0.0, 1.0]] for b in hidden)  # REGIONS order TC, WT, ET
    et = REGIONS.index("ET")
    assert any(f["label"][0, et].any() for f in full), "no enhancing tumour to keep"
    for h, f in zip(hidden, full, strict=True):
        assert torch.equal(h["label"][0, et], f["label"][0, et]), "the annotated region is kept"
        assert f["label"][0, REGIONS.index("WT")].any(), "every phantom case has a tumour"
        assert not h["label"][0, [i for i in range(3) if i != et]].any(), "WT and TC are hidden from an ET-only site"


def test_bad_annotation_is_refused_naming_the_datalist(partial_sites: Path, tiny_phantom: Path, tmp_path: Path):
    doc = json.loads((partial_sites.parent / "lists" / "site-1.json").read_text())
    doc["training"][0]["annotated"] = ["WT", "oedema"]
    path = tmp_path / "site-1.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"(?s)site-1\.json.*oedema"):
        load_datalist(path, tiny_phantom, check=False)


def test_loss_ignores_unannotated_regions():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, 8, requires_grad=True)
    label = (torch.rand(2, 3, 8, 8, 8) > 0.5).float()
    only_wt = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    RegionLoss(with_ce=True)(logits, label, only_wt).backward()
    grad = logits.grad.abs().flatten(2).sum(-1)
    assert (grad[:, [0, 2]] == 0).all() and (grad[:, 1] > 0).all()
    # whatever an unannotated channel's label says, the loss is the same
    other = label.clone()
    other[:, 0] = 1 - other[:, 0]
    loss = RegionLoss(with_ce=False)
    assert loss(logits, label, only_wt) == loss(logits, other, only_wt)
    assert loss(logits, label) != loss(logits, other)  # without a mask, every region counts


def test_server_takes_a_head_only_from_a_site_that_annotates_its_region():
    model = JobParams(channels=(8, 16, 32)).model(multi_head=True)
    state, heads = model.state_dict(), head_keys(model)
    aggregator = TaskHeadAggregator(expected_shapes(state), heads)
    meta = {"client_name": "site-1", ANNOTATED_META: ["WT"], FLMetaKey.NUM_STEPS_CURRENT_ROUND: 3}
    aggregator.accept_model(FLModel(params=dict(state), meta=meta))  # a whole model from a WT-only site
    (accepted,) = aggregator._good
    assert set(accepted.params) == set(state) - set(heads["TC"]) - set(heads["ET"])
    assert aggregator._foreign == {"site-1": ["ET", "TC"]}
