"""Every tag gradmon logs, in one place: the callbacks write them, the TensorBoard layout charts them, ``gradmon
report`` reads them, the docs and the tests name them from here.

A tag is ``<metric>/<name>``: ``grad_norm/net.0``, ``grad_health/vanishing``. Loggers may put their own prefix in
front (``TensorBoardLogger(prefix="x")`` writes ``x-grad_norm/net.0``), as they do for Lightning's own metrics.

This module never imports Lightning.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

# --- GradNormMonitor: per layer, at logging steps -----------------------------------------------------------------
#: p-norm of a layer's gradient; ``grad_norm/total`` (or ``grad_norm/total-<optimizer>``) over all of them.
GRAD_NORM = "grad_norm"
#: log10 of the gradient norm (left out for a zero or non-finite norm).
GRAD_NORM_LOG10 = "grad_norm_log10"
#: p-norm of a layer's weights.
WEIGHT_NORM = "weight_norm"
#: ||w_after - w_before|| / ||w_before|| of the step just taken, and its log10.
UPDATE_RATIO = "update_ratio"
UPDATE_RATIO_LOG10 = "update_ratio_log10"
#: Histograms of a layer's gradient and weights (their finite values).
GRAD_HIST = "grad_hist"
WEIGHT_HIST = "weight_hist"
#: The name of the total among the layers of ``grad_norm``.
TOTAL = "total"

# --- GradHealthMonitor: per step -----------------------------------------------------------------------------------
#: ``grad_health/<condition>``: layers flagged at a step; ``grad_health/skipped_steps``,
#: ``grad_health/amp_overflow_steps``: cumulative counts.
GRAD_HEALTH = "grad_health"
SKIPPED_STEPS = "skipped_steps"
AMP_OVERFLOW_STEPS = "amp_overflow_steps"
#: ``grad_health_flag/<layer>``: at a step where the layer is flagged, 1 (vanishing), 2 (exploding), 3 (non-finite).
GRAD_HEALTH_FLAG = "grad_health_flag"

# --- GradCheck and WeightInit --------------------------------------------------------------------------------------
#: ``gradcheck/rel_error/<layer>`` and ``gradcheck/max_rel_error``.
GRADCHECK = "gradcheck"
GRADCHECK_REL_ERROR = "gradcheck/rel_error"
GRADCHECK_MAX_REL_ERROR = "gradcheck/max_rel_error"
#: Text: ``weight_init/<position>_<scheme>``.
WEIGHT_INIT = "weight_init"

# --- ActivationMonitor: per observed module, at logging steps ------------------------------------------------------
#: RMS of a module's output (the forward signal), and its log10.
ACTIVATION_RMS = "activation_rms"
ACTIVATION_RMS_LOG10 = "activation_rms_log10"
#: RMS of the gradient of the loss with respect to a module's output (the backward signal), and its log10.
ACTIVATION_GRAD_RMS = "activation_grad_rms"
ACTIVATION_GRAD_RMS_LOG10 = "activation_grad_rms_log10"
#: ReLU-like modules: the fraction of units zero for every example of the batch.
DEAD_FRACTION = "dead_fraction"
#: Bounded activations: the fraction of outputs where the slope is below 1% of its largest, and the mean slope.
SATURATED_FRACTION = "saturated_fraction"
ACTIVATION_SLOPE = "activation_slope"
#: Text: ``diagnosis/<condition>`` (a key of :data:`gradmon.diagnosis.CONDITIONS`), at the steps a finding appears,
#: changes or clears.
DIAGNOSIS = "diagnosis"
#: Text: ``diagnosis/verdict``, the run's verdict (the root cause and its consequences), at the steps it is set or
#: replaced.
VERDICT = "verdict"
#: Weights & Biases: the texts (findings, verdicts, init records) as one table of (step, tag, text).
WANDB_TEXTS = "gradmon/texts"
#: Weights & Biases: GradHealthMonitor's latest events, at the end of fit, as a table.
WANDB_HEALTH_EVENTS = "gradmon/health_events"


def tag(metric: str, name: str) -> str:
    """``tag("grad_norm", "net.0") == "grad_norm/net.0"``."""
    return f"{metric}/{name}"


def total_tag(optimizer: str | None = None) -> str:
    """``grad_norm/total``, or with several optimizers ``grad_norm/total-<optimizer>`` (``grad_norm/total-Adam``)."""
    return tag(GRAD_NORM, TOTAL if optimizer is None else f"{TOTAL}-{optimizer}")


def is_total(name: str) -> bool:
    """Whether a name under ``grad_norm/`` is a total rather than a layer."""
    return name == TOTAL or name.startswith(f"{TOTAL}-")


def nonfinite_count(metric: str) -> str:
    """The metric counting the NaN/inf values a histogram of ``metric`` left out: ``grad_hist_nonfinite``."""
    return f"{metric}_nonfinite"


def health_count(condition: str) -> str:
    """``grad_health/vanishing``: the layers flagged at a step."""
    return tag(GRAD_HEALTH, condition)


#: Multi-line charts of the custom-scalars layout, each a (title, tag regex) pair. The log10 charts exist because a
#: linear axis shows a layer at 1e-9 and one at 1e-3 both sitting on zero, which is exactly what vanishing looks like.
LAYOUT_CHARTS: dict[str, list[tuple[str, str]]] = {
    "gradmon": [
        ("gradient norm by layer", rf"{GRAD_NORM}/(?!{TOTAL}$|{TOTAL}-).*"),
        ("log10 gradient norm by layer", rf"{GRAD_NORM_LOG10}/.*"),
        ("update ratio by layer", rf"{UPDATE_RATIO}/.*"),
        ("log10 update ratio by layer", rf"{UPDATE_RATIO_LOG10}/.*"),
        ("weight norm by layer", rf"{WEIGHT_NORM}/.*"),
    ],
}


#: ActivationMonitor's charts: one per statistic, every module as a line; log10 beside the RMS, which spans orders of
#: magnitude through depth exactly when something is wrong.
ACTIVATION_CHARTS: dict[str, list[tuple[str, str]]] = {
    "gradmon activations": [
        ("log10 activation RMS by module", rf"{ACTIVATION_RMS_LOG10}/.*"),
        ("log10 activation gradient RMS by module", rf"{ACTIVATION_GRAD_RMS_LOG10}/.*"),
        ("dead fraction by module", rf"{DEAD_FRACTION}/.*"),
        ("saturated fraction by module", rf"{SATURATED_FRACTION}/.*"),
        ("mean activation slope by module", rf"{ACTIVATION_SLOPE}/.*"),
        ("activation RMS by module", rf"{ACTIVATION_RMS}/.*"),
        ("activation gradient RMS by module", rf"{ACTIVATION_GRAD_RMS}/.*"),
    ],
}


def prefixed_charts(
    prefix: str, charts: dict[str, list[tuple[str, str]]] = LAYOUT_CHARTS
) -> dict[str, list[tuple[str, str]]]:
    """``charts`` (by default :data:`LAYOUT_CHARTS`) for tags written behind a logger's prefix (``"x-"``)."""
    start = re.escape(prefix)
    return {category: [(title, start + regex) for title, regex in group] for category, group in charts.items()}


