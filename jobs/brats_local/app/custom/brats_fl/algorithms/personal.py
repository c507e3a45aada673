"""Which state-dict keys stay at a site ("personal") and never travel to the server.

One selection drives both sides of a job: a site never loads a personal key from the server and never
sends one. ``none`` is plain FedAvg; ``all`` is the local-only baseline, where no weight is shared.
"""

from __future__ import annotations

from brats_fl.model import BratsUNet

SPECS = ("none", "all")


def personal_keys(model: BratsUNet, spec: str) -> list[str]:
    """The personal keys of ``model`` under ``spec``; refuses an unknown spec."""
    if spec == "none":
        return []
    if spec == "all":
        return list(model.state_dict())
    raise ValueError(f"unknown personal-key selection {spec!r}; choose one of {SPECS}")
