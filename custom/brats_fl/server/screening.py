"""Broken and hostile updates: the server refuses them before averaging, and a drill makes a site send them.

``ScreenedAggregator`` is the FedAvg jobs' aggregator (FLARE's ``FedAvg`` takes it as ``aggregator``). Before a
round is averaged it refuses an update that

- holds something other than arrays, or a NaN or an infinite value,
- names a key the job's model does not have, or gives a key another shape than the model's,
- moves the model much further than the others do: the L2 norm of (returned - global), or of the returned
  difference with ``transfer=diff``, above ``norm_ratio`` times the median norm of the round's other good
  updates (with a single good update there is nothing to compare it with).

Each refusal is logged with the site and the reason and recorded in ``screening.jsonl`` in the server's run
folder (one line per round: the sites averaged, with the norm of their update, and the sites refused, with
the reason). The rest is averaged exactly as FLARE's FedAvg does, per key over the sites that sent it (FedPer
and FedBN sites leave their personal keys out) and weighted by ``NUM_STEPS_CURRENT_ROUND``; a key that no
site sent keeps its value in the global model, which FedAvg would otherwise drop. Batch-norm running statistics
that the sites share are averaged so too; an integer count among them (num_batches_tracked) is left out of the
update norm and rounded back to an integer. If fewer than ``min_good`` updates survive, the round is not
averaged at all: the job stops with an error naming every refused site and why. A round in which no site sent
any weight (the local-only baseline) has nothing to average, and is passed on as FLARE's own aggregation passes it.

The same screen, one definition (``problem``, ``update_norm``, ``outliers``, ``screen_updates``), guards the
controllers that do not aggregate through FLARE's aggregator: the sequential jobs' hand-over
(``brats_fl.server.sequential``), where a visit's update has no peers and is measured against the updates of the
visits before it, and HyperSeg's shared and hypernetwork step (``brats_fl.server.hyperseg``). Both take whole
models back, so there an update that leaves a key out is refused too.

``brats_fl.drills.faults.FaultInjection`` is a fire drill, and what the tests use: a task-result filter
that makes named sites send broken updates (NaN, Inf, a foreign key, a wrong shape or a huge scale) in chosen
rounds, so that the screening can be watched at work in a real run.
"""

from __future__ import annotations

import json
import statistics
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator
from nvflare.app_common.aggregators.weighted_aggregation_helper import (
    WeightedAggregationHelper,
    filter_aggregatable_metrics,
)
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType

# FedAvg's own reading of a result's site name and weight (NUM_STEPS_CURRENT_ROUND, 1 when absent or invalid),
# so that a screened round weighs the sites exactly as an unscreened one would
from nvflare.app_common.workflows.base_fedavg import _get_client_name, _get_num_steps_weight

from brats_fl.protocol import SCREENING_FILE


