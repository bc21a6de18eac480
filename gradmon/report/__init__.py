"""Figures and a markdown summary from the TensorBoard event files gradmon's callbacks write, without a server.

A run is a directory holding event files. When a directory holds several (a second run, or a rerun of the same
config, logged into the same ``version``), only the latest is read: the file whose first event has the latest wall
time (then the latest name). Reading them all would draw two runs as one, their steps and layers merged;
``summary.md`` has a line for every such directory naming the file read and the files ignored.

Written into ``out``, for every run under the log directory that logged gradient norms (``grad_norm/<layer>``):

- ``<run>/grad_norm_heatmap.png``: log10 gradient norm (``grad_norm_log10/<layer>``), layer by step, the input layer
  on top, layers in the order they were first logged (the model's registration order). Grey: not logged, or a zero
  or non-finite norm. Beyond 1,000 logged steps each column is the mean of a few consecutive logged steps.
- ``<run>/grad_norm_curves.png``: gradient norm over the steps on a log axis. Up to 10 layers, one line each; beyond,
  the range and the 25-75 percentile band over all layers and their median, and lines for at most 6 layers: the
  first and the last, those with the smallest and the largest median norm and the largest peak, and the layers
  flagged most often.
- ``<run>/gradient_flow.png``: each layer's last logged gradient norm as a bar, on a log axis.
- ``<parent>/gradient_flow_comparison.png``: the gradient flow at the first logged step of all runs sharing a parent
  directory, overlaid (on the union of their layers), which for ``runs/<experiment>/<variant>`` compares the
  variants of one experiment.
- ``<run>/activation_rms_heatmap.png`` and ``<run>/dead_or_saturated_heatmap.png``, for a run ActivationMonitor
  watched: log10 RMS of every observed module's output (``activation_rms_log10/<module>``, the forward signal), and
  the dead fraction of its ReLU-like modules and saturated fraction of its bounded ones (sigmoid, tanh, ...) on a
  fixed 0-1 scale; module by step, the input side on top. :func:`plot_activation_heatmap` also draws the backward
  signal (``activation_grad_rms_log10``) and the mean slope. The gradient heatmap's layout and readability rules;
  the strip of flagged steps on top, and the flagged layers' cells hatched where a row is a flagged layer.
- ``summary.md``: one row per run that logged gradmon scalars: last monitored step; the last value of the metric
  (the ``metric`` tag; by default the shortest tag like ``val*acc*``, case-insensitive, e.g. ``val/acc``,
  ``val_acc``, ``valid/accuracy``; no column when no run has one); per condition, the steps GradHealthMonitor
  flagged and the first (``grad_health/*``); skipped steps; the gradient check's worst relative error
  (``gradcheck/max_rel_error``); the causes ActivationMonitor's diagnosis named. Then a Diagnosis section with each
  run's findings as ActivationMonitor wrote them (``diagnosis/<condition>`` text: the latest finding of each
  condition, and the step it cleared if it did), the notes (event files ignored, a ``metric`` no run logged) and
  links to the figures.

Every figure stays readable from 1 to 200 layers and from 1 to 100,000 steps: steps are ticked on whole numbers;
layer labels drop the prefix all layers share, and a label longer than 28 characters gets its middle pieces
abbreviated (``transformer.encoder.layers.0.linear1`` to ``t.e.l.0.linear1``), each figure's caption saying what
was dropped and what the abbreviations stand for; the heatmap grows with the layers up to 14 inches, and past what
fits only every k-th layer is labelled (the caption says so).

Where GradHealthMonitor flagged (``grad_health/<condition>`` > 0 at a step), a strip above the heatmap and the
curves marks the steps, one row per condition; the caption says when it flagged nothing. A run that also logged
``grad_health_flag/<layer>`` (1 vanishing, 2 exploding, 3 non-finite, at each step the layer was flagged) gets the
flagged cells hatched on the heatmap and the flagged points marked on the curves.

Reading and plotting use matplotlib's object API (no pyplot, no global backend), and this module never imports
Lightning, so it works on logs from any loop that writes the same tags::

    from gradmon.report import write_report
    write_report("runs", "runs/report", metric="val/acc", note=print)
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PatchCollection
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator

from gradmon import tags
from gradmon._validation import invalid
from gradmon.diagnosis import CLEARED
from gradmon.health import CONDITIONS
from gradmon.report.data import (  # noqa: F401
    DEFAULT_METRIC_PATTERN,
    FLAG_PREFIX,
    HealthSummary,
    find_metric,
    flagged_steps,
    health_summary,
    layer_flags,
    layer_matrix,
    layer_norms,
)
from gradmon.report.labels import (  # noqa: F401
    MAX_LABEL_CHARS,
    ShortNames,
    _flag_caption,
    _rerun_caption,
    _thin_caption,
    short_names,
)
from gradmon.report.runs import (  # noqa: F401
    _GRADMON_GROUPS,
    EVENT_FILE_GLOB,
    Run,
    Series,
    event_files,
    find_runs,
    load_run,
    load_runs,
)
from gradmon.tensorboard import markdown_table

#: Curves drawn one line per layer up to this many layers; beyond it, percentile bands and a few picked layers.
MAX_CURVES = 10
#: Heatmap columns beyond this are averaged in groups: a 1000-pixel-wide figure cannot show more.
MAX_HEATMAP_COLUMNS = 1000

_CONDITION_LABELS = {"vanishing": "vanishing", "exploding": "exploding", "nonfinite": "non-finite"}
# Okabe-Ito colours: told apart by colour-blind readers, and visible on white as well as on viridis (white edges).
_CONDITION_COLOURS = {"vanishing": "#56b4e9", "exploding": "#d55e00", "nonfinite": "#000000"}
_CONDITION_MARKERS = {"vanishing": "v", "exploding": "^", "nonfinite": "X"}
_DPI = 100
_WIDTH = 10.0  # inches
_MAX_HEIGHT = 14.0  # inches: taller than a screen is not read
_TICK_FONT = 8.0  # points
_CAPTION_FONT = 8.0  # points


def rerun_note(run: Run) -> str | None:
    """What the report says about a run directory holding several event files, or ``None`` when it holds one."""
    if not run.ignored_event_files or run.event_file is None:
        return None
    ignored = ", ".join(f"`{p.name}`" for p in run.ignored_event_files)
    count = len(run.ignored_event_files) + 1
    return (
        f"`{run.name}` holds {count} event files (another run was logged into the same directory, e.g. a rerun "
        f"with the same version); reported only the latest, `{run.event_file.name}`; ignored: {ignored}."
    )


def plot_heatmap(run: Run) -> Figure:
    """Log10 gradient norm, layer by step, the input layer on top; see the module docstring."""
    layers, steps, values = layer_matrix(run)
    return _heatmap(run, layers, steps, values, "log10 gradient norm by layer", "log10 gradient norm",
                    "Grey: not logged, or a zero or non-finite norm.", "layer (input at top)")


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


def has_activation_heatmap(run: Run, figure: str) -> bool:
    """Whether ``run`` logged what the activation heatmap ``figure`` shows."""
    return any(tag.split("/", 1)[0] in ACTIVATION_HEATMAPS[figure].metrics for tag in run.scalars)


def plot_activation_heatmap(run: Run, figure: str = "activation_rms_heatmap") -> Figure:
    """One of :data:`ACTIVATION_HEATMAPS`, module by step in forward order, the input side on top: the gradient
    heatmap's layout, readability rules and flag marks, over the modules ActivationMonitor observed."""
    heatmap = ACTIVATION_HEATMAPS[figure]
    index = f"{tags.ACTIVATION_RMS}/"
    modules, steps, _ = layer_matrix(run, index, index)
    rows: dict[str, np.ndarray] = {}
    shown: list[str] = []
    for metric in heatmap.metrics:
        names, _, values = layer_matrix(run, f"{metric}/", index)
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
    flags, per_layer = flagged_steps(run), layer_flags(run)
    rows = {layer: found for layer, found in per_layer.items() if layer in layers}
    if per_layer and not rows and any(len(steps) for steps in flags.values()):
        caption.append("Top strip: steps GradHealthMonitor flagged; the flagged layers are marked on the gradient "
                       "heatmap.")
    else:
        caption += _flag_caption(flags, bool(per_layer), "cells are hatched")
    per_layer = rows
    strip_height = _strip_height(flags)
    main = min(max(0.2 * len(layers), 1.0), _MAX_HEIGHT - 1.2 - strip_height - _caption_height(caption) - 0.3)
    shown = _thin(len(layers), main * 72)
    caption += _thin_caption(shown, len(layers))
    caption += _rerun_caption(run)

    fig = _figure(_WIDTH, 1.2 + strip_height + _caption_height(caption) + main)
    grid = fig.add_gridspec(2, 2, height_ratios=[strip_height or 1e-3, main], width_ratios=[40, 1])
    ax = fig.add_subplot(grid[1, 0])
    cax = fig.add_subplot(grid[1, 1])
    cmap = colormaps["viridis"].with_extremes(bad="lightgrey")
    finite = values[np.isfinite(values)]
    low, high = limits or ((float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0))
    if high - low < 1e-9:  # one value: a colour scale needs a range
        low, high = low - 0.5, high + 0.5
    mesh = ax.pcolormesh(
        edges, np.arange(len(layers) + 1), np.ma.masked_invalid(values), cmap=cmap, vmin=low, vmax=high
    )
    fig.colorbar(mesh, cax=cax, label=label)
    ax.set_xlim(edges[0], edges[-1])
    ax.set_ylim(len(layers), 0)  # the input layer on top, as the network is usually drawn
    ax.yaxis.set_major_locator(FixedLocator([i + 0.5 for i in shown]))
    ax.set_yticklabels([names.labels[i] for i in shown], fontsize=_TICK_FONT)
    ax.set(xlabel="step", ylabel=ylabel)
    _integer_steps(ax, steps)
    for condition, cells in _flagged_cells(per_layer, layers, edges).items():
        ax.add_collection(
            PatchCollection(
                [Rectangle((edges[j0], i), edges[j1] - edges[j0], 1.0) for i, j0, j1 in cells],
                facecolor="none", edgecolor=_CONDITION_COLOURS[condition], hatch="////", linewidth=0.6,
                gid=f"layer-flags-{condition}",
            )
        )
    if strip_height:
        _flag_strip(fig.add_subplot(grid[0, 0], sharex=ax), flags)
    _titles(fig, f"{run.name}: {title}", caption)
    return fig


