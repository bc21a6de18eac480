"""``summary.md``: a table with one row per run that logged gradmon scalars, the Diagnosis section
(ActivationMonitor's findings as it wrote them), the notes on what was read (damaged, merged and ignored event
files, a ``metric`` no run logged) and links to the figures."""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Sequence
from pathlib import Path

from gradmon import tags
from gradmon.diagnosis import CLEARED
from gradmon.health import CONDITIONS
from gradmon.report.data import DEFAULT_METRIC_PATTERN, HealthSummary, health_summary
from gradmon.report.runs import _GRADMON_GROUPS, Run
from gradmon.tensorboard import markdown_table

#: How a note about a damaged event file begins (the command line exits with 1 after writing the report).
DAMAGED = "damaged event file"


def summary_markdown(
    runs: Sequence[Run],
    figures: dict[str, list[Path]] | None = None,
    out: Path | None = None,
    metric: str | None = None,
) -> str:
    """A markdown report of ``runs``.

    Args:
        runs: The runs, e.g. from :func:`~gradmon.report.runs.load_runs`.
        figures: The figures written, by run (or parent directory) name; ``None`` for no Figures section.
        out: The directory the links are relative to; ``None`` for the figures' paths as they are.
        metric: The tag whose last value a column shows, as in :func:`~gradmon.report.data.find_metric`.

    Returns:
        One table row per run that logged gradmon scalars, the Diagnosis section, the notes of
        :func:`report_notes`, then links to each run's figures.
    """
    monitored = [r for r in runs if any(t.split("/", 1)[0] in _GRADMON_GROUPS for t in r.scalars)]
    lines = ["# gradmon report", ""]
    if monitored:
        lines += _health_table(monitored, metric)
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
    """The Diagnosis section of ``summary.md``.

    Args:
        runs: The runs; those ActivationMonitor did not watch are left out.

    Returns:
        Its lines, none when no run was watched: per run, its verdict, then the latest finding of each condition as
        ActivationMonitor wrote it (``diagnosis/<condition>``), with the step it cleared at when it did; "No
        finding." for a run without any.
    """
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


def report_notes(runs: Sequence[Run], metric: str | None = None) -> list[str]:
    """What the reader of the report should know about what was read.

    Args:
        runs: The runs read.
        metric: The ``metric`` asked for, ``None`` for the default.

    Returns:
        One line per damaged event file (:func:`damage_notes`), per run directory whose event files were merged
        (:func:`merge_note`) or partly ignored (:func:`rerun_note`), and one when no run logged the given ``metric``.
    """
    notes = [note for run in runs for note in damage_notes(run)]
    notes += [note for note in map(merge_note, runs) if note is not None]
    notes += [note for note in map(rerun_note, runs) if note is not None]
    if metric is not None and not any(metric in run.scalars for run in runs):
        notes.append(f"`metric={metric!r}`: no run logged this tag.")
    return notes


def damage_notes(run: Run) -> list[str]:
    """One line per event file of ``run`` that could not be read to its end, naming it and how far it was read.

    Args:
        run: The run.

    Returns:
        The lines, each beginning with :data:`DAMAGED`.
    """
    notes = []
    for file, (what, last_step) in run.damaged.items():
        if last_step is None:
            read = "nothing in it could be read"
        else:
            read = f"read up to step {last_step}; the rest of the file is unreadable and left out of the report"
        notes.append(f"{DAMAGED} `{file.name}` in `{run.name}`: {what}; {read}.")
    return notes


def merge_note(run: Run) -> str | None:
    """What the report says about a run directory whose event files were merged (a resumed run).

    Args:
        run: The run.

    Returns:
        The note naming the files merged, or ``None`` when the run was read from one file.
    """
    if not run.merged_event_files or run.event_file is None:
        return None
    files = ", ".join(f"`{p.name}`" for p in [*run.merged_event_files, run.event_file])
    return (
        f"`{run.name}` holds {len(run.merged_event_files) + 1} event files (a run resumed into the same directory): "
        f"merged by step, each file replacing the earlier ones from its first step on: {files}."
    )


def rerun_note(run: Run) -> str | None:
    """What the report says about a run directory holding event files of which only the latest was reported.

    Args:
        run: The run.

    Returns:
        The note naming the files ignored, or ``None`` when none was.
    """
    if not run.ignored_event_files or run.event_file is None:
        return None
    ignored = ", ".join(f"`{p.name}`" for p in run.ignored_event_files)
    count = len(run.ignored_event_files) + 1
    return (
        f"`{run.name}` holds {count} event files (another run was logged into the same directory, e.g. a rerun "
        f"with the same version); reported only the latest, `{run.event_file.name}`; ignored: {ignored}."
    )


def _health_table(runs: Sequence[Run], metric: str | None) -> list[str]:
    """The table of ``summary.md``, one row per run, with the line that explains its health columns."""
    summaries = [health_summary(run, metric) for run in runs]
    metrics_found = {s.metric for s in summaries if s.metric is not None}
    metric_header = _metric_header(metric, metrics_found)
    scaled = any(s.amp_overflow_steps is not None for s in summaries)
    diagnosed = any(run.modules or run.diagnosis() for run in runs)
    header = ["run", "last monitored step"]
    header += [metric_header] if metric_header else []
    header += ["vanishing", "exploding", "non-finite", "skipped steps", "gradcheck max rel error"]
    header += ["fp16 overflow steps (not flagged)"] if scaled else []
    header += ["diagnosis"] if diagnosed else []
    rows = []
    for run, s in zip(runs, summaries):
        cells = [f"`{run.name}`", _cell(s.last_step)]
        if metric_header:
            cells.append(_metric_cell(s, len(metrics_found) > 1))
        cells += [_flag_cell(s.flagged_steps[c], s.first_flagged[c], run, c) for c in CONDITIONS]
        cells += [_cell(s.skipped_steps), _cell(s.gradcheck_max_rel_error, "{:.3g}")]
        if scaled:
            cells.append(_cell(s.amp_overflow_steps))
        if diagnosed:
            cells.append(_diagnosis_cell(run))
        rows.append(cells)
    return [
        "Health columns: steps on which the monitor flagged at least one layer (first such step).",
        "",
        markdown_table(header, rows),
    ]


def _metric_header(metric: str | None, found: set[str]) -> str | None:
    """The metric column's header: the tag asked for or the one tag found; ``None`` for no column."""
    if metric is not None:
        return f"{metric} (last)"
    if len(found) == 1:
        return f"{next(iter(found))} (last)"
    if not found:
        return None
    # Several tags in different runs: each cell names its own.
    accuracies = all(fnmatch.fnmatchcase(tag.lower(), DEFAULT_METRIC_PATTERN) for tag in found)
    return "val accuracy (last)" if accuracies else "validation metric (last)"


def _metric_cell(summary: HealthSummary, named: bool) -> str:
    value = _cell(summary.metric_value, "{:.3f}")
    return f"{value} (`{summary.metric}`)" if named and summary.metric else value


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


def _cell(value: float | int | None, fmt: str = "{}") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def _flag_cell(count: int, first: int | None, run: Run, condition: str) -> str:
    if tags.health_count(condition) not in run.scalars:
        return "-"
    return f"{count} (first {first})" if count else "0"
