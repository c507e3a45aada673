"""SCAFFOLD's server (Karimireddy et al., ICML 2020): FLARE's ``Scaffold`` controller, able to continue an
interrupted run.

The algorithm is FLARE 2.9's, unchanged: each round it sends the global model with the global control variate c,
averages the returned models and the sites' changes of their own variates c_i (weighted by training cases), and
adds that average to c (the sites' side: ``brats_fl.site.algorithms.Scaffold``). FLARE keeps c in memory only, so a
server restart would begin again at c = 0 while the sites' c_i went on. ``ResumableScaffold`` saves c after every
round, before the global model (a server that dies between the two saves leaves c a round ahead, which
``brats_fl.jobs.resume`` refuses), and with ``resume_from`` starts after the checkpoint's round with c of that round.
"""

from __future__ import annotations

import torch
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.workflows.scaffold import Scaffold

from brats_fl.protocol import SCAFFOLD_FILE
from brats_fl.server.fedavg import rounds_left
from brats_fl.server.state import ServerState


class ResumableScaffold(ServerState, Scaffold):
    """FLARE's ``Scaffold``, which saves c every round and resumes with it.

    Args:
        resume_from: the interrupted run's last global model (the persistor's initial checkpoint); c of the same
            round (``SCAFFOLD_FILE``) lies beside it. Relative: bundled into the job's custom folder
            (``brats_fl.jobs.resume``). None: a run from the start, c = 0.
    """

    STATE_FILE = SCAFFOLD_FILE
    STATE_NAME = "control variate"

    def __init__(self, *args, resume_from: str | None = None, **kwargs):
        # attributes named as the arguments: FLARE's job export reads them back
        super().__init__(*args, **kwargs)
        self.resume_from = resume_from

    def initialize(self, fl_ctx) -> None:
        super().initialize(fl_ctx)  # loads the initial model and sets c = 0
        if self.resume_from and self.model is not None:
            self.start_round, self.num_rounds = rounds_left(self.model.meta, self.num_rounds)
            self.model.start_round, self.model.total_rounds = self.start_round, self.num_rounds
            self._global_ctrl_weights = self._restore(self.start_round - 1)
            self.info(f"resuming: rounds {self.start_round} to {self.start_round + self.num_rounds - 1} are left")

    def _restore(self, done: int) -> dict[str, torch.Tensor]:
        controls = self.load_state(done)["controls"]
        if set(controls) != set(self._global_ctrl_weights):
            raise ValueError(f"{self.state_path()}: its control variate has other keys than the job's model")
        return dict(controls)

    def save_model(self, model: FLModel) -> None:
        """c first, then FLARE's persistor saves the global model (FLARE's ``Scaffold`` updates c before saving)."""
        controls = {k: torch.as_tensor(v).clone() for k, v in self._global_ctrl_weights.items()}
        self.save_state(self.current_round, controls=controls)
        super().save_model(model)
