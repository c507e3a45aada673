"""HyperSeg: a hypernetwork on the server generates each site's personal layers (Segev & Chechik, after pFedHN).

Each round every site receives the shared weights plus personal tensors (the last convolution, optionally every
normalisation layer) that the hypernetwork generated from that site's descriptor, trains locally and returns its
whole model, except the running statistics of batch-norm layers whose scale and shift were generated (Conv + BN):
those stay at the site, as in FedBN, since a hypernetwork generates learnable tensors and a statistic has no
gradient. The server then (a) averages the shared weights over the sites, weighted by training cases, with
FLARE's ``WeightedAggregationHelper``, and (b) updates the hypernetwork by the pFedHN rule: for site i with
descriptor v_i, generated weights theta_i = h(v_i; phi) and returned weights theta~_i, the hypernetwork's
gradient is (d theta_i / d phi)^T (theta_i - theta~_i), averaged over the sites, fed to its own optimiser.
A learned descriptor (``embedding``) is trained the same way. FLARE has no hypernetwork workflow, so this
controller is ours; the personal tensors never leave the server except towards their own site.

Before either step the returned models pass the FedAvg jobs' screen (``brats_fl.server.screening``): a model
with a NaN or an infinite value, a key the model does not have or leaves out, a foreign shape, or an update
(returned minus the site's payload) whose norm is over ``norm_ratio`` times the median of the round's other
good updates, is refused, logged and recorded in ``screening.jsonl``, and left out of both steps of that round;
a round with fewer than ``min_good`` good models stops the job, as in the FedAvg jobs.

A round waits for the sites at most ``round_timeout`` seconds (the job's ``--round-timeout``; 0, unset: as long as
it takes): a site that has not answered by then, a hung one, stops the job, named, as a FedAvg job without a quorum
does. The final personalisation waits ``eval_timeout`` seconds, then names a silent site and keeps the others' scores.

The hypernetwork and its optimiser are saved beside the global model (``hypernetwork.pt`` in the server's app
folder) after every round, so a job started again with ``resume_from`` (that run's global model, or the copy
``brats-fl resume-job`` bundles with the hypernetwork into the job) continues after
the last round with the same global model, hypernetwork and optimiser. The global model the persistor keeps holds
the shared weights and the personal tensors generated for the average descriptor: the model a new site would
start from. After the last round each site receives its own final personal tensors (task ``personalise``),
scores its model on its test split and keeps it, as in the FedPer and FedBN jobs.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from nvflare.app_common.abstract.fl_model import FLMetaKey, FLModel
from nvflare.app_common.aggregators.weighted_aggregation_helper import WeightedAggregationHelper
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.workflows.model_controller import ModelController
from torch import nn

from brats_fl.protocol import HYPERNETWORK_FILE, PERSONALISE_TASK, PERSONALISED_RESULTS
from brats_fl.server.postprocess import pooled_meta
from brats_fl.server.schedule import check_schedule, set_round_lr
from brats_fl.server.screening import check_settings, expected_shapes, record_round, screen_updates
from brats_fl.server.state import ServerState

DESCRIPTORS = ("onehot", "embedding")
OPTIMISERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
#: the personal-key selections HyperSeg's variants use: the last convolution, or it and every normalisation layer
VARIANTS = {"conv": "head:1", "conv_bn": "head:1+norm"}


class HyperNetwork(nn.Module):
    """An MLP from a site descriptor to that site's personal tensors.

    ``depth`` counts linear layers: ``depth - 1`` hidden layers of ``width`` units with ReLU (He-initialised so
    that a deep stack does not starve), then one linear output head per personal tensor. With ``depth`` 1 each
    head maps the descriptor directly. The heads' biases start at ``initial`` and their weights small, so at the
    start every site receives (nearly) the initial model and the hypernetwork learns the differences.
    """

    def __init__(
        self,
        initial: dict[str, torch.Tensor],
        sites: int,
        descriptor: str = "onehot",
        embedding_dim: int = 10,
        depth: int = 20,
        width: int = 100,
        seed: int = 0,
    ):
        super().__init__()
        if descriptor not in DESCRIPTORS:
            raise ValueError(f"descriptor must be one of {DESCRIPTORS}, not {descriptor!r}")
        if depth < 1 or width < 1 or sites < 1:
            raise ValueError(f"need depth, width and sites >= 1 (got {depth}, {width}, {sites})")
        generator = torch.Generator().manual_seed(seed)
        self.shapes = {k: tuple(v.shape) for k, v in initial.items()}
        if descriptor == "embedding":
            self.embedding = nn.Parameter(torch.randn(sites, embedding_dim, generator=generator))
        else:
            self.register_buffer("embedding", torch.eye(sites))
        layers: list[nn.Module] = []
        size = self.embedding.shape[1]
        for _ in range(depth - 1):
            linear = nn.Linear(size, width)
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu", generator=generator)
            nn.init.zeros_(linear.bias)
            layers += [linear, nn.ReLU()]
            size = width
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList()
        for value in initial.values():
            head = nn.Linear(size, value.numel())
            nn.init.normal_(head.weight, std=0.01 / math.sqrt(size), generator=generator)
            with torch.no_grad():
                head.bias.copy_(value.detach().float().flatten())
            self.heads.append(head)

    def descriptor(self, site: int | None) -> torch.Tensor:
        """Site ``site``'s descriptor; ``None`` gives the average site's."""
        return self.embedding.mean(0) if site is None else self.embedding[site]

    def forward(self, site: int | None) -> dict[str, torch.Tensor]:
        features = self.trunk(self.descriptor(site))
        return {
            key: head(features).view(shape) for (key, shape), head in zip(self.shapes.items(), self.heads, strict=True)
        }


class HyperSegController(ServerState, ModelController):
    """FedAvg for the shared weights, a server-side hypernetwork for each site's personal tensors."""

    STATE_FILE = HYPERNETWORK_FILE
    STATE_NAME = "hypernetwork"

    def __init__(
        self,
        personal_keys: list[str],
        site_kept: list[str] | None = None,
        num_rounds: int = 20,
        descriptor: str = "onehot",
        embedding_dim: int = 10,
        hn_depth: int = 20,
        hn_width: int = 100,
        hn_optimizer: str = "adam",
        hn_lr: float = 1e-3,
        warmup_rounds: int = 0,
        seed: int = 0,
        round_timeout: int = 0,
        eval_timeout: int = 0,
        resume_from: str | None = None,
        norm_ratio: float = 10.0,
        min_good: int = 1,
        lr: float | None = None,
        lr_schedule: str = "constant",
        task_check_period: float = 0.5,
        **kwargs,
    ):
        # task_check_period named here, not left in kwargs: FLARE's job export writes only the arguments it sees
        super().__init__(task_check_period=task_check_period, **kwargs)
        check_settings(norm_ratio, min_good)
        check_schedule(lr, lr_schedule)
        if hn_optimizer not in OPTIMISERS:
            raise ValueError(f"hn_optimizer must be one of {sorted(OPTIMISERS)}, not {hn_optimizer!r}")
        if not personal_keys:
            raise ValueError("HyperSeg needs at least one personal key for the hypernetwork to generate")
        self.personal_keys = list(personal_keys)
        #: what the sites keep and never send (Conv + BN's running statistics): no update lacks it wrongly
        self.site_kept = list(site_kept or [])
        self.num_rounds = num_rounds
        self.descriptor = descriptor
        self.embedding_dim = embedding_dim
        self.hn_depth = hn_depth
        self.hn_width = hn_width
        self.hn_optimizer = hn_optimizer
        self.hn_lr = hn_lr
        self.warmup_rounds = warmup_rounds
        self.seed = seed
        #: seconds a training round, and the final personalisation, wait for the sites (0: as long as it takes)
        self.round_timeout = round_timeout
        self.eval_timeout = eval_timeout
        self.resume_from = resume_from
        self.norm_ratio = norm_ratio
        self.min_good = min_good
        #: the sites' learning rate and its schedule over the rounds (``brats_fl.server.schedule``)
        self.lr = lr
        self.lr_schedule = lr_schedule

    def run(self) -> None:
        model = self.load_model()
        missing = sorted(set(self.personal_keys) - set(model.params))
        if missing:
            self.panic(f"the global model has no key(s) {missing}: personal_keys do not match the model")
            return
        self.sites = sorted(self.sample_clients())
        initial = {k: torch.as_tensor(model.params[k]).float() for k in self.personal_keys}
        self.net = HyperNetwork(
            initial, len(self.sites), self.descriptor, self.embedding_dim, self.hn_depth, self.hn_width, self.seed
        )
        self.optimiser = OPTIMISERS[self.hn_optimizer](self.net.parameters(), lr=self.hn_lr)
        done = (model.meta or {}).get(AppConstants.CURRENT_ROUND)
        start = self._restore(done) if self.resume_from else 0
        for rnd in range(start, self.num_rounds):
            use_net = rnd >= self.warmup_rounds
            personal = {s: self._generate(i) if use_net else initial for i, s in enumerate(self.sites)}
            returned = self._train_round(model, personal, rnd)
            if self.abort_signal.triggered:
                return
            absent = sorted(set(self.sites) - set(returned))
            if absent:
                # as a FedAvg job without a quorum: a site that does not answer (a hung one) stops the job, named
                limit = f" within the round timeout of {self.round_timeout} s" if self.round_timeout else ""
                self.panic(f"round {rnd}: no model from {absent}{limit}; HyperSeg needs every site's, the job stops")
                return
            returned, why = self._screen(model, personal, returned, rnd)
            if why:
                self.panic(why)
                return
            # a key no site sends (batch-norm statistics kept at the sites) keeps its global value
            model.params = model.params | self._aggregate(returned, shared_only=use_net)
            if use_net:
                self._update_net(personal, returned)
                model.params |= self._detached(self.net(None))
            else:
                initial = {k: model.params[k].float() for k in self.personal_keys}
                if rnd + 1 == self.warmup_rounds:  # warm-up over: the hypernetwork starts from its result
                    self._reset_biases(initial)
            model.current_round = rnd
            # the hypernetwork first: a server that dies between the two leaves it a round ahead, which a
            # resumption refuses, rather than a global model a round ahead, which it could not notice
            self.save_state(rnd, sites=self.sites, net=self.net.state_dict(), optimiser=self.optimiser.state_dict())
            model.meta = (model.meta or {}) | {AppConstants.CURRENT_ROUND: rnd}
            self.save_model(model)
        self._personalise(model)

    def _generate(self, index: int) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return self._detached(self.net(index))

    @staticmethod
    def _detached(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in tensors.items()}

    def _reset_biases(self, values: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for head, value in zip(self.net.heads, values.values(), strict=True):
                head.bias.copy_(value.flatten())

    def _payload(self, model: FLModel, personal: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in model.params.items() if k not in personal} | personal

    def _send_each(self, task_name: str, payloads: dict[str, FLModel], timeout: int) -> dict[str, FLModel]:
        """Send every site its own payload at once, and wait for all of them, each at most ``timeout`` seconds (0: no
        limit); returns the answers by site."""
        answers: dict[str, FLModel] = {}

        def keep(result: FLModel) -> None:
            answers[result.meta["client_name"]] = result

        for site, payload in payloads.items():
            self.send_model(task_name=task_name, data=payload, targets=[site], timeout=timeout, callback=keep)
        while self.get_num_standing_tasks() and not self.abort_signal.triggered:
            time.sleep(self._task_check_period)
        return answers

    def _train_round(self, model: FLModel, personal: dict, rnd: int) -> dict[str, FLModel]:
        payloads = {
            site: FLModel(params=self._payload(model, personal[site]), current_round=rnd, total_rounds=self.num_rounds)
            for site in self.sites
        }
        for payload in payloads.values():
            set_round_lr(payload, self.lr, self.lr_schedule, rnd, self.num_rounds)
        return self._send_each("train", payloads, self.round_timeout)

    def _screen(
        self, model: FLModel, personal: dict, returned: dict[str, FLModel], rnd: int
    ) -> tuple[dict[str, FLModel], str | None]:
        """The returned models the screen keeps, and why the round must stop (fewer than ``min_good`` kept)."""
        sent = {site: self._payload(model, personal[site]) for site in returned}
        updates = {site: result.params for site, result in returned.items()}
        expected = expected_shapes({k: v for k, v in model.params.items() if k not in self.site_kept})
        norms, refused = screen_updates(updates, sent, expected, self.norm_ratio, complete=True)
        for site, why in sorted(refused.items()):
            self.warning(f"refused the update of {site} in round {rnd}: {why}")
        record_round(self.get_run_dir(), rnd, norms, refused)
        if len(norms) < self.min_good:
            reasons = "; ".join(f"{s}: {why}" for s, why in sorted(refused.items()))
            good = f"{len(norms)} good update(s), fewer than min_good={self.min_good}"
            return {}, f"round {rnd}: {good}; the round is not taken. Refused: {reasons}"
        return {site: result for site, result in returned.items() if site in norms}, None

    def _aggregate(self, returned: dict[str, FLModel], shared_only: bool) -> dict[str, torch.Tensor]:
        """Case-weighted mean of the returned weights (all of them during warm-up, else the shared ones)."""
        helper = WeightedAggregationHelper()
        for site, result in returned.items():
            params = {k: torch.as_tensor(v).float() for k, v in result.params.items()}
            if shared_only:
                params = {k: v for k, v in params.items() if k not in self.personal_keys}
            helper.add(params, result.meta.get(FLMetaKey.NUM_STEPS_CURRENT_ROUND, 1), site, 0)
        return helper.get_result()

    def _update_net(self, sent: dict[str, dict], returned: dict[str, FLModel]) -> None:
        """pFedHN: move each site's generated tensors towards what the site trained them into."""
        self.optimiser.zero_grad()
        for site, result in returned.items():
            generated = self.net(self.sites.index(site))
            keys = list(generated)
            change = [(sent[site][k] - torch.as_tensor(result.params[k]).float()) / len(returned) for k in keys]
            torch.autograd.backward([generated[k] for k in keys], grad_tensors=change)
        self.optimiser.step()

    def _restore(self, done: int | None) -> int:
        """Continue after round ``done``, the global model's, with the hypernetwork and optimiser as they were."""
        state = self.load_state(done)
        if state["sites"] != self.sites:
            raise ValueError(f"{self.state_path()}: saved for sites {state['sites']}, but this job has {self.sites}")
        self.net.load_state_dict(state["net"])
        self.optimiser.load_state_dict(state["optimiser"])
        return done + 1

    def _personalise(self, model: FLModel) -> None:
        """Each site's final model, its own personal tensors included, scored on its test split and kept there."""
        pooled = pooled_meta(self.get_run_dir())  # the sites' post-processing choices (brats_fl.server.postprocess)
        payloads = {
            site: FLModel(params=self._payload(model, self._generate(i)), meta=dict(pooled))
            for i, site in enumerate(self.sites)
        }
        answers = self._send_each(PERSONALISE_TASK, payloads, self.eval_timeout)
        scores = {site: answer.metrics for site, answer in answers.items()}
        missing = sorted(set(self.sites) - set(scores))
        if missing:
            self.warning(f"no personalised test scores from {missing}")
        path = Path(self.get_run_dir()) / PERSONALISED_RESULTS
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(sorted(scores.items())), indent=1))
