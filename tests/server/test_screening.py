"""Broken and hostile updates: the screen every controller uses, on the drill's own broken updates."""

from __future__ import annotations

import re

import pytest
import torch
from brats_fl.drills.faults import FaultInjection
from brats_fl.jobs.catalogue import JobParams, cyclic
from brats_fl.server.screening import ScreenedAggregator, outliers, problem, screen_updates, update_norm
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLMetaKey, FLModel
from nvflare.app_common.app_constant import AppConstants

SHAPES = {"w": [2, 3], "b": [3]}


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        ({"w": torch.ones(2, 3), "b": torch.zeros(3)}, None),
        ({"w": torch.ones(2, 3)}, None),  # a key left out stays with its site (FedPer, FedBN)
        ({"w": torch.ones(2, 3), "b": torch.tensor([0.0, float("nan"), 0.0])}, "b holds NaN"),
        ({"w": torch.full((2, 3), float("-inf"))}, "w holds infinite values"),
        ({"w": torch.ones(2, 3), "extra": torch.ones(1)}, r"unexpected key\(s\) \['extra'\]"),
        ({"w": torch.ones(3, 2)}, r"w has shape \[3, 2\], the model's is \[2, 3\]"),
    ],
)
def test_problem_names_what_is_wrong(update: dict, reason: str | None):
    found = problem(update, SHAPES)
    if reason is None:
        assert found is None
    else:
        assert found is not None and re.search(reason, found), found


@pytest.mark.parametrize(
    "changes",
    [
        {"norm_ratio": 1.0},
        {"min_good": 0},
        {"min_good": 4},
        {"faults": {"site-2": ["nan", "poison"]}},
    ],
)
def test_screening_parameters_are_range_checked(changes: dict):
    with pytest.raises(ValueError, match="job parameter out of range"):
        JobParams(**changes)


def test_a_whole_model_must_hold_every_key():
    assert problem({"w": torch.ones(2, 3)}, SHAPES) is None
    assert problem({"w": torch.ones(2, 3)}, SHAPES, complete=True) == "left out key(s) ['b'] (1 in all)"


def test_update_norm_measures_the_step_from_the_model_sent():
    sent = {"w": torch.ones(2, 3), "b": torch.zeros(3)}
    update = {"w": torch.ones(2, 3), "b": torch.tensor([3.0, 4.0, 0.0])}
    assert update_norm(update, sent) == pytest.approx(5.0)
    assert update_norm({"b": torch.tensor([3.0, 4.0, 0.0])}, None) == pytest.approx(5.0)  # already a difference


def test_an_outlier_is_measured_against_the_others_and_earlier_updates():
    # against the median of the others, never one's own: with two sites the outlier still stands out
    assert list(outliers({"a": 1.0, "b": 11.0}, 10)) == ["b"]
    assert outliers({"a": 1.0, "b": 9.0}, 10) == {}
    assert outliers({"only": 50.0}, 10) == {}  # nothing to compare with
    # a sequential visit, alone, against the earlier good visits
    (why,) = outliers({"site-2": 50.0}, 10, earlier=[1.0, 2.0, 9.0]).values()
    assert why == "update norm 50 is over 10 times the others' median (2)"


def _drill(update: dict[str, torch.Tensor], fault: str) -> dict:
    """What FaultInjection makes site-2 send in round 0 instead of ``update``."""
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, "site-2", private=False)
    dxo = DXO(DataKind.WEIGHTS, data=dict(update))
    shareable = dxo.to_shareable()
    shareable.set_header(AppConstants.CURRENT_ROUND, 0)
    out = FaultInjection({"site-2": [fault]}).process_dxo(dxo, shareable, fl_ctx)
    return out.data


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("nan", "holds NaN"),
        ("inf", "holds infinite values"),
        ("key", r"unexpected key\(s\) \['smuggled'\]"),
        ("shape", r"has shape \[6\], the model's is \[2, 3\]"),
        ("scale", r"update norm .* is over 10 times the others' median"),
    ],
)
def test_every_drilled_fault_is_refused_and_the_good_updates_kept(fault: str, reason: str):
    """The screen the sequential and HyperSeg controllers call: a round of three whole models, each measured
    against the model its site was sent, site-2's broken by the drill."""
    generator = torch.Generator().manual_seed(0)
    sent = {"w": torch.randn(2, 3, generator=generator), "b": torch.randn(3, generator=generator)}
    trained = {s: {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in sent.items()} for s in "123"}
    updates = {f"site-{s}": params for s, params in trained.items()}
    updates["site-2"] = _drill(updates["site-2"], fault)
    norms, refused = screen_updates(updates, dict.fromkeys(updates, sent), SHAPES, 10.0, complete=True)
    assert sorted(norms) == ["site-1", "site-3"] and list(refused) == ["site-2"]
    assert re.search(reason, refused["site-2"]), refused
    assert norms["site-1"] == pytest.approx(update_norm(trained["1"], sent))


def test_a_sequential_job_refuses_min_good():
    with pytest.raises(ValueError, match="min_good is for jobs that average a round"):
        cyclic(JobParams(min_good=2))


def test_shared_batch_norm_statistics_are_a_weighted_mean_and_the_count_stays_an_integer():
    """FedAvg with batch norm shared: the running statistics are averaged like the weights (case-weighted), never
    measured as an update, and num_batches_tracked comes back an integer, as the sites' buffer is."""
    shapes = {"w": [2], "bn.running_mean": [2], "bn.num_batches_tracked": []}
    aggregator = ScreenedAggregator(shapes)
    aggregator._global = {
        "w": torch.zeros(2),
        "bn.running_mean": torch.zeros(2),
        "bn.num_batches_tracked": torch.tensor(0),
    }
    for site, cases, mean, batches in (("site-1", 1, 1.0, 10), ("site-2", 3, 3.0, 30)):
        update = {"w": torch.full((2,), mean), "bn.running_mean": torch.full((2,), mean)}
        update["bn.num_batches_tracked"] = torch.tensor(batches)
        meta = {"client_name": site, FLMetaKey.NUM_STEPS_CURRENT_ROUND: cases}
        aggregator.accept_model(FLModel(params=update, meta=meta))
    # the counts (10 and 30 steps) do not enter the update norm: the norms are those of the float tensors
    assert aggregator._screen_norms() == pytest.approx({"site-1": 2**0.5 * 2**0.5, "site-2": 3 * 2**0.5 * 2**0.5})
    average = aggregator._average().params
    torch.testing.assert_close(average["bn.running_mean"], torch.full((2,), 2.5))
    assert average["bn.num_batches_tracked"].dtype == torch.int64 and int(average["bn.num_batches_tracked"]) == 25
