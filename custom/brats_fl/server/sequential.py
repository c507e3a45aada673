"""Sequential federated learning: one model travels from site to site, nothing is averaged.

Cyclic weight transfer (CWT) lets the model meet every site twice, single weight transfer (SWT) once; both are
``SequentialTransfer`` with a number of passes. Each visit sends the current model to one site, which trains it
for its local epochs and returns it; the returned weights are the model the next site receives, bit for bit.

FLARE ships two cyclic workflows and neither fits as is: ``CyclicController`` ends the whole job when one site
answers with an error, and the ``Cyclic`` model controller waits for ever on a site that never answers. Neither
scores the model between passes nor records who trained it when. This is FLARE's ``Cyclic`` with those added:
a visit the site does not pick up within ``assignment_timeout`` or does not finish within ``visit_timeout``, or
that fails at the site, is skipped with a warning naming the site, and the model goes on unchanged to the next.
So is a visit whose returned model the FedAvg jobs' screen (``brats_fl.server.screening``) refuses: a NaN or an
infinite value, a key the model does not have or leaves out, a foreign shape, or an update (returned minus
received) whose norm is over ``norm_ratio`` times the median of the earlier good visits' (a visit has no peers
to be compared with, as a FedAvg update has; the first visit has nothing to be compared with).
After every pass each site that trained in it scores the model on its validation split. The visits (order,
fingerprints of the weights sent and returned, bytes, time, skips) and the scores are written to
``sequential/visits.json`` in the server's run folder.

The learning rate decays per visit (``brats_fl.server.schedule``): a sequential job trains one model, one visit
after the other, so its "round" in the poly schedule is a visit, the step at which the server hands the model on.
Visit v of pass p with S sites is step p * S + v of passes * S; a skipped visit keeps its step, so the schedule
never depends on who answered. Decaying per pass instead would keep single weight transfer (one pass) at lr0.

A job can continue after its server died (``brats_fl.jobs.resume``). The travelling model is the job's global model,
so FLARE's persistor saves it after every visit, not once per pass: its meta holds the last pass closed
(``current_round``, what ``resume-job`` reads as for every job) and, under ``SEQUENTIAL_META``, where the next visit
stands (pass, visits done in it), the screen's update norms and the visit record. ``resume`` continues from there;
the visit order of a shuffled job is drawn again from its seed, pass by pass, so it is the order the interrupted run
had. The visit that was running when the server died is run again, at a site that goes on from the state it kept
before that visit (``brats_fl.site.client``).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from nvflare.apis.controller_spec import ClientTask, Task, TaskCompletionStatus
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from nvflare.app_common.workflows.cyclic import Cyclic

from brats_fl.protocol import PASS_VALIDATION_TASK, SEQUENTIAL_META, VISITS_FILE
from brats_fl.seg.model import fingerprint, state_bytes
from brats_fl.server.schedule import check_schedule, set_round_lr
from brats_fl.server.screening import check_settings, expected_shapes, screen_updates

ORDERS = ("fixed", "shuffle")


class SequentialTransfer(Cyclic):
    """Pass the model around the sites ``num_rounds`` times (one round = one pass), in a fixed or shuffled order.

    ``assignment_timeout`` bounds how long a site may take to pick up its visit (a site that is down or still
    loading its data), and ``visit_timeout`` how long it may then train (a site that hangs); both in seconds,
    with defaults meant for 3D training on CPU, where FLARE's 10 s task-assignment timeout would skip every site
    still caching its cases. ``resume``: the persistor's initial checkpoint is an interrupted run's last saved
    travelling model; go on from the visit after it.
    """

    def __init__(
        self,
        *args,
        order: str = "fixed",
        seed: int = 0,
        assignment_timeout: int = 1800,
        visit_timeout: int = 6 * 3600,
        norm_ratio: float = 10.0,
        ignore_result_error: bool = True,
        lr: float | None = None,
        lr_schedule: str = "constant",
        resume: bool = False,
        **kwargs,
    ):
        # by default a site's failed visit or validation is logged and skipped, never a reason to stop the job
        super().__init__(*args, ignore_result_error=ignore_result_error, **kwargs)
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, not {order!r}")
        if assignment_timeout <= 0 or visit_timeout <= 0:
            raise ValueError(f"timeouts must be positive (got {assignment_timeout} and {visit_timeout})")
        self.order = order
        self.seed = seed
        self.assignment_timeout = assignment_timeout
        self.visit_timeout = visit_timeout
        check_settings(norm_ratio, min_good=1)
        self.norm_ratio = norm_ratio
        check_schedule(lr, lr_schedule)
        self.lr = lr
        self.lr_schedule = lr_schedule
        self.resume = resume
        self._returned: Shareable | None = None
        #: the screen's measures: the model's keys and shapes, the update norms of the visits it kept so far
        self._expected: dict[str, list[int]] = {}
        self._norms: list[float] = []

    def run(self) -> None:
        loaded = self.load_model()
        # the sites get the weights and the visit's rate; a resumed job's checkpoint meta stays on the server
        model = FLModel(params=loaded.params, params_type=loaded.params_type)
        self._expected = expected_shapes(model.params)
        sites = sorted(self.sample_clients())
        record: dict = {"order": self.order, "sites": sites, "passes": [], "bytes": {}}
        first, visited = self.start_round, 0
        if self.resume:
            first, visited, record = self._resume_point(loaded, sites)
        rng = random.Random(self.seed)
        total = self.start_round + self.num_rounds
        for rnd in range(self.start_round, total):
            order = list(sites)
            if self.order == "shuffle":
                rng.shuffle(order)
            if rnd < first:  # a resumed job draws the orders of the passes it has done, and goes on
                continue
            if record["passes"] and record["passes"][-1]["pass"] == rnd:
                entry = record["passes"][-1]
            else:
                self.info(f"pass {rnd}: visiting {order}")
                entry = {"pass": rnd, "order": order, "visits": []}
                record["passes"].append(entry)
            for position in range(visited, len(order)):
                site = order[position]
                set_round_lr(model, self.lr, self.lr_schedule, rnd * len(sites) + position, total * len(sites))
                model, visit = self._visit(model, site, rnd, record["bytes"])
                entry["visits"].append(visit)
                self._write(record)
                self._checkpoint(model, rnd - 1, rnd, position + 1, record)
            visited = 0
            trained = [v["site"] for v in entry["visits"] if v["status"] == "trained"]
            entry["validation"] = self._validate(model, trained, record["bytes"]) if trained else {}
            self._write(record)
            self._checkpoint(model, rnd, rnd + 1, 0, record)
            self._maybe_cleanup_memory()
        self.info("sequential transfer finished")

    def _checkpoint(self, model: FLModel, closed: int, next_pass: int, visited: int, record: dict) -> None:
        """Save the travelling model with FLARE's persistor, as the job's global model, with where the job stands:
        ``closed`` the last pass done and scored, ``visited`` the visits done of pass ``next_pass``."""
        where = {"pass": next_pass, "visited": visited, "norms": list(self._norms), "record": json.dumps(record)}
        meta = {AppConstants.CURRENT_ROUND: closed, SEQUENTIAL_META: where}
        self.save_model(FLModel(params=model.params, params_type=model.params_type, meta=meta))

    def _resume_point(self, model: FLModel, sites: list[str]) -> tuple[int, int, dict]:
        """The pass and the visits done in it that a resumed job goes on from, and the record so far, from the
        initial checkpoint's meta (the interrupted run's last saved travelling model)."""
        where = (model.meta or {}).get(SEQUENTIAL_META)
        if not isinstance(where, dict):
            raise ValueError("asked to resume, but the initial checkpoint is not a sequential job's (no visit record)")
        record = json.loads(where["record"])
        if record["sites"] != sites or record["order"] != self.order:
            raise ValueError(
                f"asked to resume a job of sites {record['sites']} in {record['order']} order as one of sites "
                f"{sites} in {self.order} order"
            )
        if where["pass"] >= self.start_round + self.num_rounds:
            raise ValueError(f"nothing to resume: the checkpoint closed pass {where['pass'] - 1}, the job's last")
        self._norms = [float(n) for n in where["norms"]]
        record.setdefault("resumed", []).append({"pass": where["pass"], "visited": where["visited"]})
        self.info(f"resuming at pass {where['pass']} after {where['visited']} of its visits")
        return where["pass"], where["visited"], record

    def _visit(self, model: FLModel, site: str, rnd: int, traffic: dict) -> tuple[FLModel, dict]:
        """Send ``model`` to ``site`` and wait; returns the model the next site gets and what happened."""
        model.current_round = rnd
        model.total_rounds = self.num_rounds
        size = state_bytes(model.params)
        visit = {"site": site, "received": fingerprint(model.params), "started_at": time.time()}
        self._returned = None
        task = Task(name="train", data=FLModelUtils.to_shareable(model), result_received_cb=self._keep_result)
        self.send(task=task, fl_ctx=self.fl_ctx, targets=[site])
        # FLARE's task timeout counts from scheduling; here picking up and training have separate limits
        while task.completion_status is None and not self.abort_signal.triggered:
            picked_up = task.client_tasks[0].task_sent_time if task.client_tasks else None
            if picked_up is None and time.time() - task.create_time > self.assignment_timeout:
                self.cancel_task(task)
            elif picked_up is not None and time.time() - picked_up > self.visit_timeout:
                self.cancel_task(task, completion_status=TaskCompletionStatus.TIMEOUT)
            time.sleep(self._task_check_period)
        visit["seconds"] = round(time.time() - visit.pop("started_at"), 1)
        result, reason = self._returned, None
        if not task.client_tasks:
            reason = f"did not pick up the model within {self.assignment_timeout} s"
        elif result is None:
            reason = f"did not return the model within {self.visit_timeout} s"
        elif result.get_return_code() != ReturnCode.OK:
            reason = f"answered {result.get_return_code()}"
        _count(traffic, site, received=size if task.client_tasks else 0)
        if reason:
            self.warning(f"pass {rnd}: skipped {site}, which {reason}; the model goes on unchanged")
            return model, visit | {"status": "skipped", "reason": reason}
        returned = FLModelUtils.from_shareable(result)
        _count(traffic, site, sent=state_bytes(returned.params))
        norms, refused = screen_updates(
            {site: returned.params}, {site: model.params}, self._expected, self.norm_ratio, True, self._norms
        )
        if refused:
            self.warning(f"refused the update of {site} in pass {rnd}: {refused[site]}; the model goes on unchanged")
            return model, visit | {"status": "skipped", "reason": f"its update was refused: {refused[site]}"}
        self._norms.append(norms[site])
        visit |= {"status": "trained", "returned": fingerprint(returned.params), "metrics": returned.metrics or {}}
        visit["update_norm"] = norms[site]
        return FLModel(params=returned.params, params_type=returned.params_type, current_round=rnd), visit

    def _keep_result(self, client_task: ClientTask, fl_ctx: FLContext) -> None:
        self._returned = client_task.result
        client_task.result = None

    def _validate(self, model: FLModel, sites: list[str], traffic: dict) -> dict[str, dict]:
        """The model after a pass, scored by each site that trained in it on its validation split."""
        results = self.send_model_and_wait(
            task_name=PASS_VALIDATION_TASK, data=model, targets=sites, timeout=self.visit_timeout
        )
        for site in sites:
            _count(traffic, site, received=state_bytes(model.params))
        return {r.meta["client_name"]: r.metrics for r in sorted(results, key=lambda r: r.meta["client_name"])}

    def _write(self, record: dict) -> None:
        path = Path(self.get_run_dir()) / VISITS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1))

    def process_result_of_unknown_task(self, client, task_name, client_task_id, result, fl_ctx) -> None:
        """A visit's result that arrives after its timeout must not become the model: drop it, say so."""
        self.warning(f"dropped a late {task_name} result from {client.name}: its visit had already been skipped")


def _count(traffic: dict, site: str, received: int = 0, sent: int = 0) -> None:
    """Bytes of model weights each site received from and sent to the server."""
    entry = traffic.setdefault(site, {"received": 0, "sent": 0})
    entry["received"] += received
    entry["sent"] += sent
