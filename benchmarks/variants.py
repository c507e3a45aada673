"""The full benchmark's IID runs with one setting changed: why FedAvg trails centralized training (issue 19, item
9), and what DP-SGD's budgets cost in Dice on the benchmark's sites (issue 22, item 2).

    python benchmarks/variants.py run --bench runs/bench [--variants fedavg_r30 dp_eps8] [--seeds 1]
    python benchmarks/variants.py table --bench runs/bench

``--bench`` is a ``brats-fl benchmark --profile full`` folder whose ``iid`` partition is built (its cohort, its
cache, and the reference runs ``iid/brats_central`` and ``iid/brats_fedavg`` of the matrix). Each variant is the
full profile's run of one job with the settings below changed, on the same sites, cases and seeds; its summary is
the matrix's (``brats_fl.results.benchmark.run_summary``), written under ``<bench>/variants/<variant>/seed<k>``, and
a finished variant is kept and skipped. ``table`` prints, per variant and reference, the epochs each training case is
seen, the sequential optimiser steps (a site's steps per round times rounds: FedAvg's sites step in parallel, and
averaging their updates is not a step more), pooled test Dice with its 95 % CI over seeds and cases, the paired
difference (CI and Wilcoxon p) to centralized training with as many epochs per case and to the matrix's run of the
same job, what the privacy ledger recorded, and wall time, as JSON with
the date and machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import multiprocessing
import shutil
import time
from pathlib import Path

import numpy as np
from brats_fl.results import benchmark as bench
from brats_fl.results.stats import bootstrap_ci, score_matrix, wilcoxon_p
from brats_fl.seg.trainer import TrainConfig

#: variant -> (job, settings changed from the full profile's); every other setting is the profile's
VARIANTS: dict[str, tuple[str, dict]] = {
    # as many rounds as centralized training takes sequential steps at 10 epochs (3 equal sites: 3x the rounds)
    "fedavg_r30": ("brats_fedavg", {"rounds": 30}),
    # centralized training as long: whether central gains from the 3x epochs too
    "central_r30": ("brats_central", {"rounds": 30}),
    # Adam's rate times the number of sites: each round's averaged update moves as far as central's three steps
    "fedavg_lr9e-3": ("brats_fedavg", {"lr": 9e-3}),
    # the same epochs per case in fewer, longer rounds: tells whether averaging often is what costs
    "fedavg_r5_e2": ("brats_fedavg", {"rounds": 5, "local_epochs": 2}),
    # the sites' Adam moments and step count forgotten at each round: whether moments carried over from the site's
    # own last round mislead it once its model has been replaced by the average
    "fedavg_optreset": ("brats_fedavg", {"optimizer_state": "reset"}),
    # centralized training with the rate of fedavg_lr9e-3: whether a larger rate helps central as much
    "central_lr9e-3": ("brats_central", {"lr": 9e-3}),
    # the federated nnU-Net slides' recipe (reference 004: SGD with Nesterov momentum 0.9, poly rate, Dice + CE),
    # centralized and federated, against the profile's Adam and Dice loss: the benchmark's own entries
    "central_nnunet": bench.VARIANTS["brats_central_nnunet"],
    "fedavg_nnunet": bench.VARIANTS["brats_fedavg_nnunet"],
    # DP-SGD at every site (delta 1e-5, the job's default clip), beside the matrix's FedAvg without it
    **{f"dp_eps{e:g}": ("brats_fedavg", {"dp_epsilon": float(e)}) for e in (1, 8, 32)},
}
REFERENCES = {"central (matrix)": "brats_central", "fedavg (matrix)": "brats_fedavg"}


def _folders(bench_dir: Path, name: str, seeds: int) -> list[Path]:
    """The folders of seeds 0 .. ``seeds`` - 1 of a variant or of a matrix reference that hold a finished summary:
    the references compared on the variants' seeds only, although the matrix may have run more."""
    root = bench_dir / ("runs/iid/" + REFERENCES[name] if name in REFERENCES else f"variants/{name}")
    return [root / f"seed{k}" for k in range(seeds) if (root / f"seed{k}" / "summary.json").is_file()]


