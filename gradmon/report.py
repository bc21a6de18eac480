"""Figures and a markdown summary from the TensorBoard event files gradmon's callbacks write, without a server.

For every run (a directory holding event files) under a log directory:

- ``<run>/grad_norm_heatmap.png``: log10 gradient norm, layer by step (tags ``grad_norm_log10/<layer>``), layers
  from the input down in the order they were first logged, which is the model's registration order.
- ``<run>/grad_norm_curves.png``: every layer's gradient norm over the steps on a log axis (``grad_norm/<layer>``).
- ``<run>/gradient_flow.png``: each layer's last logged gradient norm as a bar, on a log axis.
- ``<parent>/gradient_flow_comparison.png``: the gradient flow at the first logged step of all runs sharing a parent
  directory, overlaid, which for ``runs/<experiment>/<variant>`` compares the variants of one experiment.
- ``summary.md``: per run, the health events (``grad_health/*``), the gradient check's worst relative error
  (``gradcheck/max_rel_error``) and the last validation accuracy, with links to the figures.

Reading and plotting use matplotlib's object API (no pyplot, no global backend), and this module never imports
Lightning, so it works on logs from any loop that writes the same tags::

    from gradmon.report import write_report
    write_report("runs", "runs/report")
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from tensorboard.backend.event_processing import event_accumulator

from gradmon.health import CONDITIONS

EVENT_FILE_GLOB = "events.out.tfevents.*"
# Tag groups that mark a run as watched by gradmon, and so as a row of the summary.
_GRADMON_GROUPS = ("grad_norm", "grad_health", "gradcheck")
_SUMMARY_HEADER = (
    "run",
    "last monitored step",
    "val acc",
    "vanishing",
    "exploding",
    "non-finite",
    "skipped steps",
    "gradcheck max rel error",
)
# Keep every scalar (0 = no limit) and none of the heavy summaries the report does not draw.
_SIZE_GUIDANCE = {
    event_accumulator.SCALARS: 0,
    event_accumulator.HISTOGRAMS: 1,
    event_accumulator.COMPRESSED_HISTOGRAMS: 1,
    event_accumulator.IMAGES: 1,
    event_accumulator.TENSORS: 1,
    event_accumulator.AUDIO: 1,
}


@dataclass
class Series:
    """One scalar tag of one run: its steps and values, in logged order."""

    steps: np.ndarray
    values: np.ndarray

    @property
    def last(self) -> float:
        return float(self.values[-1])


@dataclass
class Run:
    """The scalars of one run, by tag, in the order each tag was first logged."""

    name: str
    path: Path
    scalars: dict[str, Series]

    def layers(self, prefix: str = "grad_norm/") -> list[str]:
        """Layer names logged under ``prefix``, in first-logged order (``grad_norm/total`` and the per-optimizer
        ``grad_norm/total-<optimizer>`` are not layers)."""
        total = f"{prefix}total"
        return [
            tag[len(prefix) :]
            for tag in self.scalars
            if tag.startswith(prefix) and tag != total and not tag.startswith(total + "-")
        ]

    @property
    def has_grad_norms(self) -> bool:
        return bool(self.layers())


def find_runs(logdir: str | Path) -> list[Path]:
    """Every directory under ``logdir`` (itself included) that holds an event file, sorted.

    Raises:
        FileNotFoundError: ``logdir`` does not exist or holds no event file.
    """
    logdir = Path(logdir)
    if not logdir.is_dir():
        raise FileNotFoundError(f"log directory {str(logdir)!r} does not exist")
    runs = sorted({p.parent for p in logdir.rglob(EVENT_FILE_GLOB) if p.is_file()})
    if not runs:
        raise FileNotFoundError(
            f"no TensorBoard event files ({EVENT_FILE_GLOB}) under {str(logdir)!r}; "
            "point at the save_dir of a TensorBoardLogger, e.g. `gradmon report runs`"
        )
    return runs


def load_run(path: str | Path, logdir: str | Path | None = None) -> Run:
    """Read every scalar of the run in ``path``; the run is named by its path relative to ``logdir``."""
    path = Path(path)
    accumulator = event_accumulator.EventAccumulator(str(path), size_guidance=_SIZE_GUIDANCE)
    accumulator.Reload()
    scalars = {}
    for tag in accumulator.Tags()[event_accumulator.SCALARS]:
        events = accumulator.Scalars(tag)
        scalars[tag] = Series(
            np.array([e.step for e in events], dtype=np.int64), np.array([e.value for e in events], dtype=np.float64)
        )
    name = path.relative_to(logdir).as_posix() if logdir is not None else path.name
    return Run(name if name != "." else path.name, path, scalars)


def load_runs(logdir: str | Path) -> list[Run]:
    return [load_run(path, logdir) for path in find_runs(logdir)]


def layer_matrix(run: Run, prefix: str = "grad_norm_log10/") -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(layers, steps, values)``: ``values[i, j]`` is layer ``i``'s ``prefix`` value at ``steps[j]``.

    Layers and steps are those of the gradient norms (``grad_norm/<layer>``), so a step at which a layer's value
    was left out (``grad_norm_log10`` skips a zero or non-finite norm) is a NaN rather than a missing column.
    """
    layers = run.layers()
    steps = np.unique(np.concatenate([run.scalars[f"grad_norm/{layer}"].steps for layer in layers]))
    values = np.full((len(layers), len(steps)), np.nan)
    for i, layer in enumerate(layers):
        series = run.scalars.get(prefix + layer)
        if series is not None:
            values[i, np.searchsorted(steps, series.steps)] = series.values
    return layers, steps, values


