"""The FLARE executor every brats-fl job names at its sites: FLARE's Client API executor, run in process,
on the client script of the *installed* brats-fl package.

Why this mechanism (of those FLARE 2.9 offers: code in the job's ``custom/`` folder, FLARE's app packages,
``<workspace>/local/custom``, or an installed component named by module path): a job folder that names
``brats_fl.site.executor.SiteExecutor`` carries only configuration, so sites that deny the ``byoc`` right run it,
the code a hospital's IT installed and reviewed is the code that runs, and one ``pip install`` updates every job.
``local/custom`` would put a second copy of the package in every startup kit, and ``set_app_packages`` alone
still leaves FLARE's ``ScriptRunner`` copying the script into ``custom/``. FLARE's own ``ClientAPIExecutor`` does
all the work (task exchange, tracking, in-process threading); this subclass only points it at the installed
client script, hands that script the job's structured configuration, and refuses a job exported from another
brats-fl before any training (``brats_fl.version``). FLARE checks site components against the site's
``class_allow_list``; a site allows ``brats_fl`` there when it installs the package (docs/howto/deploy.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor
from nvflare.client.config import ExchangeFormat, TransferType
from nvflare.fuel.data_event.data_bus import DataBus

from brats_fl.version import mismatch

#: where the client script finds the job's site configuration: FLARE's in-process data bus, through which FLARE
#: itself hands the Client API to the script (one FLARE client per process)
CONFIG_KEY = "brats_fl.site.config"
CLIENT_SCRIPT = Path(__file__).with_name("client.py")


class SiteExecutor(ClientAPIExecutor):
    """Runs ``brats_fl/site/client.py`` of the installed package with ``config``, the job's site parameters.

    ``expects`` is what the job was exported from (``{"version": ..., "code_sha256": ...}``); a site running other
    code stops the job at its start, naming itself, both versions and the command that fixes it.
    ``memory_gc_rounds``: FLARE's memory cleanup every that many rounds, after the site sends (0: never).
    """

    def __init__(
        self, config: dict[str, Any], expects: dict[str, str], transfer: str = "full", memory_gc_rounds: int = 0
    ):
        super().__init__(
            execution_mode="in_process",
            task_script_path=str(CLIENT_SCRIPT),
            params_exchange_format=ExchangeFormat.PYTORCH,
            server_expected_format=ExchangeFormat.PYTORCH,
            params_transfer_type=TransferType(transfer.upper()),
            memory_gc_rounds=memory_gc_rounds,
        )
        # kept under the constructor's names: FLARE's job export writes them back from these attributes
        self.config = config
        self.expects = expects
        self.transfer = transfer
        self.memory_gc_rounds = memory_gc_rounds

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            problem = mismatch(self.expects, where=fl_ctx.get_identity_name())
            if problem:
                self.log_error(fl_ctx, problem)
                self.system_panic(problem, fl_ctx)
                return
            DataBus().put_data(CONFIG_KEY, dict(self.config))
        super().handle_event(event_type, fl_ctx)