def _run(bench_dir: Path, variant: str, seed: int) -> None:
    """One variant's run, in a spawned process as the matrix runs its own (a crash ends it alone)."""
    profile = bench.PROFILES["full"]
    algorithm, changes = VARIANTS[variant]
    folder = bench_dir / "variants" / variant / f"seed{seed}"
    if (folder / "summary.json").is_file():
        return
    shutil.rmtree(folder, ignore_errors=True)  # what a killed run left cannot be told from a finished run's
    folder.mkdir(parents=True)
    site_config = bench.run_site_config(folder, bench.prepare_partition("iid", bench_dir, profile), bench_dir)
    params = dataclasses.replace(bench.job_params(profile, algorithm, seed), **changes)
    spec = bench.RunSpec("iid", algorithm, seed)
    process = multiprocessing.get_context("spawn").Process(
        target=bench._run_one, args=(spec, params, site_config, folder, 2)
    )
    start = time.perf_counter()
    process.start()
    process.join()
    print(f"{variant} seed {seed}: exit {process.exitcode} after {time.perf_counter() - start:.0f} s", flush=True)


def _steps(summary: dict) -> tuple[float, int]:
    """Epochs per training case and sequential optimiser steps of a run (16 training cases per site, 48 pooled)."""
    p = summary["params"]
    pooled = summary["algorithm"] == "brats_central"
    cases = 48 if pooled else 16
    # a batch holds batch_size patches, samples_per_case of them from each case
    steps_per_epoch = math.ceil(cases / (p["batch_size"] // TrainConfig.samples_per_case))
    return p["rounds"] * p["local_epochs"], p["rounds"] * p["local_epochs"] * steps_per_epoch


def _interval(a, b=None) -> list[float]:
    ci = bootstrap_ci(a, b)
    return [round(ci.estimate, 3), round(ci.low, 3), round(ci.high, 3)]


def _paired(a, b) -> dict:
    """Difference of mean Dice ``a - b`` with its CI over seeds and cases, and the Wilcoxon p on per-case means."""
    return {"difference": _interval(a, b), "p_wilcoxon": wilcoxon_p(np.nanmean(a, 0) - np.nanmean(b, 0))}


def table(bench_dir: Path, seeds: int) -> dict:
    """Every finished variant and reference: epochs, sequential steps, pooled Dice with its CI, the paired difference
    to centralized training with as many epochs per case, and to the matrix's run of the same job."""
    found = {}
    for name in [*REFERENCES, *VARIANTS]:
        summaries = [json.loads((f / "summary.json").read_text()) for f in _folders(bench_dir, name, seeds)]
        if summaries:
            per_seed = [{r["case_id"]: r["dice_mean"] for r in s["per_case"]} for s in summaries]
            found[name] = (summaries, score_matrix(per_seed, sorted(per_seed[0])))
    # centralized training at the profile's settings, by epochs per case
    centrals = {_steps(found[n][0][0])[0]: found[n][1] for n in ("central (matrix)", "central_r30") if n in found}
    references = {job: found[name][1] for name, job in REFERENCES.items() if name in found}
    rows = {}
    for name, (summaries, matrix) in found.items():
        epochs, steps = _steps(summaries[0])
        central = centrals.get(epochs)
        reference = references.get(summaries[0]["algorithm"])
        rows[name] = {
            "seeds": len(summaries),
            "epochs_per_case": epochs,
            "sequential_steps": steps,
            "dice_mean": _interval(matrix),
            "to_central_same_epochs": _paired(matrix, central)
            if central is not None and central is not matrix
            else None,
            "to_matrix_run": _paired(matrix, reference) if name in VARIANTS and reference is not None else None,
            "privacy": [s["privacy"] for s in summaries],
            "wall_time_s": round(sum(s["wall_time"] for s in summaries) / len(summaries)),
        }
    return {"date": datetime.date.today().isoformat(), "machine": bench.machine(), "runs": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("run", "table"))
    parser.add_argument("--bench", type=Path, required=True, help="a full-profile benchmark folder")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0 .. N-1 of each variant (and of the references)")
    args = parser.parse_args()
    bench_dir = args.bench.resolve()
    if args.command == "run":
        for seed in range(args.seeds):
            for variant in args.variants:
                _run(bench_dir, variant, seed)
    print(json.dumps(table(bench_dir, args.seeds), indent=1))


if __name__ == "__main__":
    main()
