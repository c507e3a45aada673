"""The learning rate of each round, decided on the server and sent to the sites with every training task.

The federated nnU-Net slides decay the rate on the server by round: round r of R trains at
``lr0 * (1 - r / R) ** 0.9`` (``brats_fl.seg.trainer.poly_lr``), r counted from 0 as FLARE's ``current_round``,
so the first round trains at lr0 and the last at lr0 * (1 / R) ** 0.9. A site trains every local epoch of a round
at the rate that round's task carries (``ROUND_LR`` in the task's FLModel meta) and records it in its
``rounds.jsonl``. A schedule of the sites' own per local epoch would restart at every site's first epoch or need
each site to know the round count, and decays to 0 at the last epoch, which leaves nothing for fine-tuning.

Every controller that sends training tasks calls ``set_round_lr``: FedAvg and SegViz per round
(``brats_fl.server.fedavg``), HyperSeg per round (``brats_fl.server.hyperseg``), and the sequential jobs per
visit (``brats_fl.server.sequential`` says why). A controller given no ``lr`` sends none: the central and
local-only jobs, where rounds are only checkpoints, leave the sites their per-epoch schedule.
"""

from __future__ import annotations

from nvflare.app_common.abstract.fl_model import FLModel

from brats_fl.protocol import ROUND_LR
from brats_fl.seg.trainer import poly_lr

SCHEDULES = ("constant", "poly")


def check_schedule(lr: float | None, schedule: str) -> None:
    """Refuse, when a controller is built, a schedule it could not follow."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {SCHEDULES}, not {schedule!r}")
    if lr is not None and not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")


def round_lr(lr: float, schedule: str, step: int, steps: int) -> float:
    """The rate of step ``step`` of ``steps`` (from 0): ``lr`` throughout, or poly-decayed."""
    check_schedule(lr, schedule)
    return poly_lr(lr, step, steps) if schedule == "poly" else lr


def set_round_lr(model: FLModel, lr: float | None, schedule: str, step: int, steps: int) -> None:
    """Put step ``step``'s rate into ``model``'s meta for the sites; with no ``lr`` remove any, so that the sites
    schedule their own."""
    meta = dict(model.meta or {})
    meta.pop(ROUND_LR, None)
    if lr is not None:
        meta[ROUND_LR] = round_lr(lr, schedule, step, steps)
    model.meta = meta
