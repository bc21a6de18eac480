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
from collections.abc import Callable, Sequence
from pathlib import Path

from gradmon import tags
from gradmon._validation import invalid
from gradmon.diagnosis import CLEARED
from gradmon.health import CONDITIONS
from gradmon.report.curves import (  # noqa: F401
    MAX_CURVES,
    plot_flow_comparison,
    plot_gradient_flow,
    plot_norm_curves,
)
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
from gradmon.report.figures import (  # noqa: F401
    _save,
)
from gradmon.report.heatmaps import (  # noqa: F401
    ACTIVATION_HEATMAPS,
    MAX_HEATMAP_COLUMNS,
    REPORT_ACTIVATION_HEATMAPS,
    ActivationHeatmap,
    has_activation_heatmap,
    plot_activation_heatmap,
    plot_heatmap,
)
from gradmon.report.labels import (  # noqa: F401
    MAX_LABEL_CHARS,
    ShortNames,
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


def _cell(value: float | int | None, fmt: str = "{}") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def _flag_cell(count: int, first: int | None, run: Run, condition: str) -> str:
    if tags.health_count(condition) not in run.scalars:
        return "-"
    return f"{count} (first {first})" if count else "0"
