"""The privacy ledger's arithmetic and the job's privacy budget (``brats_fl.server.privacy``)."""

from __future__ import annotations

import math

import pytest
import torch
from brats_fl.jobs.catalogue import JobParams, build, refuse_unused
from brats_fl.protocol import PRIVACY_META
from brats_fl.server.privacy import entries_for, projected_epsilon, svt_round_epsilon
from brats_fl.server.records import NO_DP, summarise
from brats_fl.transfer.filters import PRIVACY
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_context import FLContext

TINY = {"channels": (8, 16, 32), "patch_size": (32, 32, 32)}
SVT = {"privacy": "svt", "transfer": "diff", "cross_site": "global"}


def test_svt_epsilon_is_flares_own():
    """The projection of SVT's epsilon per round is what FLARE's filter states in the update it filtered."""
    args = {"fraction": 0.2, "epsilon": 0.5, "noise_var": 0.01, "gamma": 1e-3}
    message = DXO(DataKind.WEIGHT_DIFF, data={"w": torch.linspace(-1e-3, 1e-3, 1234)}).to_shareable()
    meta = from_shareable(PRIVACY["svt"](**args).process(message, FLContext())).meta
    assert svt_round_epsilon(args, 1234) == pytest.approx(meta["svt_privacy_budget"]["epsilon_total"])
    entry = entries_for(meta, "svt")[0]
    assert entry["mechanism"] == "svt" and entry["epsilon"] == pytest.approx(
        meta["svt_privacy_accountant"]["epsilon_total"]
    )
    assert projected_epsilon("svt", args, None, 20, 1234) == pytest.approx(20 * svt_round_epsilon(args, 1234))
    assert projected_epsilon("percentile", {}, None, 20, 1234) == math.inf
    assert projected_epsilon("svt", args, 8.0, 20, 1234) == 8.0  # DP-SGD's guarantee survives post-processing


def test_ledger_says_which_filters_guarantee_nothing():
    for name in ("none", "exclude", "percentile"):
        (entry,) = entries_for({}, name)
        assert entry["guarantee"].startswith(NO_DP)
    dp = {"mechanism": "dp-sgd", "epsilon": 3.0, "delta": 1e-5}
    entries = entries_for({PRIVACY_META: dp}, "percentile")
    assert [e["mechanism"] for e in entries] == ["dp-sgd", "percentile"]
    rows = [
        {"site": s, "round": r, "epsilon": e, "delta": 1e-5, "budget": 8.0, "mechanisms": entries}
        for s, r, e in (("site-1", 0, 1.0), ("site-1", 1, 3.0), ("site-2", 1, 2.5))
    ]
    summary = summarise(rows)
    assert summary["epsilon"] == 3.0 and summary["per_site"]["site-2"]["epsilon"] == 2.5
    assert summary["guarantee"] == "epsilon 3, delta 1e-05 (dp-sgd)" and summary["budget"] == 8.0
    rows.append({"site": "site-3", "round": 1, "epsilon": None, "delta": None, "budget": None, "mechanisms": []})
    assert summarise(rows)["guarantee"] == NO_DP and summarise([])["guarantee"] == "not recorded"


@pytest.mark.parametrize(
    ("job", "settings", "message"),
    [
        ("brats_fedavg", {"privacy_budget": 8.0}, f"privacy_budget 8: privacy 'none' gives {NO_DP}"),
        ("brats_fedavg", {"privacy": "percentile", "transfer": "diff", "cross_site": "none", "privacy_budget": 8.0},
         "percentile' gives no differential"),
        # FLARE's SVT defaults spend about n_upload x noise_var per round: thousands for this small U-Net
        ("brats_fedavg", SVT | {"privacy_budget": 100.0}, "would spend epsilon"),
        ("brats_fedavg", {"dp_epsilon": 16.0, "privacy_budget": 8.0}, "DP-SGD at epsilon 16 would spend epsilon 16"),
        ("brats_fedprox", {"dp_epsilon": 8.0}, "does not train with DP-SGD"),
        ("brats_segviz_fedavg", {"dp_epsilon": 8.0}, "does not train with DP-SGD"),
        ("brats_fedbn", {"dp_epsilon": 8.0}, "batch norm"),
    ],
)  # fmt: skip
def test_jobs_refuse_a_budget_they_would_exceed_and_dp_where_it_cannot_hold(job: str, settings: dict, message: str):
    with pytest.raises(ValueError, match=message):
        build(job, JobParams(**TINY, **settings))


def test_dp_jobs_within_budget_are_built_and_unused_dp_options_refused():
    build("brats_fedavg", JobParams(**TINY, dp_epsilon=8.0, privacy_budget=8.0))
    build("brats_fedbn", JobParams(**TINY, dp_epsilon=8.0, norm="instance"))
    with pytest.raises(ValueError, match="--dp-epsilon"):
        refuse_unused("brats_cyclic", {"dp_epsilon": 8.0})
