"""FedProx, SCAFFOLD and Ditto at a site (``brats_fl.site.algorithms``): the math that defines each, on the training
loop with a tiny U-Net and random batches."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from brats_fl.site.algorithms import Ditto, FedProx, Scaffold
from conftest import synthetic_batches, tiny_trainer
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.app_constant import AlgorithmConstants


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys) -> float:
    return float(torch.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in keys)))


def _update_norm(mu: float | None, steps: int = 6) -> float:
    """How far a site's trainable weights move in ``steps`` steps from the global model, with FedProx's ``mu``."""
    trainer = tiny_trainer()
    received = _state(trainer.model)
    prox = None if mu is None else FedProx(mu, trainer.model)
    trainer.train_epochs(synthetic_batches(steps), extra_loss=prox)
    trainable = [k for k, _ in trainer.model.named_parameters()]
    return _distance(_state(trainer.model), received, trainable)


def test_fedprox_at_mu_zero_is_fedavg_bit_for_bit():
    plain, prox = tiny_trainer(), tiny_trainer()
    term = FedProx(0.0, prox.model)
    plain.train_epochs(synthetic_batches(3))
    stats = prox.train_epochs(synthetic_batches(3), extra_loss=term)
    assert stats["extra_loss"] == 0.0 and float(term(prox.model).detach()) == 0.0
    after, expected = _state(prox.model), _state(plain.model)
    assert all(torch.equal(after[k], expected[k]) for k in expected)


def test_fedprox_pulls_the_update_towards_the_global_model():
    free, pulled, held = _update_norm(None), _update_norm(1.0), _update_norm(100.0)
    assert held < pulled < free, (free, pulled, held)


def test_fedprox_follows_the_task_and_refuses_a_bad_mu():
    trainer = tiny_trainer()
    assert FedProx.from_task(FLModel(params={}, meta={}), trainer.model) is None
    term = FedProx.from_task(FLModel(params={}, meta={AlgorithmConstants.FEDPROX_MU: 0.5}), trainer.model)
    assert term is not None and term.mu == 0.5
    with torch.no_grad():
        next(trainer.model.parameters()).add_(2.0)  # the global reference is a copy: it stays where it was
    first = next(trainer.model.parameters())
    assert float(term(trainer.model)) == pytest.approx(0.5 / 2 * 4.0 * first.numel(), rel=1e-5)
    with pytest.raises(ValueError, match="fedprox_mu"):
        FedProx.from_task(FLModel(params={}, meta={AlgorithmConstants.FEDPROX_MU: -1.0}), trainer.model)


def _controls(model: torch.nn.Module, value: float) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(p, value) for k, p in model.named_parameters()}


def test_scaffold_corrects_each_step_and_updates_the_site_control_variate():
    """Each step moves by -lr (c - c_i) besides the optimiser's own step; after K steps the site's variate becomes
    c_i - c + (w_global - w) / (K lr) (the paper's option II), and its change is what goes back."""
    lr, c = 1e-2, 0.5
    plain, corrected = tiny_trainer(lr=lr), tiny_trainer(lr=lr)
    scaffold = Scaffold(corrected.model)
    task_meta = {AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL: _controls(corrected.model, c)}
    received = scaffold.start_round(task_meta, corrected.model)
    assert all(torch.equal(v, torch.full_like(v, c)) for v in received.values())
    global_state = _state(corrected.model)
    plain.train_epochs(synthetic_batches(1))
    corrected.train_epochs(synthetic_batches(1), after_step=scaffold.after_step)
    after, reference = _state(corrected.model), _state(plain.model)
    trainable = [k for k, _ in corrected.model.named_parameters()]
    for key in trainable:  # c_i starts at zero
        torch.testing.assert_close(after[key] - reference[key], torch.full_like(after[key], -lr * c))
    meta = scaffold.finish_round(corrected.model, lr)
    delta = meta[AlgorithmConstants.SCAFFOLD_CTRL_DIFF]
    assert set(delta) == set(trainable), "control variates cover the trainable parameters only"
    for key in trainable:
        expected = -c + (global_state[key] - after[key]) / (1 * lr)
        torch.testing.assert_close(torch.as_tensor(delta[key]), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="without the server's control variate"):
        scaffold.after_step(corrected.model, lr)


def test_a_site_resumes_scaffold_with_the_control_variate_it_kept():
    """A site's c_i survives a restart: a new Scaffold given the kept state corrects the next round's steps exactly as
    the one that kept it; a c_i of another model is refused."""
    lr, meta = 1e-2, None
    trainers = [tiny_trainer(lr=lr) for _ in range(2)]
    kept = Scaffold(trainers[0].model)
    for c in (0.5, 0.2):  # two rounds, so that c_i is no longer zero
        meta = {AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL: _controls(trainers[0].model, c)}
        kept.start_round(meta, trainers[0].model)
        trainers[0].train_epochs(synthetic_batches(1), after_step=kept.after_step)
        kept.finish_round(trainers[0].model, lr)
    state = kept.state_dict()
    assert any(float(v.abs().max()) > 0 for v in state.values())
    trainers[1].model.load_state_dict(trainers[0].model.state_dict())
    trainers[1].load_state_dict(copy.deepcopy(trainers[0].state_dict()))  # the optimiser's moments, as a site keeps
    resumed = Scaffold(trainers[1].model)
    resumed.load_state_dict(state)
    deltas = []
    for scaffold, trainer in zip((kept, resumed), trainers, strict=True):
        scaffold.start_round(meta, trainer.model)
        trainer.train_epochs(synthetic_batches(1), after_step=scaffold.after_step)
        deltas.append(scaffold.finish_round(trainer.model, lr)[AlgorithmConstants.SCAFFOLD_CTRL_DIFF])
    assert all(torch.equal(deltas[0][k], deltas[1][k]) for k in deltas[0])
    other = tiny_trainer(model={"channels": [2, 4], "strides": [2], "num_res_units": 1, "init_seed": 0}).model
    with pytest.raises(ValueError, match="does not fit this job's model"):
        Scaffold(other).load_state_dict(state)


def test_ditto_keeps_a_personal_model_pulled_towards_the_global_one(tmp_path: Path):
    """The personal model starts from the first global model, then goes on from itself, not from each new global
    model; a larger lambda keeps it nearer the global model; it is kept in the site's folder."""
    moved = {}
    for lam in (0.0, 100.0):
        personal = tiny_trainer()
        global_model = copy.deepcopy(personal.model)
        ditto = Ditto(personal, tmp_path / str(lam), lam, epochs=1)
        stats = ditto.round(synthetic_batches(4), global_model)
        assert stats["steps"] == 4 and "extra_loss" in stats
        moved[lam] = _distance(_state(personal.model), _state(global_model), _state(global_model))
        kept = torch.load(tmp_path / str(lam) / "personalized_model.pt")["model"]
        assert all(torch.equal(kept[k], v) for k, v in _state(personal.model).items())
    assert 0 < moved[100.0] < moved[0.0]
    first = _state(personal.model)
    other = tiny_trainer(model={"channels": [4, 8], "strides": [2], "num_res_units": 1, "init_seed": 1}).model
    ditto.round(synthetic_batches(1), other)
    second = _state(personal.model)
    assert _distance(second, first, first) < _distance(second, _state(other), first)
    assert ditto.epoch_global == 2


def test_a_restarted_site_goes_on_with_its_ditto_personal_model(tmp_path: Path):
    """Two Ditto rounds in one go, or one round, the state kept (through a file, as a site keeps it), a new Ditto in
    a new job folder (a resumed job) given it, then the second: the same personal model and optimiser bit for bit.
    Without the state the new Ditto would start again from the global model."""
    global_model = copy.deepcopy(tiny_trainer().model)
    through = Ditto(tiny_trainer(), tmp_path / "through", 1.0, epochs=1)
    for seed in (0, 1):
        through.round(synthetic_batches(2, seed=seed), global_model)
    stopped = Ditto(tiny_trainer(), tmp_path / "first job", 1.0, epochs=1)
    stopped.round(synthetic_batches(2, seed=0), global_model)
    torch.save(stopped.state_dict(), tmp_path / "kept.pt")
    resumed = Ditto(tiny_trainer(), tmp_path / "resumed job", 1.0, epochs=1)
    resumed.load_state_dict(torch.load(tmp_path / "kept.pt"))
    resumed.round(synthetic_batches(2, seed=1), global_model)
    assert all(torch.equal(v, _state(through.trainer.model)[k]) for k, v in _state(resumed.trainer.model).items())
    assert resumed.epoch_global == through.epoch_global == 2
    assert resumed.trainer.epochs_done == through.trainer.epochs_done == 2
    afresh = Ditto(tiny_trainer(), tmp_path / "afresh", 1.0, epochs=1)
    afresh.round(synthetic_batches(2, seed=1), global_model)
    assert not all(torch.equal(v, _state(through.trainer.model)[k]) for k, v in _state(afresh.trainer.model).items())
