"""Layer-by-step heatmaps: the log10 gradient norm of every layer (:func:`plot_heatmap`) and the activation
statistics of every module ActivationMonitor observed (:func:`plot_activation_heatmap`).

The input layer is on top, layers in the order they were first logged. Beyond :data:`MAX_HEATMAP_COLUMNS` logged
steps each column is the mean of a few consecutive ones; the figure grows with the layers up to 14 inches, and past
what fits only every k-th layer is labelled. Steps GradHealthMonitor flagged are marked in a strip on top, and the
cells of the layers it flagged are hatched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.collections import PatchCollection, QuadMesh
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FixedLocator

from gradmon import tags
from gradmon.health import CONDITIONS
from gradmon.report.data import flagged_steps, layer_flags, layer_matrix
from gradmon.report.figures import (
    _CONDITION_COLOURS,
    _MAX_HEIGHT,
    _TICK_FONT,
    _WIDTH,
    _caption_height,
    _figure,
    _flag_strip,
    _integer_steps,
    _strip_height,
    _thin,
    _titles,
)
from gradmon.report.labels import _flag_caption, _order_caption, _rerun_caption, _thin_caption, short_names
from gradmon.report.runs import Run

#: Heatmap columns beyond this are averaged in groups: a 1000-pixel-wide figure cannot show more.
MAX_HEATMAP_COLUMNS = 1000


@dataclass(frozen=True)
class ActivationHeatmap:
    """One activation heatmap: the statistics it shows (a module's row takes the first of ``metrics`` it logged),
    its title, colour-bar label, what grey means, and a fixed colour range (``None``: the values' own)."""

    metrics: tuple[str, ...]
    title: str
    label: str
    grey: str
    limits: tuple[float, float] | None = None


#: The activation heatmaps by file stem. ``gradmon report`` draws those of :data:`REPORT_ACTIVATION_HEATMAPS`; the
#: others are there for :func:`plot_activation_heatmap`.
ACTIVATION_HEATMAPS: dict[str, ActivationHeatmap] = {
    "activation_rms_heatmap": ActivationHeatmap(
        (tags.ACTIVATION_RMS_LOG10,), "log10 activation RMS by module", "log10 RMS",
        "Grey: not logged, or a zero or non-finite RMS.",
    ),
    "dead_or_saturated_heatmap": ActivationHeatmap(
        (tags.DEAD_FRACTION, tags.SATURATED_FRACTION), "dead or saturated fraction by module", "fraction",
        "Grey: not logged.", (0.0, 1.0),
    ),
    "activation_grad_rms_heatmap": ActivationHeatmap(
        (tags.ACTIVATION_GRAD_RMS_LOG10,), "log10 RMS of the gradient flowing into each module",
        "log10 gradient RMS", "Grey: not logged, or a zero or non-finite RMS.",
    ),
    "activation_slope_heatmap": ActivationHeatmap(
        (tags.ACTIVATION_SLOPE,), "mean slope by module (bounded activations)", "mean slope", "Grey: not logged.",
        (0.0, 1.0),
    ),
}
#: What ``gradmon report`` draws for a run ActivationMonitor watched, beside the gradient heatmap.
REPORT_ACTIVATION_HEATMAPS = ("activation_rms_heatmap", "dead_or_saturated_heatmap")
_FRACTION_WORDS = {
    tags.DEAD_FRACTION: "dead fraction (units zero for the whole batch) of the ReLU-like modules",
    tags.SATURATED_FRACTION: "saturated fraction (outputs where the slope is below 1% of its largest) of the "
    "bounded activations",
}


def plot_heatmap(run: Run) -> Figure:
    """Log10 gradient norm (``grad_norm_log10/<layer>``), layer by step, the input layer on top.

    Grey cells: not logged, or a zero or non-finite norm.

    Args:
        run: A run that logged gradient norms.

    Returns:
        The figure, on its own Agg canvas.
    """
    layers, steps, values = layer_matrix(run, rounds=True)
    return _heatmap(run, layers, steps, values, "log10 gradient norm by layer", "log10 gradient norm",
                    "Grey: not logged, or a zero or non-finite norm.", "layer (input at top)")


def has_activation_heatmap(run: Run, figure: str) -> bool:
    """Whether ``run`` logged what an activation heatmap shows.

    Args:
        run: The run.
        figure: A key of :data:`ACTIVATION_HEATMAPS`.

    Returns:
        Whether any of its statistics was logged.
    """
    return any(tag.split("/", 1)[0] in ACTIVATION_HEATMAPS[figure].metrics for tag in run.scalars)


def plot_activation_heatmap(run: Run, figure: str = "activation_rms_heatmap") -> Figure:
    """One of :data:`ACTIVATION_HEATMAPS`, module by step in forward order, the input side on top: the gradient
    heatmap's layout, readability rules and flag marks, over the modules ActivationMonitor observed.

    Args:
        run: A run ActivationMonitor watched.
        figure: A key of :data:`ACTIVATION_HEATMAPS`.

    Returns:
        The figure, on its own Agg canvas.
    """
    heatmap = ACTIVATION_HEATMAPS[figure]
    index = f"{tags.ACTIVATION_RMS}/"
    modules, steps, _ = layer_matrix(run, index, index, rounds=True)
    rows: dict[str, np.ndarray] = {}
    shown: list[str] = []
    for metric in heatmap.metrics:
        names, _, values = layer_matrix(run, f"{metric}/", index, rounds=True)
        if names:
            shown.append(metric)
        for name, row in zip(names, values):
            rows.setdefault(name, row)
    modules = [m for m in modules if m in rows]
    values = np.array([rows[m] for m in modules]).reshape(len(modules), len(steps))
    notes = ["Rows: the " + "; the ".join(_FRACTION_WORDS[m] for m in shown) + "."] if len(heatmap.metrics) > 1 else []
    return _heatmap(run, modules, steps, values, heatmap.title, heatmap.label, heatmap.grey, "module (input at top)",
                    heatmap.limits, notes)


def _heatmap(
    run: Run,
    layers: list[str],
    steps: np.ndarray,
    values: np.ndarray,
    title: str,
    label: str,
    grey: str,
    ylabel: str,
    limits: tuple[float, float] | None = None,
    notes: Sequence[str] = (),
) -> Figure:
    """``values`` (layer by step) as coloured cells, the first layer on top; ``limits`` fixes the colour range,
    ``notes`` open the caption."""
    names = short_names(layers)
    caption = [*notes, *names.caption()]
    edges = _edges(steps)
    if len(steps) > MAX_HEATMAP_COLUMNS:
        edges, values, per_column = _bin_columns(edges, values, MAX_HEATMAP_COLUMNS)
        caption.append(f"Each column is the mean of up to {per_column} consecutive logged steps.")
    if np.isnan(values).any():
        caption.append(grey)
    flags, per_layer, flag_lines = _heatmap_flags(run, layers)
    caption += flag_lines
    strip_height = _strip_height(flags)
    main = min(max(0.2 * len(layers), 1.0), _MAX_HEIGHT - 1.2 - strip_height - _caption_height(caption) - 0.3)
    shown = _thin(len(layers), main * 72)
    caption += _thin_caption(shown, len(layers))
    caption += _rerun_caption(run) + _order_caption(run)

    fig = _figure(_WIDTH, 1.2 + strip_height + _caption_height(caption) + main)
    grid = fig.add_gridspec(2, 2, height_ratios=[strip_height or 1e-3, main], width_ratios=[40, 1])
    ax = fig.add_subplot(grid[1, 0])
    cax = fig.add_subplot(grid[1, 1])
    fig.colorbar(_cells(ax, edges, len(layers), values, limits), cax=cax, label=label)
    ax.set_xlim(edges[0], edges[-1])
    ax.set_ylim(len(layers), 0)  # the input layer on top, as the network is usually drawn
    ax.yaxis.set_major_locator(FixedLocator([i + 0.5 for i in shown]))
    ax.set_yticklabels([names.labels[i] for i in shown], fontsize=_TICK_FONT)
    ax.set(xlabel="step", ylabel=ylabel)
    _integer_steps(ax, steps)
    _hatch_flagged(ax, per_layer, layers, edges)
    if strip_height:
        _flag_strip(fig.add_subplot(grid[0, 0], sharex=ax), flags)
    _titles(fig, f"{run.name}: {title}", caption)
    return fig


def _heatmap_flags(
    run: Run, layers: list[str]
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, np.ndarray]], list[str]]:
    """``(steps flagged per condition, flags of the rows' layers, caption lines)``: a heatmap whose rows are not the
    flagged layers (the activation heatmaps) sends the reader to the gradient heatmap for them."""
    flags, per_layer = flagged_steps(run), layer_flags(run)
    rows = {layer: found for layer, found in per_layer.items() if layer in layers}
    if per_layer and not rows and any(len(steps) for steps in flags.values()):
        return flags, rows, ["Top strip: steps GradHealthMonitor flagged; the flagged layers are marked on the "
                             "gradient heatmap."]
    return flags, rows, _flag_caption(flags, bool(per_layer), "cells are hatched")