def for_model(charts: dict[str, list[tuple[str, str]]], model: str) -> dict[str, list[tuple[str, str]]]:
    """``charts`` with each category titled for ``model`` (``"gradmon · GPT, 50 layers"``).

    TensorBoard merges the layouts of every run in a logdir by category title, showing identical charts once: runs of
    one model share one set of charts, while the charts of another model in the same logdir (per-block bands of a
    transformer beside an MLP's layers) go in a category of their own instead of showing empty among this one's."""
    return {f"{category} · {model}": group for category, group in charts.items()}


#: A custom-scalars chart draws at most this many lines: beyond it, the lines cannot be told apart.
MAX_CHART_LINES = 12
# A layer inside a repeated structure: the name up to its block's number, with more of the name after it.
_BLOCK = re.compile(r"^(.*?\.\d+)\.")


def banded_charts(charts: dict[str, list[tuple[str, str]]], logged: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
    """``charts`` for a run that logged the tags ``logged`` (in logged order): a chart that matches none of them is
    left out, and one that matches more than :data:`MAX_CHART_LINES` is split into bands: per block for a repeated
    structure (``blocks.0``, ``blocks.1``, ... with the layers outside blocks in charts of their own), else into
    consecutive groups of layers in logged order, each titled by its first and last layer."""
    banded: dict[str, list[tuple[str, str]]] = {}
    for category, group in charts.items():
        rows = []
        for title, regex in group:
            pattern = re.compile(regex)
            matched = [tag for tag in logged if pattern.match(tag)]
            if len(matched) <= MAX_CHART_LINES:
                rows += [(title, regex)] if matched else []
                continue
            for label, members in _bands(matched):
                rows.append((f"{title}: {label}", "(?:" + "|".join(re.escape(tag) for tag in members) + ")$"))
        if rows:
            banded[category] = rows
    return banded


def _bands(tags_: list[str]) -> list[tuple[str, list[str]]]:
    """Groups of at most :data:`MAX_CHART_LINES` tags, by block where the layers repeat one, else by position."""
    blocks: dict[str, list[str]] = {}
    for tag in tags_:
        found = _BLOCK.match(tag.partition("/")[2])
        blocks.setdefault(found.group(1) if found else "", []).append(tag)
    outside = blocks.pop("", [])
    if len(blocks) >= 2 and all(len(members) <= MAX_CHART_LINES for members in blocks.values()):
        return list(blocks.items()) + _chunks(outside)
    return _chunks(tags_)


def _chunks(tags_: list[str]) -> list[tuple[str, list[str]]]:
    # As few charts as the limit allows, of even sizes: 17 layers are charted as 9 and 8, not 12 and 5.
    charts = math.ceil(len(tags_) / MAX_CHART_LINES)
    size = math.ceil(len(tags_) / charts) if charts else 1
    chunks = [tags_[i:i + size] for i in range(0, len(tags_), size)]
    return [(f"{c[0].partition('/')[2]} to {c[-1].partition('/')[2]}" if len(c) > 1 else c[0].partition("/")[2], c)
            for c in chunks]
