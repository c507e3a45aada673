"""The report's figures: learning curves, per-site bars and tumour overlays, drawn for print.

Sizes fit a two-column paper: curves and bars one column wide (3.5 in), overlays, which need six
panels side by side, the page's width (7.16 in); all at 300 dpi. Every series differs in line style,
marker or hatch as well as colour (the Okabe-Ito palette, safe for colour-blind readers), so the figures
still read when printed in grey.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import cycle
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

COLUMN_WIDTH = 3.5
PAGE_WIDTH = 7.16
DPI = 300
#: curves: global model's validation Dice above, local training loss below
CURVES_SIZE = (COLUMN_WIDTH, 4.2)
BARS_SIZE = (COLUMN_WIDTH, 2.6)
#: overlays: room for the row labels on the left, and for the titles and legend around the rows
OVERLAY_LABEL_WIDTH = 0.45
OVERLAY_MARGINS = 0.75

_COLOURS = ("#000000", "#E69F00", "#0072B2", "#009E73", "#D55E00", "#56B4E9", "#CC79A7", "#F0E442")
_LINES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_HATCHES = ("", "///", "...", "xxx", "\\\\\\", "---", "+++", "ooo")
#: overlay contours: one colour per region (bright on a dark MRI), truth solid, prediction dashed
REGION_COLOURS = {"WT": "#F0E442", "TC": "#56B4E9", "ET": "#D55E00"}
#: TC's border often runs along ET's: drawn wider underneath, it stays visible as a rim
_REGION_WIDTHS = {"WT": 0.8, "TC": 1.3, "ET": 0.6}
_TRUTH, _PRED = "-", (0, (2, 1.2))
#: z-scored MRI with the air outside the brain (exactly 0) shown black
_GREY = matplotlib.colormaps["gray"].with_extremes(bad="black")

_RC = {
    "font.size": 7,
    "axes.titlesize": 7,
    "axes.labelsize": 7,
    "legend.fontsize": 6,
    "xtick.labelsize": 6,
    "ytick.labelsize": 6,
    "lines.linewidth": 1.0,
    "lines.markersize": 3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "hatch.linewidth": 0.5,
}


def _styles() -> cycle:
    return cycle(
        {"color": c, "linestyle": ls, "marker": m} for c, ls, m in zip(_COLOURS, _LINES * 2, _MARKERS, strict=False)
    )


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_curves(curves: dict[str, dict[str, list[float]]], title: str, path: Path, shared: bool = True) -> Path:
    """Server side (the global model each site received at the start of the round, on its validation split)
    over client side (each site's local training loss), per round: does the federation converge, and does
    any site lag? Without ``shared`` weights (local-only training) each site scores its own model. Sequential
    jobs score the model after each pass instead (``pass_val_*``): a visit's own score is the previous site's
    model."""
    sequential = all("pass_val_dice_mean" in tags for tags in curves.values())
    scored_tag = "pass_val_dice_mean" if sequential else "val_dice_mean"
    with plt.rc_context(_RC):
        fig, (top, bottom) = plt.subplots(2, 1, figsize=CURVES_SIZE, sharex=True, layout="constrained")
        for (site, tags), style in zip(sorted(curves.items()), _styles(), strict=False):
            for ax, tag in ((top, scored_tag), (bottom, "train_loss")):
                values = tags.get(tag, [])
                every = max(1, len(values) // 8)
                ax.plot(range(len(values)), values, label=site, markevery=every, **style)
        top.set_ylabel("Validation Dice\n(mean of WT, TC, ET)")
        top.set_ylim(0, 1)
        scored = "model after each pass" if sequential else "global model" if shared else "each site's own model"
        top.set_title(f"{title}\n(a) server side: {scored} on validation splits", loc="left")
        bottom.set_ylabel("Training loss (Dice loss)")
        bottom.set_xlabel("Pass (one visit to every site)" if sequential else "Round")
        bottom.set_title("(b) client side: local training at each site", loc="left")
        bottom.xaxis.get_major_locator().set_params(integer=True)
        for ax in (top, bottom):
            ax.grid(alpha=0.3, linewidth=0.5)
        top.legend(title="site", ncols=min(4, max(1, len(curves))), frameon=False)
        return _save(fig, path)


@dataclass
class BarSeries:
    """One run's (or one run's global model's) value per group (site or ``pooled``)."""

    label: str
    values: dict[str, float]


def plot_site_bars(series: Sequence[BarSeries], ylabel: str, path: Path) -> Path:
    """Grouped bars, a group per site and one for the pooled test set, a bar per series: where do runs and
    their global and personalised models differ, and which site loses?"""
    groups = sorted({g for s in series for g in s.values if g != "pooled"}) + ["pooled"]
    width = 0.8 / max(1, len(series))
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=BARS_SIZE, layout="constrained")
        for i, (s, colour, hatch) in enumerate(zip(series, cycle(_COLOURS[1:]), cycle(_HATCHES), strict=False)):
            xs = [g for g, name in enumerate(groups) if name in s.values]
            heights = [s.values[groups[g]] for g in xs]
            offset = (i - (len(series) - 1) / 2) * width
            label = textwrap.fill(s.label, 48, subsequent_indent="  ")
            ax.bar([x + offset for x in xs], heights, width, label=label, color=colour, hatch=hatch,
                   edgecolor="black", linewidth=0.5)  # fmt: skip
        ax.set_xticks(range(len(groups)), groups)
        ax.set_ylim(0, 1)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("Test split")
        ax.grid(axis="y", alpha=0.3, linewidth=0.5)
        ncols = 2 if max(len(s.label) for s in series) <= 24 else 1
        fig.legend(loc="outside upper center", ncols=ncols, frameon=False)
        return _save(fig, path)


