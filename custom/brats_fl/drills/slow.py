"""A site that answers late on purpose, to show how a round closes without it."""

from __future__ import annotations

import time

from nvflare.apis.filter import Filter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants


class SlowSite(Filter):
    """A drill: site ``s`` holds each training update ``delays[s]`` seconds before sending it (a task-result
    filter on the ``train`` task), as a site with a slower machine or network would. A job abort ends the wait."""

    def __init__(self, delays: dict[str, float]):
        super().__init__()
        if any(d < 0 for d in delays.values()):
            raise ValueError(f"delays must be seconds >= 0, got {delays}")
        self.delays = delays

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        site = fl_ctx.get_identity_name()
        delay = self.delays.get(site, 0)
        if delay:
            rnd = shareable.get_header(AppConstants.CURRENT_ROUND)
            self.log_warning(fl_ctx, f"slow-site drill: {site} holds its round {rnd} update for {delay:g} s")
            abort = fl_ctx.get_run_abort_signal()
            end = time.monotonic() + delay
            while time.monotonic() < end and not (abort and abort.triggered):
                time.sleep(0.2)
        return shareable
