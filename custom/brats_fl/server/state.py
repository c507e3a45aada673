"""The state a controller keeps beside the global model and resumes with: FedOpt's moments, SCAFFOLD's global
control variate, HyperSeg's hypernetwork and its optimiser.

One piece for the three controllers, so that they save and check it alike. The state is saved after every round,
before the persistor saves the global model: a server that dies between the two saves leaves the state a round ahead,
which a resumption refuses, rather than a global model a round ahead, which it could not notice. A resumed
controller takes the state only if it is of the round the global model closed. ``brats_fl.jobs.resume`` bundles the
file (``STATE_FILE``) into the job that continues a run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from brats_fl.seg.model import save_whole


def resume_folder(app_dir: str, resume_from: str) -> Path:
    """The folder of the checkpoint a controller resumes from, where its server state lies beside it: a relative
    ``resume_from`` was bundled into the job's custom folder (``brats_fl.jobs.resume``), as FLARE's persistor reads
    a relative checkpoint."""
    path = Path(resume_from)
    return (path if path.is_absolute() else Path(app_dir) / "custom" / path).parent


class ServerState:
    """For a FLARE controller with a ``resume_from`` argument (the interrupted run's last global model, or None): its
    state saved into the server's app folder every round, and read back from beside ``resume_from``."""

    #: the file beside the global model (``brats_fl.protocol``)
    STATE_FILE: ClassVar[str]
    #: what the state is, in words for errors and the log
    STATE_NAME: ClassVar[str]
    resume_from: str | None

    def save_state(self, done: int, **state: Any) -> None:
        """Save the state of round ``done``, the round the global model saved next closes."""
        save_whole({"round": done, **state}, Path(self.get_app_dir()) / self.STATE_FILE)

    def state_path(self) -> Path:
        """Where the state to resume with lies: beside ``resume_from``."""
        if not self.resume_from:
            raise ValueError(f"asked to resume without resume_from: the {self.STATE_NAME} saved beside it is needed")
        return resume_folder(self.get_app_dir(), self.resume_from) / self.STATE_FILE

    def load_state(self, done: int | None) -> dict[str, Any]:
        """The saved state, refused unless it is of round ``done``, the round the global model resumed from closed."""
        path = self.state_path()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: asked to resume, but no {self.STATE_NAME} was saved there")
        state = torch.load(path, map_location="cpu")
        if state["round"] != done:
            raise ValueError(f"{path}: the {self.STATE_NAME} is of round {state['round']}, the global model of {done}")
        self.info(f"resuming with the {self.STATE_NAME} of round {done} from {path}")
        return state
