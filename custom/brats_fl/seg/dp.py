"""Differentially private local training (DP-SGD) with Opacus. Knows nothing of FLARE.

The unit of privacy is a training case (a patient): each step draws every case of the site independently with
probability ``sample_rate`` (Poisson sampling, which the accountant's subsampling bound assumes), takes one patch of
each drawn case, clips each case's gradient to ``max_grad_norm`` and adds Gaussian noise of ``noise_multiplier`` times
that norm to their sum (Abadi et al. 2016). Opacus computes the per-case gradients (``GradSampleModule``: hooks for
MONAI's convolutions and instance or group norm, functorch for PReLU and transposed convolutions), clips and noises
them (``DPOptimizer``) and accounts for them (Rényi-DP accountant, ``RDPAccountant``); the noise multiplier comes
from Opacus too (``get_noise_multiplier``), for the target (epsilon, delta) over every step the site will take.

Batch norm mixes the cases of a batch, so no per-case gradient exists: a DP model uses instance or group norm
(``check_dp_model``). A step whose Poisson draw is empty still adds noise, as the accountant counts it.

The noise and the draws come from fresh entropy, never from the job's seed: every site seeds torch's global generator
from the job (MONAI's ``set_determinism``), and noise that follows a number written in the job would protect no one;
a DP run therefore does not repeat bit for bit. Opacus's ``secure_mode`` (a cryptographic generator, and noise robust
to floating-point attacks) needs ``torchcsprng``, which has no build for torch 2.13; it is not used.
"""

from __future__ import annotations

import functools
import secrets
import warnings
from collections.abc import Iterator

import torch
from monai.data import list_data_collate
from torch.utils.data import DataLoader

# Opacus is imported where it is used, not here: it pulls in torch.distributed.tensor, about a second of start-up
# that every site process and CLI call would pay (this module's check_dp_model is on their path) though few jobs
# train with DP-SGD.

# Opacus's hooks on the U-Net's first layer, whose input (an image) needs no gradient, make torch warn at every step
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)

#: what a DP-SGD epsilon protects: one training case of a site, everything the site holds of that patient
UNIT = "a training case (patient) of the site"
ACCOUNTANT = "rdp"


def check_dp_model(norm: str) -> None:
    """Refuse batch norm under DP-SGD: its statistics mix the cases of a batch, so a case's gradient depends on the
    others and per-case clipping bounds nothing."""
    if norm == "batch":
        raise ValueError(
            "DP-SGD needs a model without batch norm, whose statistics mix the cases of a batch; use norm instance or "
            "group"
        )


@functools.lru_cache(maxsize=64)
def noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier (Opacus, RDP accountant) that keeps ``steps`` steps at ``sample_rate`` within
    (``epsilon``, ``delta``). Opacus's search takes about a second; a trainer made again with the same settings (a
    resumed site, a benchmark) reuses it."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps, accountant=ACCOUNTANT
        )
    )


def epsilon_of(history: list[tuple[float, float, int]], delta: float) -> float:
    """The epsilon at ``delta`` that the RDP accountant gives for ``history`` ((noise multiplier, sample rate, steps)
    per phase); 0 for no step."""
    from opacus.accountants import RDPAccountant

    history = [h for h in history if h[2] > 0]
    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta))


def _fresh_generator() -> torch.Generator:
    return torch.Generator().manual_seed(secrets.randbits(63))


def _collate(batch: list) -> dict | None:
    """MONAI's collation, or None for an empty Poisson draw."""
    return list_data_collate(batch) if batch else None


class DPSGD:
    """DP-SGD around a model and its optimiser for a site with ``cases`` training cases, calibrated so that
    ``epochs`` epochs (each ``steps_per_epoch`` Poisson steps drawing ``batch_size`` cases on average) spend
    (``epsilon``, ``delta``). The accountant's history lives as long as the trainer: it is composed over rounds and
    kept with the trainer's state for a resumed job."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        epsilon: float,
        delta: float,
        max_grad_norm: float,
        cases: int,
        batch_size: int,
        epochs: int,
    ):
        from opacus import GradSampleModule
        from opacus.accountants import RDPAccountant
        from opacus.optimizers import DPOptimizer

        if cases < 1:
            raise ValueError("DP-SGD needs at least one training case")
        self.epsilon, self.delta, self.max_grad_norm = epsilon, delta, max_grad_norm
        self.cases = cases
        self.sample_rate = min(1.0, batch_size / cases)
        #: Opacus's Poisson sampler takes 1 / sample_rate steps per epoch
        self.steps_per_epoch = int(1 / self.sample_rate)
        self.planned_steps = epochs * self.steps_per_epoch
        self.noise_multiplier = noise_multiplier(epsilon, delta, self.sample_rate, self.planned_steps)
        with warnings.catch_warnings():
            # MONAI's instance norm without running statistics: nothing for Opacus to warn about
            warnings.simplefilter("ignore")
            self.module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        self.module.disable_hooks()
        self.optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=max(1, round(self.sample_rate * cases)),
            generator=_fresh_generator(),
        )
        self.accountant = RDPAccountant()
        self._draws = _fresh_generator()

    def batches(self, loader: DataLoader) -> Iterator[dict | None]:
        """One epoch of Poisson draws over ``loader``'s cases (one patch per case), None for an empty draw."""
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        sampler = UniformWithReplacementSampler(
            num_samples=len(loader.dataset), sample_rate=self.sample_rate, generator=self._draws
        )
        yield from DataLoader(loader.dataset, batch_sampler=sampler, collate_fn=_collate)

    def train(self, enabled: bool) -> None:
        """Per-case gradients are recorded only while training; inference runs the plain model."""
        if enabled:
            self.module.enable_hooks()
        else:
            self.module.disable_hooks()

    def step(self) -> None:
        """Clip every case's gradient, add the noise, take the optimiser's step and account for it."""
        self.optimizer.step()
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    def empty_step(self) -> None:
        """The step of an empty draw: noise alone, accounted as any other."""
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        self.step()

    def steps(self) -> int:
        """Steps taken so far (in every round of the job)."""
        return sum(n for _, _, n in self.accountant.history)

    def spent(self, since: int | None = None) -> dict:
        """What this site's training has spent so far: (epsilon, delta) of every step composed (RDP), with the
        mechanism's settings, for the site's record and the job's privacy ledger; with ``since`` (a ``steps()``
        count) also the epsilon of the steps after it alone (``epsilon_round``)."""
        out = {} if since is None else {"epsilon_round": self._epsilon_since(since)}
        return out | {
            "mechanism": "dp-sgd",
            "unit": UNIT,
            "accountant": ACCOUNTANT,
            "epsilon": epsilon_of(self.accountant.history, self.delta),
            "delta": self.delta,
            "target_epsilon": self.epsilon,
            "steps": self.steps(),
            "planned_steps": self.planned_steps,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "max_grad_norm": self.max_grad_norm,
            "cases": self.cases,
        }

    def _epsilon_since(self, since: int) -> float:
        return epsilon_of([(self.noise_multiplier, self.sample_rate, self.steps() - since)], self.delta)

    def state_dict(self) -> dict:
        return {"history": list(self.accountant.history)}

    def load_state_dict(self, state: dict) -> None:
        self.accountant.history = [tuple(h) for h in state["history"]]
