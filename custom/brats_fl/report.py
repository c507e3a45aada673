"""Result tables from metric dicts: what the commands print and what docs/results.md shows."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from brats_fl.algorithms.personal import RESULTS_FILE
from brats_fl.data.labels import DISPLAY_ORDER

_COLUMNS = [
    (f"{m}_{r}", f"{label} {r}")
    for m, label in (("dice", "Dice"), ("iou", "IoU"), ("hd95", "HD95"))
    for r in (*DISPLAY_ORDER, "mean")
]


def format_table(rows: Sequence[tuple[str, dict]], extra: Sequence[str] = ("val_loss",)) -> str:
    """A Markdown table: one row per (name, metrics); Dice/IoU/HD95 per region and mean, then ``extra``."""
    header = ["", *(label for _, label in _COLUMNS), *extra]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, metrics in rows:
        cells = [name]
        for key in [k for k, _ in _COLUMNS] + list(extra):
            value = metrics.get(key)
            cells.append("" if value is None else f"{value:.2f}" if key.startswith("hd95") else f"{value:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: cross-site evaluation's name for the last aggregated model
FINAL_GLOBAL = "SRV_FL_global_model.pt"


def find_server_run(folder: Path) -> Path:
    """The server's run folder of a finished job inside ``folder`` (simulator workspace or downloaded result)."""
    found = sorted(Path(folder).rglob("cross_site_val/cross_val_results.json"))
    if not found:
        raise FileNotFoundError(f"{folder}: no finished FLARE job (no cross_site_val/cross_val_results.json)")
    if len(found) > 1:
        names = [str(f.parents[1]) for f in found]
        raise ValueError(f"{folder}: holds {len(found)} finished jobs; name one of {names}")
    return found[0].parents[1]


def _pooled(per_site: dict[str, dict]) -> dict[str, float]:
    """Case-weighted means over sites (the same as pooling the test cases) and the worst site's mean Dice."""
    total = sum(m["cases"] for m in per_site.values())
    keys = [k for k in next(iter(per_site.values())) if k != "cases"]
    out = {k: sum(m[k] * m["cases"] for m in per_site.values()) / total for k in keys}
    worst = min(per_site, key=lambda s: per_site[s]["dice_mean"])
    return out | {"cases": float(total), "worst_site": worst, "worst_dice_mean": per_site[worst]["dice_mean"]}


def summarise_run(folder: Path) -> dict:
    """Test metrics of a finished job, pooled and per site, and its per-round curves and client figures.

    ``test`` scores the model each site ends with (the final global model combined with the site's
    personal layers and fine-tuning, if any) on that site's own test split; ``global_test`` scores the
    final global model with each site's personal layers but without fine-tuning (cross-site evaluation),
    given only where it differs, i.e. where sites fine-tuned.
    """
    run = find_server_run(folder)
    personalised = json.loads((run / RESULTS_FILE).read_text())
    cse = json.loads((run / "cross_site_val" / "cross_val_results.json").read_text())
    global_per_site = {s: cse[s][FINAL_GLOBAL] for s in sorted(cse) if FINAL_GLOBAL in cse[s]}
    curves = read_curves(run / "tb_events")
    last = {site: {tag: values[-1] for tag, values in tags.items()} for site, tags in curves.items()}
    # cross-site evaluation combines the global model with each site's personal layers too, so it differs
    # from the personalised scores only where sites fine-tuned, and means nothing where no weight was shared
    if not any(c["bytes_sent"] for c in last.values()) or global_per_site == personalised:
        global_per_site = {}
    return {
        "run": str(run),
        "job": json.loads((run / "meta.json").read_text())["name"],
        "test": _pooled(personalised),
        "test_per_site": dict(sorted(personalised.items())),
        "global_test": _pooled(global_per_site) if global_per_site else None,
        "global_test_per_site": global_per_site or None,
        "curves": curves,
        "client_train_loss": sum(c["train_loss"] for c in last.values()) / len(last) if last else None,
        "bytes_sent_per_round": max((c["bytes_sent"] for c in last.values()), default=None),
    }


def read_curves(tb_events: Path) -> dict[str, dict[str, list[float]]]:
    """Every site's scalars per round, as FLARE's tracking delivered them to the server (``tb_events/<site>``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves = {}
    for folder in sorted(p for p in Path(tb_events).glob("*") if p.is_dir()):
        events = EventAccumulator(str(folder))
        events.Reload()
        curves[folder.name] = {
            tag: [e.value for e in sorted(events.Scalars(tag), key=lambda e: e.step)]
            for tag in events.Tags()["scalars"]
        }
    return curves
