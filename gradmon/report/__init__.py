"""Figures and a markdown summary from the TensorBoard event files gradmon's callbacks write, without a server.

A run is a directory holding event files. When a directory holds several (a run resumed from a checkpoint, a rerun
logged into the same ``version``), they are merged by step, oldest first, each file replacing what the earlier ones
logged from its own first step on: a resumed run is read whole, a rerun from step 0 replaces the earlier run.
``summary.md`` has a line for every such directory naming the files merged or ignored, and one for every event file
that could not be read to its end.

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

The package, one module a concept: :mod:`~gradmon.report.runs` reads event files into :class:`Run` objects;
:mod:`~gradmon.report.data` shapes their scalars into what is drawn and tabulated; :mod:`~gradmon.report.labels`
shortens layer names and writes the captions' lines; :mod:`~gradmon.report.figures` holds what every figure
shares, :mod:`~gradmon.report.heatmaps` and :mod:`~gradmon.report.curves` draw them; :mod:`~gradmon.report.summary`
writes ``summary.md``; :mod:`~gradmon.report.write` writes it all (``gradmon report``, in :mod:`gradmon.cli`).

Reading and plotting use matplotlib's object API (no pyplot, no global backend), and this package never imports
Lightning, so it works on logs from any loop that writes the same tags::

    from gradmon.report import write_report
    write_report("runs", "runs/report", metric="val/acc", note=print)
"""

from gradmon.report.curves import MAX_CURVES, plot_flow_comparison, plot_gradient_flow, plot_norm_curves
from gradmon.report.data import (
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
from gradmon.report.heatmaps import (
    ACTIVATION_HEATMAPS,
    MAX_HEATMAP_COLUMNS,
    REPORT_ACTIVATION_HEATMAPS,
    ActivationHeatmap,
    has_activation_heatmap,
    plot_activation_heatmap,
    plot_heatmap,
)
from gradmon.report.labels import MAX_LABEL_CHARS, ShortNames, short_names
from gradmon.report.runs import EVENT_FILE_GLOB, Run, Series, event_files, find_runs, load_run, load_runs
from gradmon.report.summary import (
    DAMAGED,
    damage_notes,
    diagnosis_markdown,
    merge_note,
    report_notes,
    rerun_note,
    summary_markdown,
)
from gradmon.report.write import run_figures, write_report

__all__ = [
    "ACTIVATION_HEATMAPS",
    "DAMAGED",
    "DEFAULT_METRIC_PATTERN",
    "EVENT_FILE_GLOB",
    "FLAG_PREFIX",
    "MAX_CURVES",
    "MAX_HEATMAP_COLUMNS",
    "MAX_LABEL_CHARS",
    "REPORT_ACTIVATION_HEATMAPS",
    "ActivationHeatmap",
    "HealthSummary",
    "Run",
    "Series",
    "ShortNames",
    "damage_notes",
    "diagnosis_markdown",
    "event_files",
    "find_metric",
    "find_runs",
    "flagged_steps",
    "has_activation_heatmap",
    "health_summary",
    "layer_flags",
    "layer_matrix",
    "layer_norms",
    "load_run",
    "load_runs",
    "merge_note",
    "plot_activation_heatmap",
    "plot_flow_comparison",
    "plot_gradient_flow",
    "plot_heatmap",
    "plot_norm_curves",
    "report_notes",
    "rerun_note",
    "short_names",
    "summary_markdown",
    "run_figures",
    "write_report",
]
