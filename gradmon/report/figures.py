"""What every figure of the report shares: its size and resolution, title and wrapped caption, labels thinned to what
fits, whole-number steps, the strip of steps GradHealthMonitor flagged and the style of its marks.

Figures are drawn with matplotlib's object API (no pyplot, no global backend): each has its own Agg canvas.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator

_CONDITION_LABELS = {"vanishing": "vanishing", "exploding": "exploding", "nonfinite": "non-finite"}
# Okabe-Ito colours: told apart by colour-blind readers, and visible on white as well as on viridis (white edges).
_CONDITION_COLOURS = {"vanishing": "#56b4e9", "exploding": "#d55e00", "nonfinite": "#000000"}
_CONDITION_MARKERS = {"vanishing": "v", "exploding": "^", "nonfinite": "X"}
_DPI = 100
_WIDTH = 10.0  # inches
_MAX_HEIGHT = 14.0  # inches: taller than a screen is not read
_TICK_FONT = 8.0  # points
_CAPTION_FONT = 8.0  # points


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, min(height, _MAX_HEIGHT)), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)  # so that callers can draw it (and measure its text) without pyplot
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI)
    return path


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


def _strip_height(flags: dict[str, np.ndarray]) -> float:
    """Inches for the strip of flagged steps: none when nothing was flagged (the caption says so)."""
    return 0.25 + 0.17 * len(flags) if any(len(steps) for steps in flags.values()) else 0.0


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


def _flag_style(condition: str, count: int, legend: bool) -> dict:
    return {
        "marker": _CONDITION_MARKERS[condition],
        "color": _CONDITION_COLOURS[condition],
        "edgecolors": "white",
        "linewidths": 0.5,
        "s": 25 if count <= 100 else 9,  # dense flags at full size would hide the line they mark
        "label": f"flagged {_CONDITION_LABELS[condition]}" if legend else "_nolegend_",
    }


def _depth_colours(n: int) -> list:
    return [colormaps["viridis"](x) for x in np.linspace(0.0, 0.9, max(n, 1))][:n]


def _finite_positive(values: np.ndarray) -> np.ndarray:
    """NaN where a value cannot sit on a log axis (zero, negative, NaN, inf), so matplotlib leaves a gap."""
    return np.where(np.isfinite(values) & (values > 0), values, np.nan)
