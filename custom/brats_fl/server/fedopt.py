"""FedOpt: the server takes an adaptive optimiser's step with the round's averaged update (FedAdagrad, FedYogi,
FedAdam; Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2).

With x_t the global model and Δ_t the round's average of (site model - x_t), for every parameter:

    m_t = β1 m_{t-1} + (1 - β1) Δ_t
    v_t = v_{t-1} + Δ_t²                                   FedAdagrad
    v_t = v_{t-1} - (1 - β2) Δ_t² sign(v_{t-1} - Δ_t²)     FedYogi
    v_t = β2 v_{t-1} + (1 - β2) Δ_t²                       FedAdam
    x_{t+1} = x_t + η m_t / (√v_t + τ)

with m_{-1} = 0 and v_{-1} = τ² (the paper asks for v_{-1} >= τ²). Where we depart from the paper, and why:

- Δ_t is averaged as our FedAvg averages: screened (``brats_fl.server.screening``) and weighted by each site's
  number of training cases, not the unweighted mean of Algorithm 2, so that brats_fedavg and these jobs differ in
  the server step alone.
- Only the model's parameters (``model.named_parameters()``) take the step. Every other key, batch normalisation's
  running means and variances and its integer batch counter, is averaged as in FedAvg and keeps its dtype: those
  are statistics, not weights that a pseudo-gradient moves. An adaptive step moves each entry by about η whatever
  its scale, and can drive a running variance negative (FLARE once did this, NVFlare #1718). FLARE 2.9's FedOpt
  splits the keys the same way.

FLARE 2.9's own FedOpt (``nvflare.app_opt.pt.fedopt_ctl.FedOpt``, and the FedOptRecipe's
``PTFedOptModelShareableGenerator``) is not used because it steps a torch optimiser, and torch has no Yogi while
its Adam (bias correction) and Adagrad (no first moment) are not the paper's; and because its controller reads
every update as a difference (our sites may send full weights), hands the new parameters back as numpy arrays in a
PyTorch-format job, and never makes the new model the round's global model in FLARE's context
(``AppConstants.GLOBAL_MODEL``), which the screening measures the next round's updates against.
``FedOptController`` is ``DeadlineFedAvg`` in everything but the model update, so it keeps the stragglers'
deadline, the screening aggregator and FLARE's persistor and model selection.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from brats_fl.protocol import SERVER_OPTIMIZER_FILE
from brats_fl.server.fedavg import DeadlineFedAvg
from brats_fl.server.state import ServerState

#: the server optimisers of Algorithm 2, by the name of the job's rule for v_t
RULES = ("adagrad", "yogi", "adam")


class ServerOptimizer:
    """Algorithm 2's server update for one of ``RULES``, with its moments m and v kept per key between rounds."""

    def __init__(self, rule: str, lr: float, beta1: float, beta2: float, tau: float):
        if rule not in RULES:
            raise ValueError(f"server optimiser one of {RULES}, got {rule!r}")
        if not (lr > 0 and 0 <= beta1 < 1 and 0 <= beta2 < 1 and tau > 0):
            raise ValueError(f"need lr > 0, 0 <= beta1, beta2 < 1 and tau > 0, got {lr}, {beta1}, {beta2}, {tau}")
        self.rule, self.lr, self.beta1, self.beta2, self.tau = rule, lr, beta1, beta2, tau
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    def state_dict(self) -> dict:
        """The moments m and v of every key (float64), and the rule they belong to."""
        return {"rule": self.rule, "m": dict(self.m), "v": dict(self.v)}

    def load_state_dict(self, state: dict) -> None:
        if state["rule"] != self.rule:
            raise ValueError(f"the saved moments are Fed{state['rule']}'s, this job's optimiser is Fed{self.rule}")
        self.m, self.v = dict(state["m"]), dict(state["v"])

    def step(self, x: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """x_{t+1} for every key of ``delta``, from the current ``x`` and the round's averaged update ``delta``."""
        out = {}
        for key, d in delta.items():
            d = d.to(torch.float64)
            m = self.m.get(key, torch.zeros_like(d))
            v = self.v.get(key, torch.full_like(d, self.tau**2))
            m = self.beta1 * m + (1 - self.beta1) * d
            if self.rule == "adagrad":
                v = v + d.square()
            elif self.rule == "yogi":
                v = v - (1 - self.beta2) * d.square() * torch.sign(v - d.square())
            else:
                v = self.beta2 * v + (1 - self.beta2) * d.square()
            self.m[key], self.v[key] = m, v
            base = torch.as_tensor(x[key])
            out[key] = (base.to(torch.float64) + self.lr * m / (v.sqrt() + self.tau)).to(base.dtype)
        return out


def pseudo_gradient(
    global_params: Mapping[str, Any], aggregate: Mapping[str, Any], is_diff: bool
) -> dict[str, torch.Tensor]:
    """Δ_t: the averaged update as a difference to the global model, whether the sites sent differences or full
    weights (the weighted mean of (w_i - x) is the weighted mean of w_i, minus x)."""
    if is_diff:
        return {k: torch.as_tensor(v) for k, v in aggregate.items()}
    return {k: torch.as_tensor(v).double() - torch.as_tensor(global_params[k]).double() for k, v in aggregate.items()}


def server_update(
    global_params: Mapping[str, Any],
    delta: Mapping[str, torch.Tensor],
    parameter_keys: Collection[str],
    optimizer: ServerOptimizer,
) -> dict[str, torch.Tensor]:
    """The next global model: the optimiser's step on the ``parameter_keys``, the average (x + Δ) on every other
    key of ``delta`` (running statistics, cast back to their dtype: an integer counter is rounded), and the
    current value on a key no site sent."""
    current = {k: torch.as_tensor(v) for k, v in global_params.items()}
    stepped = {k: d for k, d in delta.items() if k in parameter_keys}
    new = current | optimizer.step(current, stepped)
    for key in delta.keys() - stepped.keys():
        base = current[key]
        average = base.to(torch.float64) + delta[key].to(torch.float64)
        new[key] = (average if base.is_floating_point() else average.round()).to(base.dtype)
    return new


class FedOptController(ServerState, DeadlineFedAvg):
    """FedAvg's rounds (``DeadlineFedAvg``) with Algorithm 2's server step in place of taking the average.

    Args:
        server_optimizer: one of ``RULES``: FedAdagrad, FedYogi or FedAdam.
        server_lr, beta1, beta2, tau: η, β1, β2 (unused by adagrad) and τ of Algorithm 2.
        parameter_keys: the model's parameters (``model.named_parameters()``), which take the step; every other
            key is averaged.
        resume_from: with ``resume``, the interrupted run's last global model; the optimiser's moments of the same
            round (``SERVER_OPTIMIZER_FILE``, saved after every round) lie beside it. Relative: bundled into the
            job's custom folder (``brats_fl.jobs.resume``).
    """

    def __init__(
        self,
        *args,
        server_optimizer: str,
        parameter_keys: list[str],
        server_lr: float = 1e-2,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        resume_from: str | None = None,
        **kwargs,
    ):
        # attributes named as the arguments: FLARE's job export reads them back
        super().__init__(*args, **kwargs)
        self.server_optimizer = server_optimizer
        self.parameter_keys = list(parameter_keys)
        self.server_lr, self.beta1, self.beta2, self.tau = server_lr, beta1, beta2, tau
        self.resume_from = resume_from
        self._optimizer = ServerOptimizer(server_optimizer, server_lr, beta1, beta2, tau)

    STATE_FILE = SERVER_OPTIMIZER_FILE
    STATE_NAME = "server optimiser"

    def load_model(self) -> FLModel:
        """The initial model; when resuming, the optimiser's moments of the round it closed come back too."""
        model = super().load_model()
        if self.resume and model is not None:
            self._optimizer.load_state_dict(self.load_state(self.start_round - 1)["optimizer"])
        return model

    def update_model(self, model: FLModel, aggr_result: FLModel) -> FLModel:
        delta = pseudo_gradient(model.params, aggr_result.params, aggr_result.params_type == ParamsType.DIFF)
        params = server_update(model.params, delta, set(self.parameter_keys), self._optimizer)
        stepped = sum(k in self.parameter_keys for k in delta)
        self.info(
            f"round {self.current_round}: Fed{self.server_optimizer} step on {stepped} parameters, "
            f"{len(delta) - stepped} other keys averaged"
        )
        # the moments first: a server that dies between the two saves leaves them a round ahead of the global model,
        # which a resumption refuses
        self.save_state(self.current_round, optimizer=self._optimizer.state_dict())
        new = FLModel(params=params, params_type=ParamsType.FULL, meta=aggr_result.meta, metrics=aggr_result.metrics)
        # FedAvg's own update: the new model becomes the global one in FLARE's context, for persistor and screening
        return super().update_model(model, new)