def plot_norm_curves(run: Run) -> Figure:
    """Gradient norm over the steps on a log axis: every layer up to :data:`MAX_CURVES`, else percentile bands and
    a few picked layers; see the module docstring."""
    layers, steps, norms = layer_matrix(run, f"{tags.GRAD_NORM}/")
    names = short_names(layers)
    caption = names.caption()
    flags, per_layer = flagged_steps(run), layer_flags(run)
    log_norms = np.log10(_finite_positive(norms))
    if len(layers) <= MAX_CURVES:
        picks = {i: names.labels[i] for i in range(len(layers))}
        colours = dict(enumerate(_depth_colours(len(layers))))
    else:
        roles = _pick_layers(layers, log_norms, per_layer)
        colours = {i: colormaps["tab10"](k) for k, i in enumerate(roles)}
        picks = {i: f"{names.labels[i]} ({role})" for i, role in roles.items()}
        caption.append(
            f"Grey: the range and the 25-75 percentile band of all {len(layers)} layers at each step, and their "
            f"median; lines: {len(picks)} of the layers, chosen as the legend says."
        )
    caption += _flag_caption(flags, bool(per_layer), "points are marked")
    caption += _rerun_caption(run)

    strip_height = _strip_height(flags)
    fig = _figure(_WIDTH, 4.6 + strip_height + _caption_height(caption))
    grid = fig.add_gridspec(2, 1, height_ratios=[strip_height or 1e-3, 4.0])
    ax = fig.add_subplot(grid[1, 0])
    drawable = np.isfinite(log_norms).any()
    marker = "o" if len(steps) <= 30 else None  # a line needs two points: one step shows as dots only
    if len(layers) > MAX_CURVES and drawable:
        columns = np.isfinite(log_norms).any(axis=0)
        x = steps[columns]
        q = 10 ** np.nanpercentile(log_norms[:, columns], [0, 25, 50, 75, 100], axis=0)
        ax.fill_between(x, q[0], q[4], color="0.88", label=f"range, all {len(layers)} layers")
        ax.fill_between(x, q[1], q[3], color="0.72", label="25-75 percentile")
        ax.plot(x, q[2], color="0.35", linestyle="--", linewidth=1.0, marker=marker, markersize=3, label="median")
    in_legend: set[str] = set()
    for i, label in picks.items():
        series = run.scalars[tags.tag(tags.GRAD_NORM, layers[i])]
        ax.plot(
            series.steps, _finite_positive(series.values), color=colours[i], label=label, marker=marker, markersize=3,
            zorder=3,
        )
        for condition, found in per_layer.get(layers[i], {}).items():
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
    if strip_height:
        _flag_strip(fig.add_subplot(grid[0, 0], sharex=ax), flags)
    _titles(fig, f"{run.name}: gradient norm by layer", caption)
    return fig