def _cells(ax: Axes, edges: np.ndarray, rows: int, values: np.ndarray, limits: tuple[float, float] | None) -> QuadMesh:
    """The coloured cells, grey where a value is missing; the colour range ``limits``, else the values' own."""
    cmap = colormaps["viridis"].with_extremes(bad="lightgrey")
    finite = values[np.isfinite(values)]
    low, high = limits or ((float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0))
    if high - low < 1e-9:  # one value: a colour scale needs a range
        low, high = low - 0.5, high + 0.5
    return ax.pcolormesh(edges, np.arange(rows + 1), np.ma.masked_invalid(values), cmap=cmap, vmin=low, vmax=high)


def _hatch_flagged(ax: Axes, per_layer: dict[str, dict[str, np.ndarray]], layers: list[str], edges: np.ndarray) -> None:
    """Hatch the cells of the flagged layers at the steps they were flagged, in each condition's colour."""
    for condition, cells in _flagged_cells(per_layer, layers, edges).items():
        ax.add_collection(
            PatchCollection(
                [Rectangle((edges[j0], i), edges[j1] - edges[j0], 1.0) for i, j0, j1 in cells],
                facecolor="none", edgecolor=_CONDITION_COLOURS[condition], hatch="////", linewidth=0.6,
                gid=f"layer-flags-{condition}",
            )
        )


