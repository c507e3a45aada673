"""Every job of brats-fl, declared once: what the simulator, the tuning, the benchmark, the SegViz comparison and the
reference need to know about it, and which function of the catalogue builds its FLARE recipe.

Imports neither torch nor FLARE, so that the command line lists the jobs at once: the recipe builders, which need
FLARE, are named (``Job.recipe``, a function of ``brats_fl.jobs.catalogue``), not imported.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Job:
    """One job. ``uses`` gets ``timeout`` added where the job's rounds can be cut short (``__post_init__``)."""

    name: str
    #: the kinds of parameter the job uses besides those every job does (``brats_fl.settings.params.KINDS``); an
    #: option of another kind set for it is refused before anything runs (``brats_fl.jobs.catalogue.refuse_unused``)
    uses: frozenset[str]
    #: a sequential job's default passes around the sites; it trains at one site at a time, which may then use every
    #: core of a shared machine. None: not sequential
    passes: int | None = None
    #: trains one model at one site on the pooled datalist
    pooled: bool = False
    #: its rounds exchange nothing (pooled training, every site alone): local epochs per round only split one training
    #: into pieces, so tuning does not search them
    alone: bool = False
    #: one of the benchmark's algorithms; the SegViz jobs need partially annotated sites and are compared on their own
    #: terms (``brats-fl compare``)
    benchmark: bool = True
    #: a SegViz job's scheme, named as in the paper's tables (``brats-fl compare``)
    scheme: str | None = None

    def __post_init__(self) -> None:
        # --round-timeout bounds the rounds of every job whose server may close a round early, and HyperSeg's
        if self.uses & {"deadline", "hypernetwork"}:
            object.__setattr__(self, "uses", self.uses | {"timeout"})

    @property
    def sequential(self) -> bool:
        return self.passes is not None

    @property
    def recipe(self) -> str:
        """The function of ``brats_fl.jobs.catalogue`` that builds the job's recipe: the name without ``brats_``."""
        return self.name.removeprefix("brats_")


_FEDAVG = frozenset({"personal", "deadline", "screened", "dpsgd"})
_ALONE = frozenset({"screened", "deadline", "dpsgd"})
_SEQUENTIAL = frozenset({"screened", "sequential"})
_HYPERSEG = frozenset({"screened", "hypernetwork"})
# SegViz's loss normalises over a batch's annotated regions, which couples the cases: no DP-SGD
_SEGVIZ = (_FEDAVG - {"dpsgd"}) | {"finetune", "sampling"}
_FEDOPT = frozenset({"screened", "deadline", "fedopt", "fedopt_beta2", "dpsgd"})

#: every job, in the order of the reference, the export, the benchmark's page and the SegViz comparison
JOBS: dict[str, Job] = {
    job.name: job
    for job in (
        Job("brats_central", _ALONE, pooled=True, alone=True),
        Job("brats_local", _ALONE, alone=True),
        Job("brats_fedavg", _FEDAVG),
        Job("brats_fedavg_ft", _FEDAVG | {"finetune"}),
        Job("brats_fedper", _FEDAVG),
        Job("brats_fedbn", _FEDAVG),
        Job("brats_fedbn_ft", _FEDAVG | {"finetune"}),
        Job("brats_cyclic", _SEQUENTIAL, passes=2),
        Job("brats_swt", _SEQUENTIAL, passes=1),
        Job("brats_hyperseg_conv", _HYPERSEG),
        Job("brats_hyperseg_conv_bn", _HYPERSEG),
        Job("brats_hyperseg_conv_bn_emb", _HYPERSEG),
        Job("brats_segviz_local", frozenset({"screened", "deadline"}), alone=True, benchmark=False,
            scheme="Baseline (single-task)"),
        Job("brats_segviz_central", frozenset({"screened", "deadline"}), pooled=True, alone=True, benchmark=False,
            scheme="Central (naive pooling)"),
        Job("brats_segviz_fedavg", _SEGVIZ, benchmark=False, scheme="FedAvg"),
        Job("brats_segviz_fedbn", _SEGVIZ, benchmark=False, scheme="FedBN"),
        Job("brats_fedprox", (_FEDAVG - {"dpsgd"}) | {"fedprox"}),
        Job("brats_scaffold", frozenset()),  # FLARE's Scaffold controller aggregates unscreened
        Job("brats_fedadam", _FEDOPT),
        Job("brats_fedyogi", _FEDOPT),
        Job("brats_fedadagrad", _FEDOPT - {"fedopt_beta2"}),
        Job("brats_ditto", frozenset({"screened", "deadline", "ditto"})),
    )
}  # fmt: skip


def get_job(name: str) -> Job:
    """The job called ``name``; refuses an unknown one, naming the jobs."""
    if name not in JOBS:
        raise ValueError(f"unknown job {name!r}; choose one of {sorted(JOBS)}")
    return JOBS[name]
