"""What rounding a trained model for the wire costs in Dice, without the noise of a second training run.

    python benchmarks/quantization_dice.py runs/results/wire_none [--modes float16 blockwise8]

For a finished FedAvg run, every site's final model (the final global model) is sent once through the jobs'
quantiser and dequantiser (FLARE's filters, ``brats_fl.transfer.quantization``) and scored on that site's test
split next to the model as it was. This isolates the rounding: a whole run with quantised transfer also changes
every later round's training, and the Dice of two runs that differ only by rounding noise (float32 summation
order) already differ by a few hundredths on the phantom's 6 test cases (docs/performance.md). Prints JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch
from brats_fl.data.datalist import load_datalist
from brats_fl.data.loading import eval_loader
from brats_fl.seg.trainer import TrainConfig, Trainer, load_model
from brats_fl.transfer.quantization import Dequantizer, Quantizer
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_context import FLContext


def round_trip(state: dict[str, torch.Tensor], mode: str) -> dict[str, torch.Tensor]:
    """The weights as they arrive after the jobs' quantiser and dequantiser."""
    message = DXO(DataKind.WEIGHTS, data={k: v.clone() for k, v in state.items()}).to_shareable()
    arrived = Dequantizer().process(Quantizer(mode).process(message, FLContext()), FLContext())
    return {k: torch.as_tensor(v) for k, v in from_shareable(arrived).data.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished brats-fl run of brats_fedavg")
    parser.add_argument("--modes", nargs="+", default=["float16", "blockwise8"])
    args = parser.parse_args()
    records = sorted(args.run.glob("**/site-*/simulate_job/brats_fl/site.json"))
    if not records:
        raise SystemExit(f"{args.run}: no site records (site-*/simulate_job/brats_fl/site.json)")
    per_case: dict[str, list[float]] = {}
    for record in records:
        doc = json.loads(record.read_text())
        datalist = load_datalist(Path(doc["data"]["datalist"]), Path(doc["data"]["data_root"]))
        model = load_model(record.parent / "personalised_model.pt")
        original = {k: v.clone() for k, v in model.state_dict().items()}
        trainer = Trainer(TrainConfig.from_dict({**doc["train"], "model": model.config()}), model=model)
        for mode in ["float32", *args.modes]:
            model.load_state_dict(original if mode == "float32" else round_trip(original, mode))
            rows = trainer.evaluate(eval_loader(datalist.items("test")), per_case=True)["per_case"]
            # the mean over the regions, as docs/history.md's "Dice mean"
            per_case.setdefault(mode, []).extend((r["dice_WT"] + r["dice_TC"] + r["dice_ET"]) / 3 for r in rows)
    reference = per_case["float32"]
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, torch {torch.__version__}",
        "run": str(args.run),
        "cases": len(reference),
        "modes": {
            mode: {
                "dice_mean": sum(scores) / len(scores),
                "change": sum(scores) / len(scores) - sum(reference) / len(reference),
                "largest_case_change": max(abs(a - b) for a, b in zip(scores, reference, strict=True)),
            }
            for mode, scores in per_case.items()
        },
    }
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
