"""Result tables from metric dicts: what the commands print and what docs/results.md shows."""

from __future__ import annotations

from collections.abc import Sequence

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
