"""The privacy ledger: what each privacy mechanism of a job guarantees, per site and round, and the job's budget.

Every job's server puts ``PrivacyLedger``, a FLARE filter, on the sites' results. For every training update (and a
personalisation result that reports fine-tuning under DP-SGD) it writes one line to ``privacy_ledger.jsonl`` in the
server's run folder: the site, the round, and for each mechanism on the way what it guarantees:

- ``dp-sgd`` (``brats_fl.seg.dp``): (epsilon, delta)-DP of each training case of the site, from Opacus's RDP
  accountant at the site, composed over every step the site has taken in the job, and this round's alone;
- ``svt`` (FLARE's ``SVTPrivacy``): epsilon-DP of the update, delta 0, as FLARE's filter states it in the update's
  meta (``svt_privacy_accountant``, summed over rounds: pure composition) under FLARE's model, in which each entry of
  the update is bounded by ``gamma`` per step; nothing bounds one case's effect on the update, so it is no guarantee
  per patient;
- ``percentile``, ``exclude`` and no filter: no differential-privacy guarantee (``NO_DP``).

The job's epsilon per site is DP-SGD's where the sites train with it (a filter after it is post-processing, which
cannot weaken it), else SVT's, else none. With a ``budget``, a job whose projected epsilon exceeds it is refused
before it starts (``projected_epsilon``, by the job catalogue), and a site whose reported epsilon exceeds it stops the
job, the ledger naming the site, its epsilon and the budget.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.filters.svt_privacy import _compute_epsilon_split, _compute_release_epsilon

from brats_fl.protocol import LEDGER_FILE, PERSONALISE_TASK, PRIVACY_META
from brats_fl.server.records import NO_DP

#: what a mechanism without a DP guarantee does, in words for the ledger
WITHOUT_GUARANTEE = {
    "none": f"{NO_DP}: updates leave the site as trained",
    "exclude": f"{NO_DP}: the excluded layers stay at the site, the rest leaves as trained",
    "percentile": f"{NO_DP}: only the largest changes leave, clipped (Shokri and Shmatikov), nothing is randomised",
}
#: FLARE's SVT filter's defaults (``SVTPrivacy``), for the projection of a job's epsilon
SVT_DEFAULTS = {"fraction": 0.1, "epsilon": 0.1, "noise_var": 0.1}


def svt_round_epsilon(args: dict, entries: int) -> float:
    """The epsilon FLARE's SVT filter spends on one update of ``entries`` values with ``args``: its threshold and
    query budget ``epsilon`` plus its release budget, computed by FLARE's own functions."""
    a = SVT_DEFAULTS | args
    n_upload = int(min(math.ceil(entries * a["fraction"]), entries))
    split = _compute_epsilon_split(a["epsilon"], n_upload, a.get("epsilon_threshold"), a.get("epsilon_query"))
    threshold, query = split
    return threshold + query + _compute_release_epsilon(n_upload, a["noise_var"], a.get("epsilon_release"))


def projected_epsilon(privacy: str, privacy_args: dict, dp_epsilon: float | None, rounds: int, entries: int) -> float:
    """The epsilon per site a job will have spent at its end: DP-SGD's target (its noise is calibrated to it), else
    SVT's per-round epsilon times ``rounds`` (FLARE's pure composition), else infinity: no guarantee."""
    if dp_epsilon is not None:
        return dp_epsilon
    if privacy == "svt":
        return rounds * svt_round_epsilon(privacy_args, entries)
    return math.inf


def check_budget(budget: float | None, projected: float, what: str) -> None:
    """Refuse a job whose projected epsilon exceeds ``budget``, before it starts."""
    if budget is None or projected <= budget:
        return
    if math.isinf(projected):
        raise ValueError(f"privacy_budget {budget:g}: {what} gives {NO_DP}, so no finite epsilon; the job is refused")
    raise ValueError(f"privacy_budget {budget:g}: {what} would spend epsilon {projected:.4g} per site; refused")


def entries_for(meta: dict, privacy: str) -> list[dict]:
    """The ledger's entries of one result: a site's DP-SGD (from ``PRIVACY_META``), then the wire filter."""
    out = []
    if PRIVACY_META in meta:
        out.append(dict(meta[PRIVACY_META]) | {"guarantee": "(epsilon, delta)-DP per training case (DP-SGD)"})
    if privacy == "svt":
        call, total = meta.get("svt_privacy_budget") or {}, meta.get("svt_privacy_accountant") or {}
        out.append(
            {
                "mechanism": "svt",
                "unit": "an update's entries, each bounded by gamma per step (FLARE's model, not a patient)",
                "accountant": total.get("accountant", "pure_dp_sum"),
                "epsilon": total.get("epsilon_total"),
                "epsilon_round": call.get("epsilon_total"),
                "delta": total.get("delta", 0.0),
                "guarantee": "epsilon-DP of the update as FLARE's SVT filter states it (pure composition)",
            }
        )
    elif privacy in WITHOUT_GUARANTEE and not (privacy == "none" and out):
        out.append({"mechanism": privacy, "guarantee": WITHOUT_GUARANTEE[privacy]})
    return out


def job_epsilon(entries: list[dict]) -> tuple[float | None, float | None]:
    """The (epsilon, delta) per site of a ledger row: DP-SGD's where present, else SVT's, else (None, None)."""
    for name in ("dp-sgd", "svt"):
        for entry in entries:
            if entry.get("mechanism") == name and entry.get("epsilon") is not None:
                return entry["epsilon"], entry["delta"]
    return None, None


class PrivacyLedger(Filter):
    """A server-side task-result filter that records, per site and round, each mechanism's guarantee in
    ``<server run dir>/privacy_ledger.jsonl`` and stops the job when a site's epsilon exceeds ``budget``. It changes
    nothing in what it reads."""

    def __init__(self, privacy: str = "none", budget: float | None = None):
        super().__init__()
        self.privacy = privacy
        self.budget = budget

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        task = fl_ctx.get_prop(FLContextKey.TASK_NAME)
        try:
            dxo = from_shareable(shareable)
        except ValueError:  # an error reply holds no DXO
            return shareable
        if task == PERSONALISE_TASK and PRIVACY_META not in dxo.meta:
            return shareable
        if task not in (AppConstants.TASK_TRAIN, PERSONALISE_TASK):
            return shareable
        entries = entries_for(dxo.meta, self.privacy)
        epsilon, delta = job_epsilon(entries)
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name() if peer else shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, None)
        row = {
            "site": site,
            "task": task,
            "round": shareable.get_header(AppConstants.CURRENT_ROUND),
            "epsilon": epsilon,
            "delta": delta,
            "budget": self.budget,
            "mechanisms": entries,
        }
        run_dir = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))
        with (run_dir / LEDGER_FILE).open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.budget is not None and (epsilon is None or epsilon > self.budget):
            spent = NO_DP if epsilon is None else f"epsilon {epsilon:.4g}"
            reason = f"privacy_budget {self.budget:g} exceeded: {site} has spent {spent} in round {row['round']}"
            self.log_error(fl_ctx, reason)
            self.system_panic(reason, fl_ctx)
        return shareable
