"""A site that sends broken updates on purpose, to show that the server's screening refuses them."""

from __future__ import annotations

import torch
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants

#: the broken updates a drill can send (``none``: the update as trained)
FAULTS = ("none", "nan", "inf", "key", "shape", "scale")
#: how far a ``scale`` fault blows an update up
FAULT_SCALE = 1e4


class FaultInjection(DXOFilter):
    """A fire drill: site ``s`` sends the broken update ``plan[s][r]`` in round ``r`` (``none``: as trained).

    A task-result filter on the ``train`` task; a site not in the plan, and a site in rounds past its list,
    sends its updates untouched.
    """

    def __init__(self, plan: dict[str, list[str]]):
        super().__init__(
            supported_data_kinds=[DataKind.WEIGHTS, DataKind.WEIGHT_DIFF],
            data_kinds_to_filter=[DataKind.WEIGHTS, DataKind.WEIGHT_DIFF],
        )
        unknown = sorted({f for faults in plan.values() for f in faults} - set(FAULTS))
        if unknown:
            raise ValueError(f"unknown fault(s) {unknown}; choose from {FAULTS}")
        self.plan = plan

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        site, rnd = fl_ctx.get_identity_name(), shareable.get_header(AppConstants.CURRENT_ROUND)
        faults = self.plan.get(site, [])
        fault = faults[rnd] if rnd is not None and rnd < len(faults) else "none"
        if fault == "none":
            return None
        params = {k: torch.as_tensor(v).clone() for k, v in dxo.data.items()}
        first = next(k for k, v in params.items() if v.is_floating_point())
        if fault in ("nan", "inf"):
            params[first].view(-1)[0] = float(fault)
        elif fault == "key":
            params["smuggled"] = torch.zeros(4)
        elif fault == "shape":
            params[first] = params[first].reshape(-1)
        else:
            params = {k: v * FAULT_SCALE if v.is_floating_point() else v for k, v in params.items()}
        self.log_warning(fl_ctx, f"fault drill: {site} sends a {fault!r} update in round {rnd}")
        dxo.data = params
        return dxo