def plot_gradient_flow(run: Run) -> Figure:
    """Each layer's last logged gradient norm as a bar, on a log axis."""
    step, norms = layer_norms(run, -1)
    return _flow_figure(
        f"{run.name}: gradient flow at step {step}", list(norms), [np.array(list(norms.values()))], None,
        _rerun_caption(run),
    )


def plot_flow_comparison(runs: Sequence[Run], title: str) -> Figure:
    """Each run's gradient norm per layer at its first logged step, one line per run.

    The first step shows what the architecture and the initialisation do to the gradient before training has had a
    chance to change either, and it is finite even for a run that later diverges. Runs with different layers are
    drawn on the union of their layers (in the order of the run with most layers, the others' extra layers after).
    """
    first = [layer_norms(run, 0) for run in runs]
    union: dict[str, None] = {}
    for _, norms in sorted(first, key=lambda f: -len(f[1])):
        union.update(dict.fromkeys(norms))
    layers = list(union)
    rows = [np.array([norms.get(layer, np.nan) for layer in layers]) for _, norms in first]
    labels = [f"{Path(run.name).name} (step {step})" for run, (step, _) in zip(runs, first)]
    return _flow_figure(f"{title}: gradient flow at the first logged step", layers, rows, labels, [])


def summary_markdown(
    runs: Sequence[Run],
    figures: dict[str, list[Path]] | None = None,
    out: Path | None = None,
    metric: str | None = None,
) -> str:
    """A markdown report: one table row per run that logged gradmon scalars, the notes of :func:`report_notes`,
    then links to each run's figures. ``metric`` as in :func:`find_metric`."""
    monitored = [r for r in runs if any(t.split("/", 1)[0] in _GRADMON_GROUPS for t in r.scalars)]
    lines = ["# gradmon report", ""]
    if monitored:
        summaries = [health_summary(run, metric) for run in monitored]
        metrics_found = {s.metric for s in summaries if s.metric is not None}
        if metric is not None:
            metric_header = f"{metric} (last)"
        elif len(metrics_found) == 1:
            metric_header = f"{next(iter(metrics_found))} (last)"
        else:  # several tags matched in different runs: each cell names its own
            metric_header = "val accuracy (last)" if metrics_found else None
        header = ["run", "last monitored step"]
        header += [metric_header] if metric_header else []
        header += ["vanishing", "exploding", "non-finite", "skipped steps", "gradcheck max rel error"]
        scaled = any(s.amp_overflow_steps is not None for s in summaries)
        header += ["fp16 overflow steps (not flagged)"] if scaled else []
        diagnosed = any(run.modules or run.diagnosis() for run in monitored)
        header += ["diagnosis"] if diagnosed else []
        rows = []
        for run, s in zip(monitored, summaries):
            cells = [f"`{run.name}`", _cell(s.last_step)]
            if metric_header:
                value = _cell(s.metric_value, "{:.3f}")
                cells.append(f"{value} (`{s.metric}`)" if len(metrics_found) > 1 and s.metric else value)
            cells += [_flag_cell(s.flagged_steps[c], s.first_flagged[c], run, c) for c in CONDITIONS]
            cells += [_cell(s.skipped_steps), _cell(s.gradcheck_max_rel_error, "{:.3g}")]
            if scaled:
                cells.append(_cell(s.amp_overflow_steps))
            if diagnosed:
                cells.append(_diagnosis_cell(run))
            rows.append(cells)
        lines += [
            "Health columns: steps on which the monitor flagged at least one layer (first such step).",
            "",
            markdown_table(header, rows),
        ]
    others = [r.name for r in runs if r not in monitored]
    if others:
        lines += ["", "Runs without gradmon scalars: " + ", ".join(f"`{name}`" for name in others) + "."]
    lines += diagnosis_markdown(monitored)
    notes = report_notes(runs, metric)
    if notes:
        lines += ["", "## Notes", "", *(f"- {note}" for note in notes)]
    if figures:
        lines += ["", "## Figures", ""]
        for name, paths in figures.items():
            links = ", ".join(f"[{p.stem}]({p.relative_to(out).as_posix() if out else p.as_posix()})" for p in paths)
            lines.append(f"- `{name}`: {links}")
    return "\n".join(lines) + "\n"


