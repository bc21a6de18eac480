"""Gradient norms as lines and bars: over the steps (:func:`plot_norm_curves`), and per layer at one step, for one run
(:func:`plot_gradient_flow`) or for runs side by side (:func:`plot_flow_comparison`). Every axis is logarithmic."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator

from gradmon import tags
from gradmon.report.data import flagged_steps, layer_flags, layer_matrix, layer_norms
from gradmon.report.figures import (
    _TICK_FONT,
    _WIDTH,
    _caption_height,
    _depth_colours,
    _figure,
    _finite_positive,
    _flag_strip,
    _flag_style,
    _integer_steps,
    _strip_height,
    _thin,
    _titles,
)
from gradmon.report.labels import (
    ShortNames,
    _flag_caption,
    _order_caption,
    _rerun_caption,
    _thin_caption,
    short_names,
)
from gradmon.report.runs import Run, Series

#: Curves drawn one line per layer up to this many layers; beyond it, percentile bands and a few picked layers.
MAX_CURVES = 10


def plot_norm_curves(run: Run) -> Figure:
    """Gradient norm over the steps on a log axis.

    Up to :data:`MAX_CURVES` layers, one line each; beyond, the range and the 25-75 percentile band over all layers
    and their median, and lines for at most 6 layers: the first and the last, those with the smallest and the largest
    median norm and the largest peak, and the layers flagged most often. Steps GradHealthMonitor flagged are marked
    in a strip on top, and the flagged layers' points on their lines.

    Args:
        run: A run that logged gradient norms.

    Returns:
        The figure, on its own Agg canvas.
    """
    layers, steps, norms = layer_matrix(run, f"{tags.GRAD_NORM}/")
    names = short_names(layers)
    flags, per_layer = flagged_steps(run), layer_flags(run)
    log_norms = np.log10(_finite_positive(norms))
    picks, colours, chosen = _curve_picks(layers, names, log_norms, per_layer)
    caption = names.caption() + chosen + _flag_caption(flags, bool(per_layer), "points are marked")
    caption += _rerun_caption(run) + _order_caption(run) + _nonfinite_caption(steps, log_norms)

    strip_height = _strip_height(flags)
    fig = _figure(_WIDTH, 4.6 + strip_height + _caption_height(caption))
    grid = fig.add_gridspec(2, 1, height_ratios=[strip_height or 1e-3, 4.0])
    ax = fig.add_subplot(grid[1, 0])
    drawable = bool(np.isfinite(log_norms).any())
    marker = "o" if len(steps) <= 30 else None  # a line needs two points: one step shows as dots only
    if len(layers) > MAX_CURVES and drawable:
        _bands(ax, steps, log_norms, marker)
    in_legend: set[str] = set()
    for i, label in picks.items():
        series = run.scalars[tags.tag(tags.GRAD_NORM, layers[i])]
        values = _finite_positive(series.values)
        if not np.isfinite(values).any():
            continue  # nothing of it can be drawn: no line, and no legend entry for one
        ax.plot(series.steps, values, color=colours[i], label=label, marker=marker, markersize=3, zorder=3)
        _mark_flags(ax, series, per_layer.get(layers[i], {}), in_legend)
    _norm_axis(ax, steps, drawable)
    if strip_height:
        _flag_strip(fig.add_subplot(grid[0, 0], sharex=ax), flags)
    _titles(fig, f"{run.name}: gradient norm by layer", caption)
    return fig


def plot_gradient_flow(run: Run) -> Figure:
    """Each layer's last logged gradient norm as a bar, on a log axis.

    Args:
        run: A run that logged gradient norms.

    Returns:
        The figure, on its own Agg canvas.
    """
    step, norms = layer_norms(run, -1)
    return _flow_figure(
        f"{run.name}: gradient flow at step {step}", list(norms), [np.array(list(norms.values()))], None,
        _rerun_caption(run) + _order_caption(run),
    )


def plot_flow_comparison(runs: Sequence[Run], title: str) -> Figure:
    """Each run's gradient norm per layer at its first logged step, one line per run.

    The first step shows what the architecture and the initialisation do to the gradient before training has had a
    chance to change either, and it is finite even for a run that later diverges. Runs with different layers are
    drawn on the union of their layers (in the order of the run with most layers, the others' extra layers after).

    Args:
        runs: Runs that logged gradient norms, e.g. the variants of one experiment.
        title: What the runs have in common, e.g. their parent directory; the figure's title begins with it.

    Returns:
        The figure, on its own Agg canvas.
    """
    first = [layer_norms(run, 0) for run in runs]
    union: dict[str, None] = {}
    for _, norms in sorted(first, key=lambda f: -len(f[1])):
        union.update(dict.fromkeys(norms))
    layers = list(union)
    rows = [np.array([norms.get(layer, np.nan) for layer in layers]) for _, norms in first]
    labels = [f"{Path(run.name).name} (step {step})" for run, (step, _) in zip(runs, first)]
    return _flow_figure(f"{title}: gradient flow at the first logged step", layers, rows, labels, [])


def _curve_picks(
    layers: list[str], names: ShortNames, log_norms: np.ndarray, per_layer: dict[str, dict[str, np.ndarray]]
) -> tuple[dict[int, str], dict[int, object], list[str]]:
    """``(labels, colours, caption lines)`` of the layers drawn as lines, by row: all of them up to
    :data:`MAX_CURVES` layers, coloured by depth; else those :func:`_pick_layers` picks, labelled with their role."""
    if len(layers) <= MAX_CURVES:
        return {i: names.labels[i] for i in range(len(layers))}, dict(enumerate(_depth_colours(len(layers)))), []
    roles = _pick_layers(layers, log_norms, per_layer)
    colours = {i: colormaps["tab10"](k) for k, i in enumerate(roles)}
    picks = {i: f"{names.labels[i]} ({role})" for i, role in roles.items()}
    return picks, colours, [
        f"Grey: the range and the 25-75 percentile band of all {len(layers)} layers at each step, and their "
        f"median; lines: {len(picks)} of the layers, chosen as the legend says."
    ]


def _pick_layers(layers: list[str], log_norms: np.ndarray, per_layer: dict[str, dict[str, np.ndarray]]) -> dict:
    """``{index: role}`` of at most 6 layers to draw as lines, in depth order: the first and the last, those with
    the smallest and the largest median norm and the largest peak, then the layers flagged most often."""
    picks = {0: "input", len(layers) - 1: "output"}
    has = np.isfinite(log_norms).any(axis=1)
    if has.any():
        rows = log_norms[has]
        medians = np.full(len(layers), np.nan)
        peaks = np.full(len(layers), np.nan)
        medians[has], peaks[has] = np.nanmedian(rows, axis=1), np.nanmax(rows, axis=1)
        for role, score in (("smallest median", medians), ("largest median", -medians), ("largest peak", -peaks)):
            # NaN (a layer never finite) sorts last in argsort, so it is never picked for a role.
            choice = next((int(i) for i in np.argsort(score) if int(i) not in picks and has[i]), None)
            if choice is not None:
                picks[choice] = role
    index_of = {layer: i for i, layer in enumerate(layers)}
    counts = {index_of[layer]: sum(map(len, found.values())) for layer, found in per_layer.items() if layer in index_of}
    for index in sorted(counts, key=lambda i: -counts[i]):
        if len(picks) >= 6 or counts[index] == 0:
            break
        picks.setdefault(index, "most flagged")
    return dict(sorted(picks.items()))


def _bands(ax: Axes, steps: np.ndarray, log_norms: np.ndarray, marker: str | None) -> None:
    """The range and the 25-75 percentile band of all layers at each step, and their median."""
    columns = np.isfinite(log_norms).any(axis=0)
    x = steps[columns]
    q = 10 ** np.nanpercentile(log_norms[:, columns], [0, 25, 50, 75, 100], axis=0)
    ax.fill_between(x, q[0], q[4], color="0.88", label=f"range, all {len(log_norms)} layers")
    ax.fill_between(x, q[1], q[3], color="0.72", label="25-75 percentile")
    ax.plot(x, q[2], color="0.35", linestyle="--", linewidth=1.0, marker=marker, markersize=3, label="median")


def _mark_flags(ax: Axes, series: Series, flags: dict[str, np.ndarray], in_legend: set[str]) -> None:
    """Mark the points of one layer's line at the steps it was flagged; each condition in the legend once."""
    for condition, found in flags.items():
        at = np.isin(series.steps, found)
        y = _finite_positive(series.values[at])
        style = _flag_style(condition, len(y), condition not in in_legend)
        in_legend.add(condition)
        # A non-finite norm has no place on the axis: its flag sits on the bottom edge instead.
        bottom = np.isnan(y)
        ax.scatter(series.steps[at][~bottom], y[~bottom], zorder=2, gid=f"layer-flags-{condition}", **style)
        if bottom.any():
            style["label"] = "_nolegend_"
            ax.scatter(series.steps[at][bottom], np.zeros(bottom.sum()), clip_on=False, zorder=2,
                       transform=ax.get_xaxis_transform(), **style)


def _nonfinite_caption(steps: np.ndarray, log_norms: np.ndarray) -> list[str]:
    """A caption line when every layer's norm is non-finite (or zero) from some logged step to the end: the curves
    stop there, and the figure says so rather than leaving the reader an axis that ends early or is empty."""
    if len(steps) == 0:
        return []
    finite = np.isfinite(log_norms).any(axis=0)
    if finite.all():
        return []
    if not finite.any():
        return [f"Every gradient norm is non-finite or zero, at all {len(steps)} logged steps: nothing to draw."]
    last = int(np.flatnonzero(finite)[-1])
    if last == len(steps) - 1:
        return []
    gone = len(steps) - 1 - last
    return [f"Every gradient norm is non-finite or zero from step {int(steps[last + 1])} on ({gone} of {len(steps)} "
            f"logged steps): the curves end at step {int(steps[last])}."]


def _norm_axis(ax: Axes, steps: np.ndarray, drawable: bool) -> None:
    """The log axis of gradient norms (a note in its place when there is nothing to draw), and the legend, the flag
    marks last."""
    if drawable:
        ax.set_yscale("log")
    else:  # a log axis needs one positive value
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no finite, positive gradient norm to draw", transform=ax.transAxes, ha="center")
    ax.set(xlabel="step", ylabel="gradient norm (log scale)")
    ax.grid(True, which="major", alpha=0.4)
    ax.margins(x=0.01)
    _integer_steps(ax, steps)
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda k: labels[k].startswith("flagged "))  # the flags last
    ax.legend(
        [handles[k] for k in order], [labels[k] for k in order], title="layer", fontsize="x-small",
        title_fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0),
    )