def expected_shapes(state: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """A model's keys and shapes in the JSON form the job's configuration carries."""
    return {key: list(value.shape) for key, value in state.items()}


def problem(params: Mapping, expected: dict[str, list[int]], complete: bool = False) -> str | None:
    """Why an update cannot be taken into a model of ``expected`` keys and shapes, or None if it can;
    ``complete``: the update is to replace the whole model, so it must hold every key."""
    foreign = sorted(set(params) - set(expected))
    if foreign:
        return f"unexpected key(s) {foreign[:3]} ({len(foreign)} in all)"
    missing = sorted(set(expected) - set(params)) if complete else []
    if missing:
        return f"left out key(s) {missing[:3]} ({len(missing)} in all)"
    for key, value in params.items():
        try:
            tensor = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            return f"{key} is not an array but a {type(value).__name__}"
        if list(tensor.shape) != expected[key]:
            return f"{key} has shape {list(tensor.shape)}, the model's is {expected[key]}"
        if tensor.is_floating_point() and bool(torch.isnan(tensor).any()):
            return f"{key} holds NaN"
        if tensor.is_floating_point() and bool(torch.isinf(tensor).any()):
            return f"{key} holds infinite values"
    return None


def update_norm(params: Mapping, sent: Mapping | None) -> float:
    """The L2 norm of the step an update takes: ``params`` minus ``sent``, the model the site was given, or of
    ``params`` itself where it is already that difference (``sent`` None)."""
    squares = 0.0
    for key, value in params.items():
        step = torch.as_tensor(value)
        if not step.is_floating_point():
            continue  # a count (batch norm's num_batches_tracked) grows with the steps taken, not with the update
        step = step.double()
        if sent is not None:
            step = step - torch.as_tensor(sent[key]).double()
        squares += float(step.square().sum())
    return squares**0.5


def outliers(norms: Mapping[str, float], norm_ratio: float, earlier: Sequence[float] = ()) -> dict[str, str]:
    """The updates, by site, whose norm is over ``norm_ratio`` times the median of the others' (the rest of
    ``norms`` and the ``earlier`` good updates), with the reason; with nothing to compare with, none."""
    refused = {}
    for site, norm in norms.items():
        others = [n for s, n in norms.items() if s != site] + list(earlier)
        if others and norm > norm_ratio * statistics.median(others):
            median = statistics.median(others)
            refused[site] = f"update norm {norm:.4g} is over {norm_ratio:g} times the others' median ({median:.4g})"
    return refused


def screen_updates(
    updates: Mapping[str, Mapping],
    sent: Mapping[str, Mapping],
    expected: dict[str, list[int]],
    norm_ratio: float,
    complete: bool = False,
    earlier: Sequence[float] = (),
) -> tuple[dict[str, float], dict[str, str]]:
    """Screen the full-weight updates of several sites (or of one, against ``earlier`` norms) at once, each
    measured against the model ``sent`` to it: (norm of each update kept, reason for each one refused)."""
    refused = {s: why for s, params in updates.items() if (why := problem(params, expected, complete))}
    norms = {s: update_norm(params, sent[s]) for s, params in updates.items() if s not in refused}
    refused |= outliers(norms, norm_ratio, earlier)
    return {s: n for s, n in norms.items() if s not in refused}, refused


def check_settings(norm_ratio: float, min_good: int) -> None:
    """Refuse a screen that would refuse every update, or average a round of none."""
    if norm_ratio <= 1 or min_good < 1:
        raise ValueError(f"need norm_ratio > 1 and min_good >= 1, got {norm_ratio} and {min_good}")


def record_round(run_dir: str | Path, rnd: int | None, norms: dict[str, float], refused: dict[str, str]) -> None:
    """Append a round's screening to ``screening.jsonl`` in the server's run folder."""
    row = {"round": rnd, "averaged": norms, "refused": refused}
    with (Path(run_dir) / SCREENING_FILE).open("a") as fh:
        fh.write(json.dumps(row) + "\n")


class ScreenedAggregator(ModelAggregator):
    """FLARE's weighted FedAvg aggregation, after refusing malformed updates and outliers of norm.

    Args:
        expected: the model's keys and shapes (``expected_shapes``): an update may leave keys out, not add any.
        norm_ratio: refuse an update whose norm exceeds this many times the median of the other good updates'.
        min_good: fewer good updates than this in a round stop the job instead of averaging.
    """

    def __init__(self, expected: dict[str, list[int]], norm_ratio: float = 10.0, min_good: int = 1):
        super().__init__()
        check_settings(norm_ratio, min_good)
        self.expected = expected
        self.norm_ratio = norm_ratio
        self.min_good = min_good
        self._lock = threading.Lock()
        self._global: dict = {}
        self._round: int | None = None
        self.reset_stats()

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        super().handle_event(event_type, fl_ctx)
        if event_type == AppEventType.ROUND_STARTED:
            # the model the controller sends this round, against which a full-weights update is measured
            learnable = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
            self._global = dict(learnable[ModelLearnableKey.WEIGHTS]) if learnable else {}
            self._round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)

    def reset_stats(self) -> None:
        with self._lock:
            # results arrive one by one and may arrive concurrently; the norm test needs the whole round
            self._good: list[FLModel] = []
            self._refused: dict[str, str] = {}

    def accept_model(self, model: FLModel) -> None:
        site = _get_client_name(model)
        why = problem(model.params, self.expected)
        with self._lock:
            if why:
                self._refused[site] = why
            else:
                # FLARE's privacy filters send numpy arrays even when the site sent torch tensors
                model.params = {k: torch.as_tensor(v) for k, v in model.params.items()}
                self._good.append(model)
        if why:
            self.warning(f"refused the update of {site} in round {self._round}: {why}")

    def _screen_norms(self) -> dict[str, float]:
        """Move outliers of update norm from the good updates to the refused ones; the norms of those kept."""
        norms = {}
        for model in self._good:
            diff = model.params_type == ParamsType.DIFF
            norms[_get_client_name(model)] = update_norm(model.params, None if diff else self._global)
        for site, why in outliers(norms, self.norm_ratio).items():
            self._refused[site] = why
            self.warning(f"refused the update of {site} in round {self._round}: {why}")
        self._good = [m for m in self._good if _get_client_name(m) not in self._refused]
        return {s: n for s, n in norms.items() if s not in self._refused}

    def aggregate_model(self) -> FLModel:
        with self._lock:
            if not self._good and not self._refused:
                # as FedAvg's own aggregation, which passes on an empty average
                self.info(f"round {self._round}: no site sent weights, nothing to average")
                return FLModel(params={})
            norms = self._screen_norms()
            self._record(norms)
            if len(self._good) < self.min_good:
                refused = "; ".join(f"{s}: {why}" for s, why in sorted(self._refused.items()))
                raise RuntimeError(
                    f"round {self._round}: {len(self._good)} good update(s), fewer than min_good={self.min_good}; "
                    f"the round is not averaged. Refused: {refused}"
                )
            return self._average()

    def _average(self) -> FLModel:
        params, metrics = WeightedAggregationHelper(), WeightedAggregationHelper()
        all_metrics = True
        # in site order, not arrival order: float sums depend on their order, and one ulp of difference in the
        # global model grows through the next round's training, so a run could not be repeated
        for model in sorted(self._good, key=_get_client_name):
            site, weight = _get_client_name(model), _get_num_steps_weight(model)
            params.add(data=model.params, weight=weight, contributor_name=site, contribution_round=self._round)
            # as FedAvg: metrics are averaged only when every site reported some
            all_metrics = all_metrics and model.metrics is not None
            scalars = filter_aggregatable_metrics(model.metrics)
            if scalars:
                metrics.add(data=scalars, weight=weight, contributor_name=site, contribution_round=self._round)
        self.info(f"round {self._round}: averaged the updates of {sorted(_get_client_name(m) for m in self._good)}")
        params_type, average = self._good[0].params_type, params.get_result()
        # the weighted mean of running statistics is their FedAvg; that of an integer buffer (num_batches_tracked),
        # which FLARE's helper returns as floats, is rounded back to the sites' integer type
        dtypes = {k: v.dtype for m in self._good for k, v in m.params.items()}
        average = {k: v if dtypes[k].is_floating_point else v.round().to(dtypes[k]) for k, v in average.items()}
        if params_type == ParamsType.FULL:
            # FedAvg replaces the global model by full weights, which would drop a key no site sent (one that
            # FLARE's ExcludeVars kept at the sites): it keeps its global value, so every site gets a whole model
            average = self._global | average
        return FLModel(
            params=average,
            params_type=params_type,
            metrics=(metrics.get_result() or None) if all_metrics else None,
        )

    def _record(self, norms: dict[str, float]) -> None:
        run_dir = self.fl_ctx.get_engine().get_workspace().get_run_dir(self.fl_ctx.get_job_id())
        record_round(run_dir, self._round, norms, self._refused)
