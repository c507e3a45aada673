"""Where a resumed sequential job goes on (``SequentialTransfer._resume_point``), from the meta its server saved with
the travelling model after a visit. The whole resumption runs in a POC in ``tests/integration/test_resume_poc.py``."""

from __future__ import annotations

import json

import pytest
import torch
from brats_fl.protocol import SEQUENTIAL_META
from brats_fl.server.sequential import SequentialTransfer
from nvflare.app_common.abstract.fl_model import FLModel

SITES = ["site-1", "site-2", "site-3"]


def _saved(pass_: int, visited: int, sites: list[str] = SITES, order: str = "shuffle") -> FLModel:
    record = {"order": order, "sites": sites, "passes": [{"pass": pass_, "order": sites, "visits": []}], "bytes": {}}
    where = {"pass": pass_, "visited": visited, "norms": [1.5, 2.0], "record": json.dumps(record)}
    return FLModel(params={"w": torch.ones(1)}, meta={"current_round": pass_ - 1, SEQUENTIAL_META: where})


def test_a_resumed_sequential_job_goes_on_after_the_saved_visit_with_the_screens_norms():
    controller = SequentialTransfer(num_rounds=2, order="shuffle")
    first, visited, record = controller._resume_point(_saved(1, 2), SITES)
    assert (first, visited) == (1, 2)
    assert controller._norms == [1.5, 2.0]  # the screen compares the next visits with the earlier ones
    assert record["resumed"] == [{"pass": 1, "visited": 2}] and record["passes"][0]["pass"] == 1


@pytest.mark.parametrize(
    ("model", "why"),
    [
        (FLModel(params={"w": torch.ones(1)}, meta={"current_round": 0}), "not a sequential job's"),
        (_saved(0, 1, sites=SITES[:2]), r"a job of sites \['site-1', 'site-2'\] in shuffle order as one of sites"),
        (_saved(0, 1, order="fixed"), "in fixed order as one of sites"),
        (_saved(2, 0), "nothing to resume: the checkpoint closed pass 1, the job's last"),
    ],
)
def test_a_checkpoint_of_another_job_or_of_a_finished_one_is_refused(model: FLModel, why: str):
    with pytest.raises(ValueError, match=why):
        SequentialTransfer(num_rounds=2, order="shuffle")._resume_point(model, SITES)