def _flow_figure(
    title: str, layers: list[str], rows: list[np.ndarray], labels: list[str] | None, caption: list[str]
) -> Figure:
    """Gradient norm per layer: bars for one row (``labels`` None), lines with a legend for several."""
    names = short_names(layers)
    caption = names.caption() + caption
    n = len(layers)
    longest = max(len(label) for label in names.labels)
    # Rotated labels need the figure taller by their length; short ones (0, 2, ..., 32) stay level.
    level = longest <= 4 and n * (longest + 2) * _TICK_FONT * 0.6 <= (_WIDTH - 1.5) * 72
    label_height = 0.3 if level else 0.2 + longest * _TICK_FONT * 0.62 / 72
    shown = list(range(n)) if level else _thin(n, (_WIDTH - 1.5) * 72)
    caption += _thin_caption(shown, n)
    heights = [_finite_positive(row) for row in rows]
    if labels is None and (~np.isfinite(heights[0])).any():
        caption.append("Red x: a zero or non-finite norm (no bar on a log axis).")
    fig = _figure(_WIDTH, 3.4 + label_height + _caption_height(caption))
    ax = fig.subplots()
    if labels is None:
        _bars(ax, heights[0], rows[0], level)
    else:
        for row, label in zip(heights, labels):
            ax.plot(np.arange(n), row, marker="o", markersize=3 if n > 40 else 5, label=label)
        ax.legend(fontsize="small")
    _decades(ax, np.concatenate([h[np.isfinite(h)] for h in heights]))
    ax.set_xlim(-0.6, n - 0.4)
    ax.xaxis.set_major_locator(FixedLocator(shown))
    ax.set_xticklabels([names.labels[i] for i in shown], fontsize=_TICK_FONT, rotation=0 if level else 90)
    ax.set(xlabel="layer (input to output)", ylabel="gradient norm (log scale)")
    ax.grid(True, axis="y", which="major", alpha=0.4)
    _titles(fig, title, caption)
    return fig


