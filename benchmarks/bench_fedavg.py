"""FedAvg in FLARE's simulator against a plain PyTorch/MONAI loop doing the same work.

    python benchmarks/bench_fedavg.py [--rounds 10] [--local-epochs 1]

Both sides: 2 sites of the phantom cohort (one scanner each), the job's default U-Net and patch size,
and per round and site the same validation pass, the same optimizer steps, then the case-weighted average.
The plain loop runs the sites one after the other in one process with every core; FLARE runs them in
parallel, each with its share of the cores (``brats-fl run`` does the same).

Steady-state time is rounds 1..R-1, measured from the end of round 0 to the end of the last round, so that
both sides have their data cached; FLARE's fixed cost (start-up, first caching, shutdown, cross-site
evaluation) is reported separately. Prints JSON for docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch
from brats_fl.data.datalist import load_datalist
from brats_fl.data.layout import find_cases
from brats_fl.data.loading import eval_loader
from brats_fl.data.partition import assign_sites, write_datalists
from brats_fl.data.phantom import generate_cohort
from brats_fl.jobs.catalogue import JobParams
from brats_fl.jobs.simulate import run_simulation
from brats_fl.seg.trainer import TrainConfig, Trainer, make_train_loader

DATA = Path("data/bench/fedavg")
SITES = ("site-1", "site-2")


def _cohort() -> Path:
    """12 full-size phantom cases from 2 scanners, one site each, and the site configuration for FLARE."""
    root, lists, config = DATA / "cohort", DATA / "lists", DATA / "site_config.json"
    if not root.exists():
        generate_cohort(root, cases=12, sites=2, seed=1)
    if not lists.exists():
        write_datalists(root, assign_sites(find_cases(root), 2, "natural", attribute="scanner"), lists)
    config.write_text(json.dumps({"data_root": "cohort", "datalist_dir": "lists"}))
    return config


def bench_flare(params: JobParams, config: Path) -> dict:
    start = time.time()
    run = run_simulation("brats_fedavg", params, config, DATA / "workspace")
    wall = time.time() - start
    records = {site: run / site / "simulate_job" / "brats_fl" / "rounds.jsonl" for site in SITES}
    rows = {site: [json.loads(line) for line in path.read_text().splitlines()] for site, path in records.items()}
    round_end = [max(rows[s][r]["finished_at"] for s in SITES) for r in range(params.rounds)]
    steady = round_end[-1] - round_end[0]
    return {
        "wall_s": wall,
        "steady_s": steady,
        "fixed_s": wall - steady * params.rounds / (params.rounds - 1),
        "bytes_sent_per_site_per_round": rows["site-1"][-1]["bytes_sent"],
        "steps_per_site_per_round": rows["site-1"][-1]["steps"],
    }


def bench_plain(params: JobParams, config: Path) -> dict:
    """The same rounds without FLARE: per site validate, train, then average by number of training cases."""
    train_config = TrainConfig.from_dict(
        {
            "model": {"channels": list(params.channels), "strides": [2] * (len(params.channels) - 1)},
            "patch_size": params.patch_size,
            "recipe": params.recipe,
            "lr": params.lr,
            "momentum": params.momentum,
            "seed": params.seed,
        }
    )
    doc = json.loads(config.read_text())
    sites = []
    for name in SITES:
        datalist = load_datalist(DATA / doc["datalist_dir"] / f"{name}.json", DATA / doc["data_root"])
        trainer = Trainer(train_config)
        train = make_train_loader(datalist.items("training"), train_config)
        val = eval_loader(datalist.items("validation"))
        sites.append((trainer, train, val, len(datalist.items("training"))))
    for trainer, train, val, _ in sites:  # fill the caches, as FLARE's round 0 does
        trainer.evaluate(val)
        next(iter(train))
    global_state = sites[0][0].model.state_dict()
    total = sum(n for *_, n in sites)
    round_end = []
    for _ in range(params.rounds):
        states = []
        for trainer, train, val, n in sites:
            trainer.model.load_state_dict(global_state)
            trainer.evaluate(val)
            trainer.train_epochs(train, params.local_epochs)
            states.append((trainer.model.state_dict(), n))
        global_state = {k: sum(s[k].float() * n for s, n in states) / total for k in global_state}
        round_end.append(time.time())
    return {"steady_s": round_end[-1] - round_end[0], "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=1)
    args = parser.parse_args()
    params = JobParams(rounds=args.rounds, local_epochs=args.local_epochs, sites=len(SITES))
    config = _cohort()
    model_bytes = sum(t.numel() * t.element_size() for t in params.model().state_dict().values())
    flare = bench_flare(params, config)
    plain = bench_plain(params, config)
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "params": {k: v for k, v in vars(params).items() if k != "audit"},
        "model_bytes": model_bytes,
        "flare": flare,
        "plain": plain,
        "ratio_steady": flare["steady_s"] / plain["steady_s"],
    }
    print(json.dumps(results, indent=1, default=list))


if __name__ == "__main__":
    main()
