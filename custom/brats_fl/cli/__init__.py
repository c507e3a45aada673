"""The ``brats-fl`` command line: argument parsing only, one module per area; the work is in the layers below, each
imported when its command runs, so that ``brats-fl --help`` and the data commands import neither torch nor FLARE."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from typing import Any


def lazy(module: str, name: str) -> Callable[[argparse.Namespace], Any]:
    """A command function that imports ``module`` only when the command runs."""

    def run(args: argparse.Namespace) -> Any:
        return getattr(importlib.import_module(module), name)(args)

    return run