def _bars(ax: Axes, heights: np.ndarray, norms: np.ndarray, level: bool) -> None:
    """One bar per layer, coloured by depth; a red x (and, while they fit, the value) where a norm has no bar."""
    n = len(heights)
    ax.bar(np.arange(n), np.nan_to_num(heights, nan=0.0), color=_depth_colours(n))
    missing = np.flatnonzero(~np.isfinite(heights))
    if len(missing):
        ax.plot(missing, np.full(len(missing), 0.03), "x", color="red", transform=ax.get_xaxis_transform())
        if len(missing) <= 20:  # the values themselves, while they fit
            for x in missing:
                ax.annotate(f"{norms[x]:g}", (x, 0.97), xycoords=("data", "axes fraction"), ha="center",
                            va="top", color="red", fontsize=_TICK_FONT, rotation=0 if level else 90)


def _decades(ax: Axes, finite: np.ndarray) -> None:
    """A log axis over whole decades, so that bar heights compare as orders of magnitude even when all are within
    one; no ticks when there is nothing to draw."""
    if finite.size:
        ax.set_yscale("log")
        low, high = np.floor(np.log10(finite.min())), np.ceil(np.log10(finite.max()))
        ax.set_ylim(10**low, 10 ** max(high, low + 1))
    else:  # nothing to draw, and a log axis needs one positive value
        ax.set_yticks([])
