"""FedYogi in FLARE's simulator (no mocks): each new global model is Algorithm 2's step on the screened, case-weighted
average of what the sites sent, not that average; and the job keeps FedAvg's screening, evaluation and run record.

The tiny U-Net has affine instance norm, which keeps no running statistics: that every such key is averaged instead
is checked on a batch-norm model in tests/server/test_fedopt.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from brats_fl.jobs.simulate import run_simulation
from brats_fl.protocol import PERSONALISED_RESULTS, RUN_RECORD, SCREENING_FILE
from conftest import tiny_params

SITES = ("site-1", "site-2", "site-3")
PARAMS = tiny_params(rounds=2, local_epochs=1, audit=True, server_lr=0.01, beta1=0.9, beta2=0.99, tau=1e-3)


def _yogi(x: dict, delta: dict, m: dict, v: dict, p=PARAMS) -> dict:
    """One round of Reddi et al.'s Algorithm 2 (FedYogi), m and v carried over in place."""
    out = {}
    for k, d in delta.items():
        m[k] = p.beta1 * m.get(k, 0) + (1 - p.beta1) * d
        v0 = v.get(k, torch.full_like(d, p.tau**2))
        v[k] = v0 - (1 - p.beta2) * d.square() * torch.sign(v0 - d.square())
        out[k] = x[k] + p.server_lr * m[k] / (v[k].sqrt() + p.tau)
    return out


@pytest.mark.slow
def test_fedyogi_global_model_is_the_server_step_on_the_averaged_update(sim_data: Path, tmp_path: Path):
    run = run_simulation("brats_fedyogi", PARAMS, sim_data, tmp_path)
    server = run / "server" / "simulate_job"
    records = {s: run / s / "simulate_job" / "brats_fl" for s in SITES}
    weights = {}
    for site, record in records.items():
        datalist = json.loads((record / "site.json").read_text())["data"]["datalist"]
        weights[site] = len(json.loads(Path(datalist).read_text())["training"])
    total = sum(weights.values())

    blob = torch.load(server / "app_server" / "FL_global_model.pt", map_location="cpu", weights_only=False)
    final = {k: torch.as_tensor(v).double() for k, v in blob["model"].items()}
    parameters = {k for k, _ in PARAMS.model().named_parameters()}
    assert set(final) == parameters  # instance norm: nothing to average instead

    m, v = {}, {}
    x = {k: t.double() for k, t in PARAMS.model().state_dict().items()}
    for rnd in range(PARAMS.rounds):
        # every site received the same global model x_t: the initial one, then the server's step
        for site, record in records.items():
            received = torch.load(record / f"received_round_{rnd}.pt")
            for k in x:
                torch.testing.assert_close(received[k].double(), x[k], rtol=0, atol=1e-6, msg=(site, rnd, k))
        sent = {s: torch.load(r / f"sent_round_{rnd}.pt") for s, r in records.items()}
        average = {k: sum(sent[s][k].double() * w for s, w in weights.items()) / total for k in x}
        x = _yogi(x, {k: average[k] - x[k] for k in x}, m, v)
    moved = 0
    for k in final:
        torch.testing.assert_close(final[k], x[k], rtol=0, atol=1e-5, msg=k)
        moved += not torch.allclose(final[k], average[k], atol=1e-4)
    assert moved > len(final) // 2, f"only {moved} of {len(final)} keys differ from FedAvg's average"

    rows = [json.loads(line) for line in (server / SCREENING_FILE).read_text().splitlines()]
    assert [(r["round"], sorted(r["averaged"]), r["refused"]) for r in rows] == [
        (0, list(SITES), {}),
        (1, list(SITES), {}),
    ]
    assert set(json.loads((server / PERSONALISED_RESULTS).read_text())) == set(SITES)
    record = json.loads((server / RUN_RECORD).read_text())
    assert record["job"] == "brats_fedyogi" and record["finished"]