def _flagged_cells(
    per_layer: dict[str, dict[str, np.ndarray]], layers: list[str], edges: np.ndarray
) -> dict[str, list[tuple[int, int, int]]]:
    """Per condition, the heatmap cells flagged as ``(row, first column, last column + 1)`` runs: one rectangle per
    run of consecutive flagged columns keeps a layer flagged for 100,000 steps to a handful of patches."""
    rows = {layer: i for i, layer in enumerate(layers)}
    columns = len(edges) - 1
    found: dict[str, list[tuple[int, int, int]]] = {}
    for layer, per_condition in per_layer.items():
        if layer not in rows:
            continue
        for condition, steps in per_condition.items():
            hit = np.zeros(columns + 2, dtype=bool)
            hit[1 + np.clip(np.searchsorted(edges, steps, side="right") - 1, 0, columns - 1)] = True
            change = np.flatnonzero(np.diff(hit.astype(np.int8)))
            found.setdefault(condition, []).extend(
                (rows[layer], int(a), int(b)) for a, b in zip(change[::2], change[1::2])
            )
    return {c: sorted(found[c]) for c in CONDITIONS if c in found}


def _edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges halfway between logged steps, so unevenly spaced steps get cells of their own width."""
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    middles = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[2 * steps[0] - middles[0]], middles, [2 * steps[-1] - middles[-1]]])


def _bin_columns(edges: np.ndarray, values: np.ndarray, columns: int) -> tuple[np.ndarray, np.ndarray, int]:
    """At most ``columns`` columns, each the mean of the finite values of ``every`` consecutive ones."""
    n, m = values.shape
    every = math.ceil(m / columns)
    bins = math.ceil(m / every)
    padded = np.full((n, bins * every), np.nan)
    padded[:, :m] = values
    padded = padded.reshape(n, bins, every)
    finite = np.isfinite(padded)
    sums, counts = np.where(finite, padded, 0.0).sum(axis=2), finite.sum(axis=2)
    means = np.divide(sums, counts, out=np.full(sums.shape, np.nan), where=counts > 0)
    return np.append(edges[0:m:every], edges[m]), means, every