def diagnosis_markdown(runs: Sequence[Run]) -> list[str]:
    """The Diagnosis section: per run ActivationMonitor watched, the latest finding of each condition as it wrote it
    (``diagnosis/<condition>``), with the step it cleared at when it did; "no finding" for a run without any."""
    watched = [run for run in runs if run.modules or run.diagnosis()]
    if not watched:
        return []
    lines = ["", "## Diagnosis", "", "What ActivationMonitor's diagnosis found in each run: the verdict (the root "
             "cause, `diagnosis/verdict` in TensorBoard's text tab), then the latest finding of each condition "
             "(`diagnosis/<condition>`).", ""]
    for run in watched:
        lines.append(f"### `{run.name}`")
        lines.append("")
        verdict = run.verdict()
        if verdict is not None:
            lines += [verdict.replace("  \n", "  \n  "), ""]
        found = _findings(run)
        if not found:
            lines += ["No finding.", ""]
        for text, cleared in found:
            item = text.replace("  \n", "  \n  ")
            lines.append(f"- {item}" + (f"  \n  No longer found from step {cleared}." if cleared is not None else ""))
        if found:
            lines.append("")
    return lines[:-1]


def _findings(run: Run) -> list[tuple[str, int | None]]:
    """Per condition, ``(latest finding's markdown, step it cleared at or None)``, by the step first found."""
    found = []
    for entries in run.diagnosis().values():
        findings = [(step, text) for step, text in entries if not text.endswith(CLEARED)]
        if not findings:
            continue
        last_step, text = findings[-1]
        later = [step for step, t in entries if step > last_step and t.endswith(CLEARED)]
        found.append((entries[0][0], text, later[0] if later else None))
    return [(text, cleared) for _, text, cleared in sorted(found, key=lambda f: f[0])]


