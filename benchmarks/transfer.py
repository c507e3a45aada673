"""Bytes on the wire per site and training round: float32 models against FLARE's float16 and 8-bit quantisation.

    python benchmarks/transfer.py [--rounds 1] [--modes none float16 blockwise8]
    python benchmarks/transfer.py --run runs/<job>-<time>/brats_fedavg   # a run made with --audit-transfer

Without ``--run``, runs one tiny FedAvg job per mode in FLARE's simulator (3 sites of a 9-case phantom cohort
on a small grid, the job's default model, 1 local epoch per round) with every site recording each message it
sends and receives (``audit_transfer``), and reports what the records say. Bytes are the payload: every
tensor and array of a message, quantisation state included; FLARE's own framing (headers, serialisation)
is not counted. A site's "received" is what arrived before FLARE's dequantiser restored it.

8 bits run through the jobs' quantisers, FLARE's own with a CPU path for ``blockwise8``
(``brats_fl.transfer.quantization``); FLARE's 4-bit types need CUDA. What quantisation costs in Dice takes full
runs: see docs/performance.md. Prints JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
from pathlib import Path

import torch
from brats_fl.data.layout import find_cases
from brats_fl.data.partition import assign_sites, write_datalists
from brats_fl.data.phantom import generate_cohort
from brats_fl.jobs.catalogue import JobParams
from brats_fl.jobs.simulate import run_simulation

REPO = Path(__file__).resolve().parents[1]
# absolute: write_datalists resolves its root, and case paths must lie below it
DATA = REPO / "data" / "bench" / "transfer"
#: FLARE's quantisation types that its filters run on CUDA only
ON_CUDA = ("float4", "normfloat4")


def _site_config() -> Path:
    """9 small phantom cases from 3 scanners, one site each, and the site configuration for FLARE."""
    root, lists, config = DATA / "cohort", DATA / "lists", DATA / "site_config.json"
    # test the files written last, so an interrupted run is redone rather than left half-made
    if not (root / "phantom.json").exists():
        generate_cohort(root, cases=9, sites=3, seed=1, shape=(96, 96, 64))
    if not (lists / "site-All.json").exists():
        write_datalists(root, assign_sites(find_cases(root), 3, "natural", attribute="scanner"), lists)
    config.write_text(json.dumps({"data_root": str(root), "datalist_dir": str(lists), "threads": 1}))
    return config


def traffic(run: Path) -> dict[str, dict[int, dict[str, int]]]:
    """Payload bytes each site sent and received per training round, from its manifests in the run folder."""
    per_site: dict[str, dict[int, dict[str, int]]] = {}
    for path in sorted(Path(run).glob("*/*/brats_fl/outgoing.jsonl")):
        site = path.parents[2].name
        rounds = per_site.setdefault(site, {})
        for direction, way in (("outgoing", "sent"), ("incoming", "received")):
            for line in (path.parent / f"{direction}.jsonl").read_text().splitlines():
                row = json.loads(line)
                if row["task"] == "train":
                    rounds.setdefault(row["round"], {})[way] = row["payload_bytes"]
    if not per_site:
        raise FileNotFoundError(f"{run}: no site manifests (<site>/<job id>/brats_fl/outgoing.jsonl); was the job "
                                "run with audit_transfer (brats-fl run --audit-transfer)?")  # fmt: skip
    return per_site


def summary(per_site: dict[str, dict[int, dict[str, int]]]) -> dict:
    """Mean bytes per site and round, each way, and the per-site, per-round table."""
    cells = [c for rounds in per_site.values() for c in rounds.values()]
    return {
        "sent_per_site_round": statistics.mean(c.get("sent", 0) for c in cells),
        "received_per_site_round": statistics.mean(c.get("received", 0) for c in cells),
        "per_site": per_site,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=None, help="report this finished run instead of running jobs")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--modes", nargs="+", default=["none", "float16", "blockwise8"])
    args = parser.parse_args()
    results: dict = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, torch {torch.__version__}",
    }
    if args.run:
        results["run"] = str(args.run)
        results |= summary(traffic(args.run))
        print(json.dumps(results, indent=1))
        return
    config = _site_config()
    params = JobParams(rounds=args.rounds, local_epochs=1, patch_size=(32, 32, 32), audit_transfer=True)
    results["model_bytes"] = sum(t.numel() * t.element_size() for t in params.model().state_dict().values())
    modes = {}
    for mode in args.modes:
        if mode in ON_CUDA and not torch.cuda.is_available():
            raise SystemExit(f"{mode}: FLARE's filter runs on CUDA only, and this machine has no GPU")
        run = run_simulation("brats_fedavg", JobParams(**{**vars(params), "quantize": mode}), config, DATA / mode)
        modes[mode] = summary(traffic(run))
    full = modes.get("none", {}).get("sent_per_site_round")
    for mode in modes.values():
        mode["sent_vs_float32"] = mode["sent_per_site_round"] / full if full else None
    results["modes"] = modes
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