@dataclass
class OverlayRow:
    """One run's prediction for the case: region masks (X, Y, Z) and the case's Dice per region."""

    label: str
    regions: dict[str, np.ndarray]
    dice: dict[str, float]


VIEWS = ("axial", "coronal", "sagittal")


def tumour_slices(wt: np.ndarray) -> tuple[int, int, int]:
    """Per axis, the slice with the most tumour: where a reader sees the most of it."""
    if not wt.any():
        return tuple(s // 2 for s in wt.shape)
    return tuple(int(wt.sum(axis=tuple(a for a in range(3) if a != axis)).argmax()) for axis in range(3))


def _cut(volume: np.ndarray, view: str, at: tuple[int, int, int]) -> np.ndarray:
    """A 2D slice, transposed so that ``imshow(origin="lower")`` shows it upright."""
    x, y, z = at
    return {"axial": volume[:, :, z], "coronal": volume[:, y, :], "sagittal": volume[x, :, :]}[view].T


def _window(volume: np.ndarray) -> tuple[float, float]:
    inside = volume[volume != 0]
    return tuple(np.percentile(inside, (1, 99))) if inside.size else (0.0, 1.0)


def _zoom(mask: np.ndarray, pad: int = 10, least: int = 48) -> tuple[slice, slice]:
    """The box around ``mask``'s voxels, ``pad`` wider on every side and at least ``least`` voxels across
    (within the slice): the tumour fills the panel, and nearby false positives stay in view."""
    if not mask.any():
        return slice(None), slice(None)
    box = []
    for axis, size in enumerate(mask.shape):
        found = np.nonzero(mask.any(axis=1 - axis))[0]
        lo, hi = found.min() - pad, found.max() + pad + 1
        grow = max(0, min(least, size) - (hi - lo))
        lo, hi = lo - grow // 2, hi + grow - grow // 2
        shift = max(0, -lo) - max(0, hi - size)
        box.append(slice(max(lo + shift, 0), min(hi + shift, size)))
    return box[0], box[1]


def plot_overlay(
    case_id: str,
    images: dict[str, np.ndarray],
    truth: dict[str, np.ndarray],
    rows: Sequence[OverlayRow],
    path: Path,
) -> Path:
    """Axial, coronal and sagittal slices through the tumour, T1ce and FLAIR underneath, a row per run:
    true regions drawn solid, predicted ones dashed, WT, TC and ET in their own colours. Each view is
    zoomed to the true and every predicted whole tumour in that slice."""
    at = tumour_slices(truth["WT"])
    columns = [(view, modality) for view in VIEWS for modality in ("t1ce", "flair")]
    windows = {m: _window(images[m]) for m in ("t1ce", "flair")}
    shown = truth["WT"] | np.logical_or.reduce([row.regions["WT"] for row in rows])
    crops = {view: _zoom(_cut(shown, view, at)) for view in VIEWS}
    shapes = [_cut(shown, view, at)[crops[view]].shape for view in VIEWS]
    panel = 0.92 * (PAGE_WIDTH - OVERLAY_LABEL_WIDTH) / len(columns)
    height = OVERLAY_MARGINS + len(rows) * panel * max(h / w for h, w in shapes)
    with plt.rc_context(_RC):
        fig, axes = plt.subplots(len(rows), len(columns), figsize=(PAGE_WIDTH, height), squeeze=False,
                                 layout="constrained")  # fmt: skip
        for r, row in enumerate(rows):
            for c, (view, modality) in enumerate(columns):
                ax = axes[r, c]
                crop = crops[view]
                lo, hi = windows[modality]
                picture = _cut(images[modality], view, at)[crop]
                ax.imshow(np.ma.masked_equal(picture, 0), cmap=_GREY, vmin=lo, vmax=hi, origin="lower")
                for region, colour in REGION_COLOURS.items():
                    for masks, style in ((truth, _TRUTH), (row.regions, _PRED)):
                        mask = _cut(masks[region], view, at)[crop]
                        if mask.any() and not mask.all():
                            ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linestyles=[style],
                                       linewidths=_REGION_WIDTHS[region])  # fmt: skip
                ax.set_xticks([])
                ax.set_yticks([])
                ax.spines[:].set_visible(False)
                if r == 0:
                    ax.set_title(f"{view} {'T1ce' if modality == 't1ce' else 'FLAIR'}")
            dice = " / ".join(f"{row.dice[k]:.2f}" for k in REGION_COLOURS)
            axes[r, 0].set_ylabel(f"{row.label}\nDice WT/TC/ET\n{dice}", fontsize=6)
        handles = [Line2D([], [], color=c, linestyle="-", label=k) for k, c in REGION_COLOURS.items()]
        handles += [Line2D([], [], color="black", linestyle=_TRUTH, label="truth"),
                    Line2D([], [], color="black", linestyle=_PRED, label="prediction")]  # fmt: skip
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
        title = f"{case_id}: slices through the tumour's largest cross-sections, zoomed to tumour and predictions"
        fig.suptitle(title, fontsize=7)
        return _save(fig, path)