def layer_norms(run: Run, index: int = -1) -> tuple[int, dict[str, float]]:
    """``(step, norms)``: every layer's gradient norm (``grad_norm/<layer>``) at its ``index``-th logged step, the
    first (0) or the last (-1), in depth order."""
    layers = run.layers()
    step = int(run.scalars[f"grad_norm/{layers[0]}"].steps[index])
    return step, {layer: float(run.scalars[f"grad_norm/{layer}"].values[index]) for layer in layers}


@dataclass
class HealthSummary:
    """What a run's health and gradient-check scalars say, for one row of ``summary.md``."""

    last_step: int | None
    flagged_steps: dict[str, int]
    first_flagged: dict[str, int | None]
    skipped_steps: int | None
    gradcheck_max_rel_error: float | None
    val_acc: float | None


def health_summary(run: Run) -> HealthSummary:
    flagged: dict[str, int] = {}
    first: dict[str, int | None] = {}
    for condition in CONDITIONS:
        series = run.scalars.get(f"grad_health/{condition}")
        hits = series.steps[series.values > 0] if series is not None else np.array([], dtype=np.int64)
        flagged[condition] = len(hits)
        first[condition] = int(hits[0]) if len(hits) else None
    steps = [int(s.steps.max()) for tag, s in run.scalars.items() if tag.split("/", 1)[0] in _GRADMON_GROUPS]
    skipped = run.scalars.get("grad_health/skipped_steps")
    gradcheck = run.scalars.get("gradcheck/max_rel_error")
    val_acc = run.scalars.get("val/acc")
    return HealthSummary(
        last_step=max(steps) if steps else None,
        flagged_steps=flagged,
        first_flagged=first,
        skipped_steps=int(skipped.last) if skipped is not None else None,
        gradcheck_max_rel_error=float(np.nanmax(gradcheck.values)) if gradcheck is not None else None,
        val_acc=val_acc.last if val_acc is not None else None,
    )


def plot_heatmap(run: Run) -> Figure:
    layers, steps, values = layer_matrix(run)
    fig = Figure(figsize=(8, 1.2 + 0.28 * len(layers)), layout="constrained")
    ax = fig.subplots()
    cmap = colormaps["viridis"].with_extremes(bad="lightgrey")
    mesh = ax.pcolormesh(_edges(steps), np.arange(len(layers) + 1), np.ma.masked_invalid(values), cmap=cmap)
    ax.set_yticks(np.arange(len(layers)) + 0.5, layers)
    ax.invert_yaxis()  # the input layer on top, as the network is usually drawn
    title = f"{run.name}: log10 gradient norm by layer"
    if np.isnan(values).any():
        title += "\n(grey: not logged, or a zero or non-finite norm)"
    ax.set(title=title, xlabel="step", ylabel="layer (input at top)")
    fig.colorbar(mesh, ax=ax, label="log10 gradient norm")
    return fig


