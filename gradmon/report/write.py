""":func:`write_report`: every figure and ``summary.md`` for the runs of a log directory, as ``gradmon report``
writes them (see :mod:`gradmon.cli`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from matplotlib.figure import Figure

from gradmon._validation import invalid
from gradmon.report.curves import plot_flow_comparison, plot_gradient_flow, plot_norm_curves
from gradmon.report.figures import _save
from gradmon.report.heatmaps import (
    REPORT_ACTIVATION_HEATMAPS,
    has_activation_heatmap,
    plot_activation_heatmap,
    plot_heatmap,
)
from gradmon.report.runs import Run, load_runs
from gradmon.report.summary import report_notes, summary_markdown


def write_report(
    logdir: str | Path,
    out: str | Path,
    metric: str | None = None,
    note: Callable[[str], object] | None = None,
) -> list[Path]:
    """Write the figures and ``summary.md`` of every run under ``logdir`` into ``out``.

    For every run that logged gradient norms, ``<run>/grad_norm_heatmap.png``, ``<run>/grad_norm_curves.png`` and
    ``<run>/gradient_flow.png``; for every run ActivationMonitor watched, its activation heatmaps
    (:data:`~gradmon.report.heatmaps.REPORT_ACTIVATION_HEATMAPS`); ``<parent>/gradient_flow_comparison.png`` for
    every parent directory of two or more runs with gradient norms; and ``summary.md``.

    Args:
        logdir: The log directory, e.g. the ``save_dir`` of a TensorBoardLogger.
        out: The directory to write into (created if need be).
        metric: The scalar tag whose last value ``summary.md`` shows per run; by default (``None``) a tag like
            ``val*acc*`` (case-insensitive), and no column when no run has one.
        note: Called, e.g. ``print``, with each note ``summary.md`` carries (event files damaged, merged or ignored,
            a ``metric`` no run logged).

    Returns:
        The files written, ``summary.md`` last.

    Raises:
        FileNotFoundError: ``logdir`` holds no event file.
        NotADirectoryError: ``out``, or the first of its parents that exists, is a file.
        ValueError: ``metric`` is neither ``None`` nor a non-empty string.
    """
    if metric is not None and (not isinstance(metric, str) or not metric):
        raise invalid("metric", metric, "a scalar tag such as 'val/acc', or None")
    out = Path(out)
    runs = load_runs(logdir)
    _check_out(out)  # before any figure is drawn
    figures: dict[str, list[Path]] = {}
    for run in runs:
        if run.has_grad_norms or run.modules:
            figures[run.name] = _run_figures(run, out)
    figures.update(_comparisons(runs, out))
    summary = out / "summary.md"
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(summary_markdown(runs, figures, out, metric))
    if note is not None:
        for text in report_notes(runs, metric):
            note(text)
    return [p for paths in figures.values() for p in paths] + [summary]


def run_figures(run: Run) -> list[tuple[str, Callable[[Run], Figure]]]:
    """The figures of one run, by name: its gradient figures, then its activation heatmaps.

    Args:
        run: The run.

    Returns:
        ``(name, plot)`` pairs, ``plot(run)`` drawing the figure saved as ``<name>.png``.
    """
    figures: list[tuple[str, Callable[[Run], Figure]]] = []
    if run.has_grad_norms:
        figures += [("grad_norm_heatmap", plot_heatmap), ("grad_norm_curves", plot_norm_curves),
                    ("gradient_flow", plot_gradient_flow)]
    if run.modules:
        figures += [(figure, partial(plot_activation_heatmap, figure=figure))
                    for figure in REPORT_ACTIVATION_HEATMAPS if has_activation_heatmap(run, figure)]
    return figures


def _run_figures(run: Run, out: Path) -> list[Path]:
    """Draw and save the figures of one run (:func:`run_figures`)."""
    return [_save(plot(run), out / run.name / f"{name}.png") for name, plot in run_figures(run)]


def _comparisons(runs: Sequence[Run], out: Path) -> dict[str, list[Path]]:
    """Draw and save the gradient flow comparison of every parent directory of two or more runs with gradient
    norms, by parent."""
    by_parent: dict[str, list[Run]] = {}
    for run in runs:
        if run.has_grad_norms and "/" in run.name:
            by_parent.setdefault(run.name.rsplit("/", 1)[0], []).append(run)
    return {
        parent: [_save(plot_flow_comparison(group, parent), out / parent / "gradient_flow_comparison.png")]
        for parent, group in by_parent.items()
        if len(group) > 1
    }


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