def plot_band_curves(
    series: dict[str, list[list[float]]],
    title: str,
    path: Path,
    ylabel: str = "Validation Dice\n(mean over sites)",
    top: float = 1.0,
    x_per_round: dict[str, float] | None = None,
    xlabel: str = "Round (pass, for cyclic and SWT)",
) -> Path:
    """A score per round (by default validation Dice), one line per algorithm in the order given: the mean over
    seeds, and a band from the lowest to the highest seed (with a handful of seeds a range says more than a CI computed
    from them). Each seed's curve is already the mean over sites; seeds that ran fewer rounds end the band early. A
    page wide: up to 18 algorithms, each its own combination of colour, line style and marker, the legend beside the
    axes. The y axis runs from 0 to ``top``. ``x_per_round``: the x axis is round times each algorithm's own value
    (bytes per round, say) instead of the round; an algorithm it leaves out is not drawn."""
    with plt.rc_context(_RC):
        fig, ax = plt.subplots(figsize=(PAGE_WIDTH, 3.2), layout="constrained")
        for i, (label, curves) in enumerate(series.items()):
            if x_per_round is not None and label not in x_per_round:
                continue
            style = {"color": _COLOURS[i % len(_COLOURS)], "linestyle": _LINES[(i // len(_COLOURS)) % len(_LINES)],
                     "marker": _MARKERS[(i + i // len(_COLOURS)) % len(_MARKERS)]}  # fmt: skip
            longest = max((len(c) for c in curves), default=0)
            if not longest:
                continue
            table = np.full((len(curves), longest), np.nan)
            for k, curve in enumerate(curves):
                table[k, : len(curve)] = curve
            rounds = np.arange(longest) * (1.0 if x_per_round is None else x_per_round[label])
            ax.plot(rounds, np.nanmean(table, axis=0), label=label, markevery=max(1, longest // 8), **style)
            if len(curves) > 1:
                ax.fill_between(rounds, np.nanmin(table, axis=0), np.nanmax(table, axis=0), color=style["color"],
                                alpha=0.15, linewidth=0)  # fmt: skip
        ax.set_ylim(0, top)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, loc="left")
        if x_per_round is None:
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3, linewidth=0.5)
        fig.legend(loc="outside right upper", frameon=False)
        return _save(fig, path)