def _diagnosis_cell(run: Run) -> str:
    verdict = run.verdict()
    match = re.search(r"\*\*Verdict\*\* \(found at step (\d+),.*?\): \*\*(.+?)\*\*", verdict or "")
    if match:
        return f"{match.group(2)} (step {match.group(1)})"
    causes = []
    for text, _ in _findings(run):
        match = re.search(r"Likely cause: \*\*(.+?)\*\*", text)
        if match and match.group(1) not in causes:
            causes.append(match.group(1))
    if causes:
        return ", ".join(causes)
    return "none" if run.modules else "-"


#: How a note about a damaged event file begins (the command line exits with 1 after writing the report).
DAMAGED = "damaged event file"


def damage_notes(run: Run) -> list[str]:
    """One line per event file of ``run`` that could not be read to its end, naming it and how far it was read."""
    notes = []
    for file, (what, last_step) in run.damaged.items():
        if last_step is None:
            read = "nothing in it could be read"
        else:
            read = f"read up to step {last_step}; the rest of the file is unreadable and left out of the report"
        notes.append(f"{DAMAGED} `{file.name}` in `{run.name}`: {what}; {read}.")
    return notes


def merge_note(run: Run) -> str | None:
    """What the report says about a run directory whose event files were merged (a resumed run)."""
    if not run.merged_event_files or run.event_file is None:
        return None
    files = ", ".join(f"`{p.name}`" for p in [*run.merged_event_files, run.event_file])
    return (
        f"`{run.name}` holds {len(run.merged_event_files) + 1} event files (a run resumed into the same directory): "
        f"merged by step, each file replacing the earlier ones from its first step on: {files}."
    )


