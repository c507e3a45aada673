"""Client-side federated algorithms at a site, from FLARE's own helpers: FedProx, SCAFFOLD and Ditto.

Each hands the FLARE-free training loop (``brats_fl.seg.trainer.Trainer.train_epochs``) one of its two hooks, so the
loop never learns which algorithm runs:

- FedProx (Li et al., MLSys 2020): the server's ``FedAvg`` puts ``fedprox_mu`` in every training task's meta (FLARE's
  ``FedProxRecipe`` contract); the site adds FLARE's ``PTFedProxLoss``, mu/2 ||w - w_global||^2 over the trainable
  parameters, to its objective, ``w_global`` being the model it received this round.
- SCAFFOLD (Karimireddy et al., ICML 2020): FLARE's ``Scaffold`` controller sends the global control variate ``c``
  in the task's meta; FLARE's ``PTScaffoldHelper`` corrects every optimiser step by ``-lr (c - c_i)`` and updates the
  site's own variate ``c_i`` by the paper's option II, ``c_i <- c_i - c + (w_global - w) / (K lr)`` after ``K``
  steps; the change of ``c_i`` goes back in the result's meta. The paper derives this for plain SGD; with Adam (the
  default ``adam_dice`` recipe) or Nesterov SGD (``nnunet``) the step is the optimiser's own and ``c_i`` estimates
  the mean update per unit of learning rate rather than the mean gradient, as in FLARE's helper, which applies the
  correction after whatever optimiser step was taken. Under a poly schedule ``lr`` is the round's last one.
- Ditto (Li et al., ICML 2021): besides the global model, which it trains and sends as in FedAvg, each site keeps a
  personal model ``v`` it never sends, trained ``personal_epochs`` per round on its own data with
  lambda/2 ||v - w_global||^2 added (FLARE's ``PTDittoHelper`` and its ``PTFedProxLoss``). After federated training
  that personal model, not the global one, is scored on the site's test split (``brats_fl.server.personalise``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.app_constant import AlgorithmConstants
from nvflare.app_common.utils.fedprox_utils import get_fedprox_mu
from nvflare.app_opt.pt.ditto import PTDittoHelper
from nvflare.app_opt.pt.fedproxloss import PTFedProxLoss
from nvflare.app_opt.pt.scaffold import PTScaffoldHelper
from torch.utils.data import DataLoader

from brats_fl.seg.trainer import Trainer


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The received global model as a fixed reference: a copy that no optimiser touches and no gradient reaches."""
    reference = copy.deepcopy(model)
    for param in reference.parameters():
        param.requires_grad_(False)
    return reference


class FedProx:
    """FedProx's proximal term towards the model a site received, an ``extra_loss`` of the training loop."""

    def __init__(self, mu: float, global_model: torch.nn.Module):
        self.mu = mu
        self.term = PTFedProxLoss(mu=mu)
        self.reference = frozen_copy(global_model)

    @classmethod
    def from_task(cls, task: FLModel, model: torch.nn.Module) -> FedProx | None:
        """The term for a training task whose meta carries ``fedprox_mu`` (checked by FLARE's reader); None for a
        task without it. ``model`` holds the received global weights."""
        if AlgorithmConstants.FEDPROX_MU not in (task.meta or {}):
            return None
        return cls(get_fedprox_mu(task), model)

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        return self.term(model, self.reference)


