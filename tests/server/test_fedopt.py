"""FedOpt's server step (Reddi et al. 2021, Algorithm 2) on hand-made updates: parameters take the optimiser's step,
batch-norm statistics are averaged; and the FedOpt jobs' wiring and parameters."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from brats_fl.cli.main import main
from brats_fl.jobs.catalogue import JobParams
from brats_fl.jobs.export import export_jobs
from brats_fl.seg.model import BratsUNet
from brats_fl.server.fedopt import ServerOptimizer, pseudo_gradient, server_update

LR, B1, B2, TAU = 1e-2, 0.9, 0.99, 1e-3
WEIGHTS = {"site-1": 2.0, "site-2": 3.0, "site-3": 5.0}


def _sites(model: BratsUNet) -> dict[str, dict[str, torch.Tensor]]:
    """Each site's model after a round: every float key moved by its own noise, its batch counter by its own steps."""
    out = {}
    for i, site in enumerate(WEIGHTS):
        gen = torch.Generator().manual_seed(i)
        state = {}
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                noise = 0.05 * torch.randn(value.shape, generator=gen)
                state[key] = value + (noise.abs() if "running_var" in key else noise)
            else:
                state[key] = value + 3 + 4 * i  # num_batches_tracked: 3, 7, 11 steps
        out[site] = state
    return out


def _mean(states: dict[str, dict[str, torch.Tensor]], key: str) -> torch.Tensor:
    total = sum(WEIGHTS.values())
    return sum(states[s][key].double() * w for s, w in WEIGHTS.items()) / total


def test_bn_model_parameters_take_the_adam_step_and_running_statistics_are_averaged():
    model = BratsUNet(channels=(4, 8), strides=(2,), norm="batch")
    x = {k: v.clone() for k, v in model.state_dict().items()}
    params = {k for k, _ in model.named_parameters()}
    buffers = set(x) - params
    assert any(k.endswith("running_var") for k in buffers) and any(k.endswith("num_batches_tracked") for k in buffers)
    sites = _sites(model)
    full = {k: _mean(sites, k).to(torch.float32) for k in x}  # the screening aggregator's full-weights average
    diff = {k: (_mean(sites, k) - x[k].double()).to(torch.float32) for k in x}  # its average of differences

    new = server_update(x, pseudo_gradient(x, full, is_diff=False), params, ServerOptimizer("adam", LR, B1, B2, TAU))
    for key in params:  # Algorithm 2's first FedAdam step: m = (1 - b1) d, v = b2 tau^2 + (1 - b2) d^2
        d = _mean(sites, key) - x[key].double()
        step = LR * (1 - B1) * d / ((B2 * TAU**2 + (1 - B2) * d.square()).sqrt() + TAU)
        torch.testing.assert_close(new[key].double(), x[key].double() + step, rtol=0, atol=1e-6, msg=key)
        assert not torch.allclose(new[key].double(), _mean(sites, key), atol=1e-4), f"{key} is FedAvg's average"
    for key in buffers:  # the weighted average, in the buffer's own dtype: a batch counter stays an integer
        assert new[key].dtype == x[key].dtype, key
        average = _mean(sites, key) if x[key].is_floating_point() else _mean(sites, key).round()
        torch.testing.assert_close(new[key].double(), average, rtol=0, atol=1e-6, msg=key)

    # the sites' differences (transfer "diff") give the same model as their full weights
    again = server_update(x, pseudo_gradient(x, diff, is_diff=True), params, ServerOptimizer("adam", LR, B1, B2, TAU))
    for key in x:
        torch.testing.assert_close(again[key], new[key], rtol=0, atol=1e-6, msg=key)


def _algorithm_2(rule: str, deltas: list[float], x: float = 0.5) -> float:
    """Reddi et al.'s Algorithm 2 on one scalar parameter, written out."""
    m, v = 0.0, TAU**2
    for d in deltas:
        m = B1 * m + (1 - B1) * d
        if rule == "adagrad":
            v = v + d * d
        elif rule == "yogi":
            v = v - (1 - B2) * d * d * math.copysign(1, v - d * d)
        else:
            v = B2 * v + (1 - B2) * d * d
        x = x + LR * m / (math.sqrt(v) + TAU)
    return x


@pytest.mark.parametrize("rule", ["adagrad", "yogi", "adam"])
def test_each_server_optimiser_follows_algorithm_2_across_rounds(rule: str):
    """Moments carry from round to round; a small third update lets Yogi's second moment shrink, Adagrad's grow."""
    opt = ServerOptimizer(rule, LR, B1, B2, TAU)
    x = {"w": torch.tensor([0.5], dtype=torch.float64)}
    deltas = [0.2, -0.1, 0.001]
    for d in deltas:
        x = server_update(x, {"w": torch.tensor([d], dtype=torch.float64)}, {"w"}, opt)
    assert x["w"].item() == pytest.approx(_algorithm_2(rule, deltas), abs=1e-12)
    v = opt.v["w"].item()
    assert (v > 0.2**2 + 0.1**2) if rule == "adagrad" else (v < 0.2**2)