def report_notes(runs: Sequence[Run], metric: str | None = None) -> list[str]:
    """What the reader of the report should know about what was read: one line per damaged event file
    (:func:`damage_notes`), per run directory whose event files were merged (:func:`merge_note`) or partly
    ignored (:func:`rerun_note`), and one when no run logged the given ``metric``."""
    notes = [note for run in runs for note in damage_notes(run)]
    notes += [note for note in map(merge_note, runs) if note is not None]
    notes += [note for note in map(rerun_note, runs) if note is not None]
    if metric is not None and not any(metric in run.scalars for run in runs):
        notes.append(f"`metric={metric!r}`: no run logged this tag.")
    return notes


def write_report(
    logdir: str | Path,
    out: str | Path,
    metric: str | None = None,
    note: Callable[[str], object] | None = None,
) -> list[Path]:
    """Write into ``out``, for every run under ``logdir`` that logged gradient norms, ``<run>/grad_norm_heatmap.png``,
    ``<run>/grad_norm_curves.png`` and ``<run>/gradient_flow.png``; for every run ActivationMonitor watched, its
    activation heatmaps (:data:`REPORT_ACTIVATION_HEATMAPS`); ``<parent>/gradient_flow_comparison.png`` for every parent
    directory of two or more runs with gradient norms; and ``summary.md``. Returns the files written, ``summary.md``
    last.

    ``metric``: the scalar tag whose last value ``summary.md`` shows per run; by default (``None``) a tag like
    ``val*acc*`` (case-insensitive), and no column when no run has one. ``note``, e.g. ``print``, is called with each
    note ``summary.md`` carries (event files ignored, a ``metric`` no run logged).

    Raises:
        FileNotFoundError: ``logdir`` holds no event file.
        ValueError: ``metric`` is neither ``None`` nor a non-empty string.
    """
    if metric is not None and (not isinstance(metric, str) or not metric):
        raise invalid("metric", metric, "a scalar tag such as 'val/acc', or None")
    out = Path(out)
    runs = load_runs(logdir)
    _check_out(out)  # before any figure is drawn
    figures: dict[str, list[Path]] = {}
    for run in runs:
        if run.has_grad_norms:
            figures[run.name] = [
                _save(plot_heatmap(run), out / run.name / "grad_norm_heatmap.png"),
                _save(plot_norm_curves(run), out / run.name / "grad_norm_curves.png"),
                _save(plot_gradient_flow(run), out / run.name / "gradient_flow.png"),
            ]
        if run.modules:
            figures.setdefault(run.name, []).extend(
                _save(plot_activation_heatmap(run, figure), out / run.name / f"{figure}.png")
                for figure in REPORT_ACTIVATION_HEATMAPS
                if has_activation_heatmap(run, figure)
            )
    by_parent: dict[str, list[Run]] = {}
    for run in runs:
        if run.has_grad_norms and "/" in run.name:
            by_parent.setdefault(run.name.rsplit("/", 1)[0], []).append(run)
    for parent, group in by_parent.items():
        if len(group) > 1:
            comparison = plot_flow_comparison(group, parent)
            figures[parent] = [_save(comparison, out / parent / "gradient_flow_comparison.png")]
    summary = out / "summary.md"
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(summary_markdown(runs, figures, out, metric))
    if note is not None:
        for text in report_notes(runs, metric):
            note(text)
    return [p for paths in figures.values() for p in paths] + [summary]