class Scaffold:
    """One site's side of SCAFFOLD for a whole job: FLARE's helper keeps ``c_i`` between rounds."""

    def __init__(self, model: torch.nn.Module):
        self.helper = PTScaffoldHelper()
        self.helper.init(model)
        self._controls: tuple[dict, dict] | None = None
        self._reference: torch.nn.Module | None = None

    def start_round(self, meta: dict[str, Any], model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Take the server's ``c`` from a training task's meta; ``model`` holds the received global weights.
        Returns ``c`` as received."""
        received = meta[AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL]
        self.helper.load_global_controls(received)
        self._controls = self.helper.get_params()
        self._reference = frozen_copy(model)
        return {k: torch.as_tensor(v) for k, v in received.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``c_i``, which a resumed site goes on with (``brats_fl.site.client``)."""
        return {k: v.clone() for k, v in self.helper.c_local.state_dict().items()}

    def load_state_dict(self, c_local: dict[str, torch.Tensor]) -> None:
        expected = self.helper.c_local.state_dict()
        if {k: v.shape for k, v in c_local.items()} != {k: v.shape for k, v in expected.items()}:
            raise ValueError("SCAFFOLD: the kept control variate c_i does not fit this job's model")
        self.helper.c_local.load_state_dict(c_local)

    def after_step(self, model: torch.nn.Module, lr: float) -> None:
        """The training loop's ``after_step``: ``w <- w - lr (c - c_i)``."""
        c_global, c_local = self._round_controls()
        self.helper.model_update(model, lr, c_global, c_local)

    def finish_round(self, model: torch.nn.Module, lr: float) -> dict[str, Any]:
        """Update ``c_i`` after the round's steps; returns the meta entry that carries its change to the server."""
        c_global, c_local = self._round_controls()
        self.helper.terms_update(model, lr, c_global, c_local, self._reference)
        self._controls = self._reference = None
        # as torch tensors, not the helper's NumPy arrays: FLARE's persistor keeps the server's last aggregated meta
        # in the global model file, which FLARE's cross-site evaluation opens with torch's weights-only loader
        delta = {k: torch.as_tensor(v) for k, v in self.helper.get_delta_controls().items()}
        return {AlgorithmConstants.SCAFFOLD_CTRL_DIFF: delta}

    def _round_controls(self) -> tuple[dict, dict]:
        if self._controls is None:
            raise RuntimeError("SCAFFOLD: a round's training began without the server's control variate")
        return self._controls


class Ditto(PTDittoHelper):
    """A site's Ditto personal model, trained by a ``Trainer`` of its own (its own optimiser state) with FLARE's
    helper keeping it in ``folder`` between rounds."""

    def __init__(self, trainer: Trainer, folder: Path, ditto_lambda: float, epochs: int):
        folder.mkdir(parents=True, exist_ok=True)
        super().__init__(
            criterion=trainer.loss_fn,
            model=trainer.model,
            optimizer=trainer.optimizer,
            device=trainer.device,
            app_dir=str(folder),
            ditto_lambda=ditto_lambda,
            model_epochs=epochs,
        )
        self.trainer = trainer
        #: the round's rate from the server (None: the trainer's own schedule), as the global model's training uses
        self.lr: float | None = None

    def local_train(
        self, train_loader: DataLoader, model_global: torch.nn.Module, abort_signal: Signal | None, writer: Any
    ) -> dict[str, float]:
        """``model_epochs`` epochs of the personal model on this site's data, pulled towards ``model_global`` (the
        model the site received this round)."""
        reference = frozen_copy(model_global)

        def proximal(model: torch.nn.Module) -> torch.Tensor:
            return self.prox_criterion(model, reference)

        stats = self.trainer.train_epochs(train_loader, self.model_epochs, lr=self.lr, extra_loss=proximal)
        self.epoch_global += self.model_epochs
        return stats

    def state_dict(self) -> dict:
        """What a resumed site needs to go on with this personal model: its weights, its optimiser and epochs."""
        weights = {k: v.detach().cpu() for k, v in self.trainer.model.state_dict().items()}
        return {"model": weights, "trainer": self.trainer.state_dict(), "epoch": self.epoch_global}

    def load_state_dict(self, state: dict) -> None:
        """Go on from ``state_dict()``'s result: the next ``round`` trains the restored personal model, not the
        global one (FLARE's helper reads it back from this job's folder)."""
        self.trainer.model.load_state_dict(state["model"])
        self.trainer.load_state_dict(state["trainer"])
        self.epoch_global = int(state["epoch"])
        self.save_model()

    def round(
        self, train_loader: DataLoader, model_global: torch.nn.Module, lr: float | None = None
    ) -> dict[str, float]:
        """One round at rate ``lr``: the personal model as kept (the received global model in the first round),
        trained, kept."""
        self.lr = lr
        self.load_model({k: v.detach().clone() for k, v in model_global.state_dict().items()})
        stats = self.local_train(train_loader, model_global, None, None)
        self.save_model()
        return stats