def plot_norm_curves(run: Run) -> Figure:
    layers = run.layers()
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    colours = _depth_colours(len(layers))
    for layer, colour in zip(layers, colours):
        series = run.scalars[f"grad_norm/{layer}"]
        ax.plot(series.steps, _finite_positive(series.values), color=colour, label=layer)
    ax.set_yscale("log")
    ax.set(title=f"{run.name}: gradient norm by layer", xlabel="step", ylabel="gradient norm (log scale)")
    ax.grid(True, which="major", alpha=0.4)
    ax.legend(title="layer", fontsize="x-small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def plot_gradient_flow(run: Run) -> Figure:
    step, norms = layer_norms(run, -1)
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    positions = np.arange(len(norms))
    heights = _finite_positive(np.array(list(norms.values())))
    ax.bar(positions, np.nan_to_num(heights, nan=0.0), color=_depth_colours(len(norms)))
    if np.isnan(heights).all():  # nothing to draw, and a log axis needs one positive value
        ax.set_yticks([])
    else:
        ax.set_yscale("log")
        # Whole decades, so that bar heights compare as orders of magnitude even when all are within one.
        low, high = np.floor(np.nanmin(np.log10(heights))), np.ceil(np.nanmax(np.log10(heights)))
        ax.set_ylim(10**low, 10 ** max(high, low + 1))
    for x, (value, height) in enumerate(zip(norms.values(), heights)):
        if np.isnan(height):  # a zero, NaN or inf norm has no bar on a log axis: say what it was
            ax.annotate(f"{value:g}", (x, 0.98), xycoords=("data", "axes fraction"), ha="center", va="top", color="red")
    ax.set_xticks(positions, list(norms), rotation=60, ha="right")
    ax.set(
        title=f"{run.name}: gradient flow at step {step}",
        xlabel="layer (input to output)",
        ylabel="gradient norm (log scale)",
    )
    ax.grid(True, axis="y", which="major", alpha=0.4)
    return fig


def plot_flow_comparison(runs: Sequence[Run], title: str) -> Figure:
    """Each run's gradient norm per layer at its first logged step, one line per run.

    The first step shows what the architecture and the initialisation do to the gradient before training has had a
    chance to change either, and it is finite even for a run that later diverges.
    """
    fig = Figure(figsize=(8, 4.2), layout="constrained")
    ax = fig.subplots()
    longest: list[str] = []
    for run in runs:
        step, norms = layer_norms(run, 0)
        longest = max(longest, list(norms), key=len)
        values = _finite_positive(np.array(list(norms.values())))
        ax.plot(np.arange(len(norms)), values, marker="o", label=f"{Path(run.name).name} (step {step})")
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(longest)), longest, rotation=60, ha="right")
    ax.set(
        title=f"{title}: gradient flow at the first logged step",
        xlabel="layer (input to output)",
        ylabel="gradient norm (log scale)",
    )
    ax.grid(True, which="major", alpha=0.4)
    ax.legend(fontsize="small")
    return fig


def summary_markdown(runs: Sequence[Run], figures: dict[str, list[Path]] | None = None, out: Path | None = None) -> str:
    """A markdown report: one table row per run that logged gradmon scalars, then links to each run's figures."""
    monitored = [r for r in runs if any(t.split("/", 1)[0] in _GRADMON_GROUPS for t in r.scalars)]
    lines = ["# gradmon report", ""]
    if monitored:
        lines += [
            "Health columns: steps on which the monitor flagged at least one layer (first such step).",
            "",
            "| " + " | ".join(_SUMMARY_HEADER) + " |",
            "|" + "---|" * len(_SUMMARY_HEADER),
        ]
        for run in monitored:
            s = health_summary(run)
            flags = [_flag_cell(s.flagged_steps[c], s.first_flagged[c], run, c) for c in CONDITIONS]
            cells = [
                f"`{run.name}`",
                _cell(s.last_step),
                _cell(s.val_acc, "{:.3f}"),
                *flags,
                _cell(s.skipped_steps),
                _cell(s.gradcheck_max_rel_error, "{:.3g}"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    others = [r.name for r in runs if r not in monitored]
    if others:
        lines += ["", "Runs without gradmon scalars: " + ", ".join(f"`{name}`" for name in others) + "."]
    if figures:
        lines += ["", "## Figures", ""]
        for name, paths in figures.items():
            links = ", ".join(f"[{p.stem}]({p.relative_to(out).as_posix() if out else p.as_posix()})" for p in paths)
            lines.append(f"- `{name}`: {links}")
    return "\n".join(lines) + "\n"


def write_report(logdir: str | Path, out: str | Path) -> list[Path]:
    """Write the figures of every run under ``logdir`` and ``summary.md`` into ``out``; returns the files written.

    Raises:
        FileNotFoundError: ``logdir`` holds no event file.
    """
    out = Path(out)
    runs = load_runs(logdir)
    figures: dict[str, list[Path]] = {}
    for run in runs:
        if run.has_grad_norms:
            figures[run.name] = [
                _save(plot_heatmap(run), out / run.name / "grad_norm_heatmap.png"),
                _save(plot_norm_curves(run), out / run.name / "grad_norm_curves.png"),
                _save(plot_gradient_flow(run), out / run.name / "gradient_flow.png"),
            ]
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
    summary.write_text(summary_markdown(runs, figures, out))
    return [p for paths in figures.values() for p in paths] + [summary]


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges halfway between logged steps, so unevenly spaced steps get cells of their own width."""
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    middles = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[2 * steps[0] - middles[0]], middles, [2 * steps[-1] - middles[-1]]])


def _depth_colours(n: int) -> list:
    return [colormaps["viridis"](x) for x in np.linspace(0.0, 0.9, max(n, 1))][:n]


def _finite_positive(values: np.ndarray) -> np.ndarray:
    """NaN where a value cannot sit on a log axis (zero, negative, NaN, inf), so matplotlib leaves a gap."""
    return np.where(np.isfinite(values) & (values > 0), values, np.nan)


def _cell(value: float | int | None, fmt: str = "{}") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def _flag_cell(count: int, first: int | None, run: Run, condition: str) -> str:
    if f"grad_health/{condition}" not in run.scalars:
        return "-"
    return f"{count} (first {first})" if count else "0"
