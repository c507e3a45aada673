"""What ``brats-fl tune`` searches for each algorithm, over which ranges, and where each range comes from.

Declared once, next to the parameter schema (``brats_fl.settings.params``): every dimension is named by the
``brats-fl run`` option it sets, so the schema says what the option means and checks its value, and the registry's
``Job.uses`` says which jobs take it (a dimension of a kind of parameter, FedOpt's server rate, is searched for the jobs
of that kind alone). Every algorithm searches the client learning rate; the jobs whose rounds end in an exchange also
search how many local epochs a round has; the others add what their papers tune (``RANGES``).

Local epochs are searched inside a fixed training budget: the profile's rounds x local epochs, the epochs each
training case is seen, stays the same for every trial, and a trial with E local epochs per round runs budget / E
rounds (a cyclic job: budget / E passes of E epochs per visit). Otherwise the search would simply pick the longest
training. The hypernetwork's warm-up is searched as a share of the rounds, so that its range does not move with the
number of rounds a trial runs.

Imports no Optuna: a dimension asks whatever trial object it is handed (Optuna's ``Trial``, or a ``FixedTrial``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from brats_fl.jobs.catalogue import JobParams
from brats_fl.jobs.registry import get_job
from brats_fl.settings.params import HYPERNETWORK, PARAMS, Param, dest, from_cli

#: the client learning rate per training recipe (``brats_fl.settings.params.RECIPE_NAMES``): Adam's usual rates for 3D
#: segmentation lie between MONAI's BraTS bundle's 1e-4 and our default 3e-3; SGD's grid in Reddi et al. (ICLR 2021)
#: spans 10^-3..10^0, and the schema's rule keeps a rate below 1 (nnU-Net's own is 1e-2)
CLIENT_LR: dict[str, tuple[float, float, str]] = {
    "adam_dice": (1e-4, 3e-2, "Adam: MONAI's BraTS bundle 1e-4 to ten times our default 3e-3"),
    "nnunet": (1e-3, 0.3, "SGD: Reddi et al. 2021 search 10^-3..10^0; nnU-Net uses 1e-2"),
}
#: option -> (low, high, source) of the log-uniform ranges only some jobs search
RANGES: dict[str, tuple[float, float, str]] = {
    "server_lr": (1e-3, 1.0, "Reddi et al. 2021 tune the server rate over 10^-3..10^0"),
    "tau": (1e-5, 1e-1, "Reddi et al. 2021 tune tau over 10^-5..10^-1"),
    "mu": (1e-3, 1.0, "FedProx (Li et al. 2020) picks mu from {0.001, 0.01, 0.1, 1}"),
    "ditto_lambda": (1e-2, 2.0, "Ditto (Li et al. 2021) picks lambda from {0.05, 0.1, 0.2} or {0.1, 1, 2}"),
    "hn_lr": (1e-4, 1e-1, "HyperSeg's paper trains the hypernetwork at 0.03; our default 1e-3"),
}
#: the hypernetwork's warm-up rounds as a share of the rounds: from none (the paper) to half the training
WARMUP_SHARE = (0.0, 0.5, "rounds of plain FedAvg before the hypernetwork, as a share of the rounds: 0 (the paper) "
                "to 0.5")  # fmt: skip
#: the fewest rounds (a cyclic job's passes) a trial may have: one round is no federation, one pass is SWT
MIN_ROUNDS = 2


@dataclass(frozen=True)
class Dimension:
    """One searched value of one study: a log-uniform or uniform range, or a choice of local epochs."""

    #: the Optuna parameter: a ``brats-fl run`` option's name (``lr``, ``server_lr``, ...), or ``warmup_share``
    name: str
    why: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[int, ...] = ()

    def suggest(self, trial: Any) -> Any:
        """This dimension's value for ``trial`` (Optuna's ``Trial`` or ``FixedTrial``)."""
        if self.choices:
            return trial.suggest_categorical(self.name, list(self.choices))
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def contains(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        return self.low <= value <= self.high

    def describe(self) -> dict[str, Any]:
        """The dimension as the results record it."""
        if self.choices:
            return {"name": self.name, "choices": list(self.choices), "why": self.why}
        return {"name": self.name, "low": self.low, "high": self.high, "log": self.log, "why": self.why}


def _option(name: str) -> Param:
    """The schema's parameter whose ``brats-fl run`` option is ``name``."""
    return next(p for p in (*PARAMS, *HYPERNETWORK) if p.flag and dest(p) == name)