def _check_out(out: Path) -> None:
    """Raise ``NotADirectoryError`` when ``out``, or the first of its parents that exists, is not a directory."""
    for folder in (out, *out.parents):
        if folder.exists():
            if not folder.is_dir():
                raise NotADirectoryError(
                    f"`out={str(out)!r}` cannot be a directory: {str(folder)!r} is a file; pass a directory to write "
                    "the report into"
                )
            return


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
    positions = np.arange(n)
    if labels is None:
        ax.bar(positions, np.nan_to_num(heights[0], nan=0.0), color=_depth_colours(n))
        missing = np.flatnonzero(~np.isfinite(heights[0]))
        if len(missing):
            ax.plot(missing, np.full(len(missing), 0.03), "x", color="red", transform=ax.get_xaxis_transform())
            if len(missing) <= 20:  # the values themselves, while they fit
                for x in missing:
                    ax.annotate(f"{rows[0][x]:g}", (x, 0.97), xycoords=("data", "axes fraction"), ha="center",
                                va="top", color="red", fontsize=_TICK_FONT, rotation=0 if level else 90)
    else:
        for row, label in zip(heights, labels):
            ax.plot(positions, row, marker="o", markersize=3 if n > 40 else 5, label=label)
        ax.legend(fontsize="small")
    finite = np.concatenate([h[np.isfinite(h)] for h in heights])
    if finite.size:
        ax.set_yscale("log")
        # Whole decades, so that bar heights compare as orders of magnitude even when all are within one.
        low, high = np.floor(np.log10(finite.min())), np.ceil(np.log10(finite.max()))
        ax.set_ylim(10**low, 10 ** max(high, low + 1))
    else:  # nothing to draw, and a log axis needs one positive value
        ax.set_yticks([])
    ax.set_xlim(-0.6, n - 0.4)
    ax.xaxis.set_major_locator(FixedLocator(shown))
    ax.set_xticklabels([names.labels[i] for i in shown], fontsize=_TICK_FONT, rotation=0 if level else 90)
    ax.set(xlabel="layer (input to output)", ylabel="gradient norm (log scale)")
    ax.grid(True, axis="y", which="major", alpha=0.4)
    _titles(fig, title, caption)
    return fig


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, min(height, _MAX_HEIGHT)), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)  # so that callers can draw it (and measure its text) without pyplot
    return fig


def _titles(fig: Figure, title: str, caption: list[str]) -> None:
    fig.suptitle(title)
    if caption:
        fig.supxlabel(_wrap(caption), fontsize=_CAPTION_FONT, ha="left", x=0.01, multialignment="left")


def _wrap(caption: list[str]) -> str:
    # About 0.55 em per character in DejaVu Sans; the margin keeps the longest line inside the figure.
    width = int((_WIDTH - 0.4) * 72 / (_CAPTION_FONT * 0.56))
    return "\n".join(textwrap.fill(part, width) for part in caption)


