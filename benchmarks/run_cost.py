"""What a run costs beyond training, per job family: ``brats-fl run`` of one job of each family, one at a time.

    python benchmarks/run_cost.py --site-config site_configs/simulation.json --out runs/cost \
        [--jobs brats_fedavg brats_cyclic ...] [--code OTHER_CHECKOUT] -- --spacing 2 --patch 40 40 40 --rounds 2

Each job runs as a user runs it, in a process of its own (``brats-fl run``, with the options after ``--``), and its
wall time is taken from that process's start to its end; the run's sites record when they were ready, trained and
done (``brats_fl.results.cost``), which splits the wall time into training and the fixed phases. ``--code`` runs the
``brats-fl`` of another checkout (its ``custom/`` first on the path), so the same table can be made for the code
before a change: a checkout whose sites recorded no phases gives the training and the fixed cost in all. Prints a
Markdown table and JSON for ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "custom"))

from brats_fl.results.benchmark import machine  # noqa: E402
from brats_fl.results.cost import PHASES, run_cost  # noqa: E402

#: one job per family of the catalogue: the baselines, FedAvg and its variants by what they change, sequential
#: transfer and the hypernetwork
FAMILIES = {
    "central": "brats_central",
    "local": "brats_local",
    "FedAvg": "brats_fedavg",
    "kept layers (FedPer, FedBN)": "brats_fedbn",
    "fine-tuning": "brats_fedavg_ft",
    "FedOpt": "brats_fedadam",
    "FedProx": "brats_fedprox",
    "SCAFFOLD": "brats_scaffold",
    "Ditto": "brats_ditto",
    "sequential (cyclic, SWT)": "brats_cyclic",
    "HyperSeg": "brats_hyperseg_conv",
}


def run_one(job: str, options: list[str], site_config: Path, out: Path, code: Path | None) -> dict:
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(code) / "custom"), env.get("PYTHONPATH", "")])
    workspace = out / job
    command = [sys.executable, "-m", "brats_fl.cli.main", "run", job, "--site-config", str(site_config)]
    command += ["--workspace", str(workspace), *options]
    launched = time.time()
    with (out / f"{job}.log").open("w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=code or REPO)
    ended = time.time()
    if done.returncode:
        return {"job": job, "failed": done.returncode}
    summary = json.loads((workspace / job / "summary.json").read_text())
    return {"job": job, "cost": run_cost(workspace / job, launched, ended), "dice_mean": summary["test"]["dice_mean"]}


def table(rows: dict[str, dict]) -> str:
    columns = ["wall", "training", *PHASES, "fixed"]
    lines = ["| family (job) | " + " | ".join(c.replace("_", " ") for c in columns) + " | pooled Dice |"]
    lines.append("|---" * (len(columns) + 2) + "|")
    for family, row in rows.items():
        cost = row.get("cost") or {}
        cells = [f"{cost[c]:.1f}" if c in cost else "-" for c in columns]
        dice = f"{row['dice_mean']:.3f}" if "dice_mean" in row else f"failed ({row.get('failed')})"
        lines.append(f"| {family} (`{row['job']}`) | " + " | ".join(cells) + f" | {dice} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--site-config", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--jobs", nargs="+", default=None, help="default: one job per family (FAMILIES)")
    parser.add_argument("--code", type=Path, default=None, help="another checkout whose brats-fl runs the jobs")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="after --: the options of every brats-fl run")
    args = parser.parse_args()
    options = args.options[1:] if args.options[:1] == ["--"] else args.options
    families = {f: j for f, j in FAMILIES.items() if not args.jobs or j in args.jobs}
    args.out.mkdir(parents=True, exist_ok=True)
    site_config = args.site_config.resolve()
    rows = {}
    for family, job in families.items():
        rows[family] = run_one(job, options, site_config, args.out.resolve(), args.code)
        print(f"{family}: {rows[family]}", file=sys.stderr, flush=True)
    results = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python benchmarks/run_cost.py", *sys.argv[1:]]),
        "machine": machine(),
        "load_average_after": os.getloadavg(),
        "runs": rows,
    }
    print(table(rows))
    (args.out / "run_cost.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