def budget(params: JobParams) -> int:
    """The epochs each training case is seen in the job (rounds x local epochs), which every trial keeps."""
    return params.rounds * params.local_epochs


def epoch_choices(total: int) -> tuple[int, ...]:
    """Local epochs per round that split ``total`` epochs into whole rounds, at least ``MIN_ROUNDS`` of them."""
    return tuple(e for e in range(1, total + 1) if total % e == 0 and total // e >= MIN_ROUNDS)


def space(job: str, base: JobParams) -> tuple[Dimension, ...]:
    """The dimensions searched for ``job`` whose untuned parameters are ``base`` (a profile's: its recipe sets the
    learning rate's range, its rounds x local epochs the budget the epochs choices share)."""
    declared = get_job(job)
    low, high, why = CLIENT_LR[base.recipe]
    dims = [Dimension("lr", why, low, high, log=True)]
    epochs = epoch_choices(budget(base))
    if not declared.alone and not declared.sequential and epochs:
        why = f"local epochs per round, rounds = {budget(base)} / local epochs (the same training in every trial)"
        dims.append(Dimension("local_epochs", why, choices=epochs))
    if (declared.passes or 0) >= MIN_ROUNDS and epochs:
        why = f"epochs per visit, passes = {budget(base)} / epochs per visit (the same training in every trial)"
        dims.append(Dimension("visit_epochs", why, choices=epochs))
    for name, (low, high, why) in RANGES.items():
        if _option(name).uses in declared.uses:
            dims.append(Dimension(name, why, low, high, log=True))
    if _option("warmup_rounds").uses in declared.uses:
        dims.append(Dimension("warmup_share", WARMUP_SHARE[2], WARMUP_SHARE[0], WARMUP_SHARE[1]))
    return tuple(dims)


def options(base: JobParams, values: dict[str, Any]) -> dict[str, Any]:
    """A trial's values as the ``brats-fl run`` options they set (by option name), rounds or passes and warm-up rounds
    derived from them within ``base``'s budget."""
    chosen = {k: v for k, v in values.items() if k != "warmup_share"}
    total = budget(base)
    if "local_epochs" in values:
        chosen["rounds"] = total // values["local_epochs"]
    if "visit_epochs" in values:
        chosen["passes"] = total // values["visit_epochs"]
    if "warmup_share" in values:
        chosen["warmup_rounds"] = int(values["warmup_share"] * chosen.get("rounds", base.rounds))
    return chosen


def apply(base: JobParams, values: dict[str, Any]) -> JobParams:
    """``base`` with a trial's values (``options``); the schema checks every value as for ``brats-fl run``."""
    job, hypernetwork = from_cli(options(base, values))
    return replace(base, **job, hypernetwork=replace(base.hypernetwork, **hypernetwork))


def untuned(job: str, dims: tuple[Dimension, ...], base: JobParams) -> dict[str, Any]:
    """The values ``base`` has without tuning, for the dimensions whose range holds them: the jobs' defaults, which
    a study tries first, so that its choice is never worse on validation than what the jobs do now."""
    passes = base.passes or get_job(job).passes or 1
    current = {
        "lr": base.train_settings().lr,
        "local_epochs": base.local_epochs,
        "visit_epochs": base.visit_epochs or budget(base) // passes,
        "hn_lr": base.hypernetwork.lr,
        "warmup_share": base.hypernetwork.warmup_rounds / base.rounds,
    } | {name: getattr(base, name) for name in RANGES if name != "hn_lr"}
    return {d.name: current[d.name] for d in dims if d.contains(current[d.name])}


def flags(chosen: dict[str, Any]) -> str:
    """``options`` as ``brats-fl run`` flags, rates to 4 significant digits: ``--lr 0.002 --local-epochs 2``."""
    shown = {k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in chosen.items()}
    return " ".join(f"{_option(k).flag} {v}" for k, v in shown.items())