@pytest.mark.parametrize("rule", ["adagrad", "yogi", "adam"])
def test_a_server_optimiser_restored_from_its_saved_moments_steps_as_if_never_stopped(rule: str, tmp_path: Path):
    """Two rounds in one go, or one round, the moments saved and loaded into a new optimiser, then the second: the
    same model bit for bit (what a resumed FedOpt job's server does, ``FedOptController``)."""
    x = {"w": torch.zeros(3), "b": torch.ones(2)}
    deltas = [{"w": torch.tensor([0.1, -0.2, 0.3]), "b": torch.tensor([0.5, 0.0])}, {"w": torch.full((3,), 0.05)}]
    deltas[1]["b"] = torch.tensor([-0.1, 0.2])
    through = ServerOptimizer(rule, LR, B1, B2, TAU)
    expected = through.step(through.step(x, deltas[0]), deltas[1])
    first = ServerOptimizer(rule, LR, B1, B2, TAU)
    after_one = first.step(x, deltas[0])
    torch.save(first.state_dict(), tmp_path / "moments.pt")
    resumed = ServerOptimizer(rule, LR, B1, B2, TAU)
    resumed.load_state_dict(torch.load(tmp_path / "moments.pt"))
    got = resumed.step(after_one, deltas[1])
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    fresh = ServerOptimizer(rule, LR, B1, B2, TAU).step(after_one, deltas[1])  # without the moments: another model
    assert not all(torch.equal(fresh[k], expected[k]) for k in expected)
    other = "adam" if rule != "adam" else "yogi"
    with pytest.raises(ValueError, match=f"the saved moments are Fed{rule}'s, this job's optimiser is Fed{other}"):
        ServerOptimizer(other, LR, B1, B2, TAU).load_state_dict(first.state_dict())


def test_three_server_optimisers_differ_and_refuse_bad_settings():
    finals = {rule: _algorithm_2(rule, [0.2, -0.1, 0.001]) for rule in ("adagrad", "yogi", "adam")}
    assert len({round(v, 9) for v in finals.values()}) == 3
    for bad in [
        ("sgd", LR, B1, B2, TAU),
        ("adam", 0, B1, B2, TAU),
        ("adam", LR, 1.0, B2, TAU),
        ("yogi", LR, B1, B2, 0),
    ]:
        with pytest.raises(ValueError):
            ServerOptimizer(*bad)


@pytest.mark.parametrize(("job", "rule"), [("brats_fedadam", "adam"), ("brats_fedyogi", "yogi"),
                                           ("brats_fedadagrad", "adagrad")])  # fmt: skip
def test_fedopt_jobs_step_the_model_parameters_with_the_schema_settings(job: str, rule: str, tmp_path: Path):
    params = JobParams(server_lr=0.03, beta1=0.5, beta2=0.9, tau=1e-4, min_responses=2, round_wait=30)
    (folder,) = export_jobs(tmp_path, [job], params)
    config = json.loads((folder / "app" / "config" / "config_fed_server.json").read_text())
    (controller,) = [w["args"] for w in config["workflows"] if w["path"] == "brats_fl.server.fedopt.FedOptController"]
    assert controller["server_optimizer"] == rule and (controller["min_responses"], controller["round_wait"]) == (2, 30)
    assert (controller["server_lr"], controller["beta1"], controller["tau"]) == (0.03, 0.5, 1e-4)
    assert controller.get("beta2") == (None if rule == "adagrad" else 0.9)  # FedAdagrad has no beta2
    assert controller["parameter_keys"] == [k for k, _ in params.model().named_parameters()]
    assert controller["aggregator"]["path"] == "brats_fl.server.screening.ScreenedAggregator"
    paths = {c["path"] for c in config["components"] + config["workflows"]}
    assert {"brats_fl.server.run_record.RunRecord", "brats_fl.server.personalise.PersonalisedEvaluation"} <= paths
    # a resumed job's server optimiser goes on from the moments saved beside the checkpoint
    assert "resume_from" not in controller
    (resumed,) = export_jobs(tmp_path / "resumed", [job], JobParams(resume_from="/x/FL_global_model.pt"))
    config = json.loads((resumed / "app" / "config" / "config_fed_server.json").read_text())
    (again,) = [w["args"] for w in config["workflows"] if w["path"] == "brats_fl.server.fedopt.FedOptController"]
    assert (again["resume"], again["resume_from"]) == (True, "/x/FL_global_model.pt")
    for bad in ({"server_lr": 0}, {"beta1": 1.0}, {"beta2": -0.1}, {"tau": 0}):
        with pytest.raises(ValueError, match="job parameter out of range"):
            JobParams(**bad)


@pytest.mark.parametrize(("argv", "option"), [(["brats_fedadagrad", "--beta2", "0.9"], "--beta2"),
                                              (["brats_fedavg", "--server-lr", "0.1"], "--server-lr"),
                                              (["brats_fedadam", "--personal", "norm"], "--personal")])  # fmt: skip
def test_fedopt_options_are_refused_where_unused(argv: list[str], option: str, capsys):
    assert main(["run", *argv, "--workspace", "/nonexistent/never-written"]) == 2
    assert f"does not use {option}" in capsys.readouterr().err
