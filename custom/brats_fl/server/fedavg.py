"""Stragglers: a FedAvg round that closes without its slowest site, and a drill that makes a site slow.

FLARE 2.9's ``FedAvg`` (``nvflare/app_common/workflows/fedavg.py``, ``run``) does not do this itself: it is written
for rounds in which every site it samples (``num_clients``) answers, and sends each round's task with ``send_model``
and no ``min_responses`` or ``timeout``, which FLARE reads as "every sampled site, however long it takes"; its
constructor takes neither, so one slow or hung site holds every round up. FLARE's broadcast
supports both (``BcastTaskManager.check_task_exit`` in ``nvflare/apis/impl/bcast_manager.py``): the task ends
once ``min_responses`` sites have answered and ``wait_time_after_min_received`` seconds have passed since.
``DeadlineFedAvg`` passes ``min_responses`` and ``round_wait`` through, and refuses to average a round that
ended with fewer answers than that, which FLARE would otherwise average without a word: its task also ends
when the sites it waits for are deemed dead, and it counts an error reply it chose to ignore as an answer.
``round_timeout`` bounds the whole round, FLARE's task timeout: a site whose job process hangs while its client
process keeps sending heartbeats is never deemed dead, so without it a round that needs that site waits for ever.

A late update never reaches a later round (FLARE 2.9, checked in the simulator by ``tests/test_stragglers.py``):

- when the round's task ends, its per-site tasks leave the server's table (``WFCommServer._do_check_tasks``);
- before sending a result a site asks whether its task still stands (``ClientRunner._try_send_result_once``,
  ``_check_task_once``); the server answers ``TASK_UNKNOWN`` and logs ``task <id> is not found``
  (``ServerRunner._handle_task_check``), and the site drops the result unsent;
- a result sent in the moment between that check and the task's end reaches ``WFCommServer._do_process_submission``,
  finds no standing task and goes to ``process_result_of_unknown_task``, where ``BaseModelController`` only
  checks its return code: FedAvg's aggregation callback is a property of the task of its own round, so no
  other round's aggregation can be handed it.
"""

from __future__ import annotations

from collections.abc import Callable

from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.workflows.base_fedavg import _get_client_name
from nvflare.app_common.workflows.fedavg import FedAvg

from brats_fl.server.schedule import check_schedule, set_round_lr


def shortfall(targets: list[str], answered: set[str], needed: int) -> str | None:
    """Why a round whose task ended with answers from ``answered`` of ``targets`` must not be averaged (fewer
    than ``needed``), or None if it may."""
    if len(answered) >= needed:
        return None
    missing = ", ".join(sorted(set(targets) - answered))
    return (
        f"{len(answered)} of {len(targets)} sites answered, fewer than the {needed} required; the round is not "
        f"averaged. No usable answer from: {missing}"
    )