def _caption_height(caption: list[str]) -> float:
    return (_wrap(caption).count("\n") + 1) * _CAPTION_FONT * 1.35 / 72 if caption else 0.0


def _thin(n: int, room_pt: float) -> list[int]:
    """Indices of the labels to show of ``n`` evenly spaced ones in ``room_pt`` points: every k-th, so that labels
    never overlap, the first and the last always included."""
    fit = max(int(room_pt // (_TICK_FONT * 1.3)), 2)
    every = max(math.ceil(n / fit), 1)
    shown = list(range(0, n, every))
    if shown[-1] != n - 1:
        # The output layer is labelled too, in place of the last label when it would crowd it.
        if n - 1 - shown[-1] < every and len(shown) > 1:
            shown[-1] = n - 1
        else:
            shown.append(n - 1)
    return shown


def _integer_steps(ax: Axes, steps: np.ndarray) -> None:
    """Steps are whole numbers: ticks on integers only, written out in full (no offset, no scientific notation)."""
    if len(steps) and steps.min() == steps.max():
        ax.set_xlim(steps[0] - 0.5, steps[0] + 0.5)
        ax.xaxis.set_major_locator(FixedLocator([int(steps[0])]))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins="auto", integer=True, min_n_ticks=2))
    # A tick left of step 0 (a cell's edge lies half a step before it) is no step.
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{round(v)}" if v >= 0 else ""))


def _flag_strip(ax: Axes, flags: dict[str, np.ndarray]) -> None:
    """One row per condition logged, a tick at each step it was flagged."""
    rows = list(flags)
    for i, condition in enumerate(rows):
        if len(flags[condition]):
            ax.eventplot(
                [flags[condition]], lineoffsets=i, linelengths=0.8, linewidths=1.0,
                colors=[_CONDITION_COLOURS[condition]], gid=f"flagged-steps-{condition}",
            )
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.yaxis.set_major_locator(FixedLocator(range(len(rows))))
    ax.set_yticklabels([_CONDITION_LABELS[c] for c in rows], fontsize=_TICK_FONT)
    ax.tick_params(axis="x", labelbottom=False, length=0)
    ax.tick_params(axis="y", length=0)
    ax.set_title("steps GradHealthMonitor flagged", fontsize="small", loc="left")
    if not any(len(s) for s in flags.values()):
        ax.text(0.5, 0.5, "none", transform=ax.transAxes, ha="center", va="center", fontsize="small")


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


def _strip_height(flags: dict[str, np.ndarray]) -> float:
    """Inches for the strip of flagged steps: none when nothing was flagged (the caption says so)."""
    return 0.25 + 0.17 * len(flags) if any(len(steps) for steps in flags.values()) else 0.0


def _flag_style(condition: str, count: int, legend: bool) -> dict:
    return {
        "marker": _CONDITION_MARKERS[condition],
        "color": _CONDITION_COLOURS[condition],
        "edgecolors": "white",
        "linewidths": 0.5,
        "s": 25 if count <= 100 else 9,  # dense flags at full size would hide the line they mark
        "label": f"flagged {_CONDITION_LABELS[condition]}" if legend else "_nolegend_",
    }


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


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI)
    return path


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


def _depth_colours(n: int) -> list:
    return [colormaps["viridis"](x) for x in np.linspace(0.0, 0.9, max(n, 1))][:n]


def _finite_positive(values: np.ndarray) -> np.ndarray:
    """NaN where a value cannot sit on a log axis (zero, negative, NaN, inf), so matplotlib leaves a gap."""
    return np.where(np.isfinite(values) & (values > 0), values, np.nan)


def _cell(value: float | int | None, fmt: str = "{}") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def _flag_cell(count: int, first: int | None, run: Run, condition: str) -> str:
    if tags.health_count(condition) not in run.scalars:
        return "-"
    return f"{count} (first {first})" if count else "0"
