"""``brats-fl benchmark``'s run: every unfinished run of the matrix (:mod:`brats_fl.results.benchmark`), and the page
(:mod:`brats_fl.results.benchmark_page`) rebuilt after each. Apart from the benchmark's definitions because the page
reads those, and the run writes the page: here, above both, no module imports the other back.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from brats_fl.results.benchmark import (
    RUN_MODULES,
    Profile,
    Progress,
    RunSpec,
    _run_one,
    _write_json,
    check_profile,
    default_parallel,
    finished_line,
    job_params,
    matrix,
    pending,
    prepare_partition,
    run_site_config,
    untrained_scores,
)
from brats_fl.results.benchmark_page import write_page


def run_benchmark(
    profile: Profile,
    out: Path,
    algorithms: Sequence[str] | None = None,
    partitions: Sequence[str] | None = None,
    seeds: int | None = None,
    parallel: int | None = None,
    page_only: bool = False,
    stream: TextIO | None = None,
) -> tuple[Path, int]:
    """Run every unfinished run of the matrix, each in its own process (a crash or a leak ends that run
    alone), ``parallel`` at a time, rebuilding the page after each; returns the page and the number of failed runs.
    ``page_only`` rebuilds the page from the finished runs and runs nothing. Progress goes to ``stream``, by default
    whatever ``sys.stdout`` is when the benchmark starts."""
    stream = stream or sys.stdout

    out = Path(out).resolve()
    specs = matrix(profile, algorithms, partitions, seeds)
    if page_only:
        return write_page(out), 0
    parallel = parallel or default_parallel(profile)
    check_profile(profile, out)
    configs = {}
    for name in dict.fromkeys(s.partition for s in specs):
        configs[name] = prepare_partition(name, out, profile)
        untrained = out / "partitions" / name / "untrained.json"
        if not untrained.is_file():
            _write_json(untrained, untrained_scores(configs[name], profile, out / "cache"))
    todo = pending(specs, out)
    stream.write(f"benchmark {profile.name}: {len(specs) - len(todo)} of {len(specs)} runs finished already, "
                 f"{len(todo)} to run, {parallel} at a time\n")  # fmt: skip
    progress = Progress(len(todo), parallel, stream)
    # each run in a process of its own, forked from a server that has imported torch, MONAI and FLARE once (and used
    # none of them, so no thread is forked): a spawned run imported them anew, about 5 s of CPU per run
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(RUN_MODULES)
    running: dict[RunSpec, multiprocessing.process.BaseProcess] = {}
    cores = max(1, (os.cpu_count() or 1) // parallel)
    while todo or running:
        while todo and len(running) < parallel:
            spec = todo.pop(0)
            folder = spec.folder(out)
            folder.mkdir(parents=True)
            site_config = run_site_config(folder, configs[spec.partition], out)
            params = job_params(profile, spec.algorithm, spec.seed, spec.partition)
            process = context.Process(target=_run_one, args=(spec, params, site_config, folder, cores), daemon=False)
            process.start()
            running[spec] = process
            progress.start(spec)
        time.sleep(1.0)
        progress.tick()
        for spec in [s for s, p in running.items() if not p.is_alive()]:
            running.pop(spec).join()
            line, ok = finished_line(spec, spec.folder(out))
            progress.finish(spec, line, ok)
            write_page(out)
    return write_page(out), progress.failed