class DeadlineFedAvg(FedAvg):
    """FLARE's FedAvg whose round closes ``round_wait`` seconds after ``min_responses`` sites have answered, or
    ``round_timeout`` seconds after it began, and which can continue an interrupted run (``brats_fl.jobs.resume``).

    Args:
        min_responses: sites that must answer a round; None: every sampled site (FLARE's FedAvg).
        round_wait: seconds to keep waiting for the other sites once ``min_responses`` have answered; a site
            that answers later is left out of the round, and its update is dropped.
        round_timeout: seconds after which a round ends whoever has answered (0: no limit); a round that ends short
            of ``min_responses`` answers (of every site without it) stops the job, naming the sites missing.
        resume: the persistor's initial checkpoint is an interrupted run's last global model: start after the
            round it records, and run only the rounds left of ``num_rounds``.
        lr, lr_schedule: the sites' initial learning rate and its schedule over the job's rounds; each round's
            task carries that round's rate (``brats_fl.server.schedule``: round r of the job's R, from 0, also
            when resuming). None: no rate is sent and the sites keep their own schedule (central, local-only).
    """

    def __init__(
        self,
        *args,
        min_responses: int | None = None,
        round_wait: int = 0,
        round_timeout: int = 0,
        resume: bool = False,
        lr: float | None = None,
        lr_schedule: str = "constant",
        **kwargs,
    ):
        # *args and **kwargs let FLARE's job export find FedAvg's arguments too; it reads each argument back from
        # the attribute of the same name
        super().__init__(*args, **kwargs)
        if (min_responses is not None and min_responses < 1) or round_wait < 0 or round_timeout < 0:
            raise ValueError(
                "need min_responses >= 1, round_wait >= 0 and round_timeout >= 0, got "
                f"{min_responses}, {round_wait} and {round_timeout}"
            )
        check_schedule(lr, lr_schedule)
        self.min_responses = min_responses
        self.round_wait = round_wait
        self.round_timeout = round_timeout
        self.resume = resume
        self.lr = lr
        self.lr_schedule = lr_schedule
        self._targets: list[str] = []
        self._answered: set[str] = set()
        self._needed = 0

    def load_model(self) -> FLModel:
        """The initial model; when resuming, also where to start: FedAvg.run reads ``start_round`` and
        ``num_rounds`` right after this call."""
        model = super().load_model()
        if self.resume and model is not None:  # None: FLARE has already stopped the job, naming the checkpoint
            self.start_round, self.num_rounds = rounds_left(model.meta, self.num_rounds)
            self.info(f"resuming: rounds {self.start_round} to {self.start_round + self.num_rounds - 1} are left")
        return model

    def send_model(
        self,
        task_name: str = AppConstants.TASK_TRAIN,
        data: FLModel | None = None,
        targets: list[str] | None = None,
        min_responses: int | None = None,
        timeout: int = 0,
        callback: Callable[[FLModel], bool] | None = None,
    ) -> None:
        """The round's task, carrying the round's learning rate, ending as ``min_responses``, ``round_wait`` and
        ``round_timeout`` say; notes which sites answered.

        FedAvg.run gives no ``min_responses`` nor ``timeout``: the controller's own apply unless a caller gives them."""
        if data is not None:
            # a resumed run's num_rounds counts the rounds left; the schedule is over the whole job's rounds
            set_round_lr(data, self.lr, self.lr_schedule, self.current_round, self.start_round + self.num_rounds)
        self._targets = list(targets) if targets else [c.name for c in self.engine.get_clients()]
        self._answered = set()
        wanted = self.min_responses if min_responses is None else min_responses
        self._needed = wanted or len(self._targets)

        def note_answer(result: FLModel) -> bool:
            # an empty update (the local-only baseline sends no weights) is an answer, though FedAvg skips it;
            # FLARE calls this with its controller lock held, one result at a time
            self._answered.add(_get_client_name(result))
            return callback(result)

        self.broadcast_model(
            task_name=task_name,
            data=data,
            targets=targets,
            min_responses=wanted,
            timeout=timeout or self.round_timeout,
            wait_time_after_min_received=self.round_wait,
            blocking=False,
            callback=note_answer if callback else None,
        )

    def _get_aggregated_result(self) -> FLModel:
        # FedAvg.run calls this once the round's task has ended, before anything is averaged
        why = shortfall(self._targets, self._answered, self._needed)
        limit = f" (round_timeout {self.round_timeout} s)" if self.round_timeout else ""
        if why:
            raise RuntimeError(f"round {self.current_round}: {why}{limit}")
        missing = sorted(set(self._targets) - self._answered)
        if missing:
            self.warning(
                f"round {self.current_round} closed with {sorted(self._answered)}; left out {missing}, without a "
                f"usable answer {self.round_wait} s after {self._needed} sites had answered{limit}"
            )
        return super()._get_aggregated_result()


def rounds_left(checkpoint_meta: dict | None, total: int) -> tuple[int, int]:
    """(first round, number of rounds) left of a ``total``-round job whose last global model carries
    ``checkpoint_meta`` (FLARE's persistor keeps the round that model closed as ``current_round``)."""
    done = (checkpoint_meta or {}).get(AppConstants.CURRENT_ROUND)
    if not isinstance(done, int):
        raise ValueError("asked to resume, but the initial checkpoint records no completed round (current_round)")
    if done + 1 >= total:
        raise ValueError(f"nothing to resume: the checkpoint closed round {done}, the last of the job's {total}")
    return done + 1, total - done - 1
