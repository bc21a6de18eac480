"""What the report draws and tabulates, shaped from a :class:`~gradmon.report.runs.Run`'s scalars: layer-by-step
matrices, each layer's norm at one step, the steps and layers GradHealthMonitor flagged, and a run's summary row."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np

from gradmon import tags
from gradmon.health import CONDITIONS
from gradmon.report.runs import _GRADMON_GROUPS, Run

#: The default ``metric``: a tag matching this (lower-cased) is an accuracy on validation data.
DEFAULT_METRIC_PATTERN = "val*acc*"
#: Without one, the first of these that a run logged (lower-cased): a validation loss (a language model's usual
#: measure), else any validation scalar.
FALLBACK_METRIC_PATTERNS = ("val*loss*", "val*")
#: Per-layer flags: ``grad_health_flag/<layer>`` = 1 + the index of the condition in CONDITIONS, at flagged steps.
FLAG_PREFIX = f"{tags.GRAD_HEALTH_FLAG}/"


def find_metric(run: Run, metric: str | None = None) -> str | None:
    """The tag of the summary's metric in ``run``.

    Args:
        run: The run.
        metric: The tag asked for; ``None`` for the default, the shortest tag matching ``val*acc*``
            case-insensitively (``val/acc`` before ``val/acc_top5``), else ``val*loss*``, else ``val*``.

    Returns:
        ``metric`` itself if the run logged it, else the default's match, else ``None``.
    """
    if metric is not None:
        return metric if metric in run.scalars else None
    for pattern in (DEFAULT_METRIC_PATTERN, *FALLBACK_METRIC_PATTERNS):
        found = [tag for tag in run.scalars if fnmatch.fnmatchcase(tag.lower(), pattern)]
        if found:
            return min(found, key=lambda tag: (len(tag), tag))
    return None


def layer_matrix(
    run: Run, prefix: str = f"{tags.GRAD_NORM_LOG10}/", index: str = f"{tags.GRAD_NORM}/", rounds: bool = False
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """One statistic of every layer at every step, as a matrix.

    Layers and steps are those of the ``index`` tags (by default the gradient norms, ``grad_norm/<layer>``), so a
    step at which a layer's value was left out (``grad_norm_log10`` skips a zero or non-finite norm) is a NaN rather
    than a missing column. Layers of ``index`` that never logged ``prefix`` are left out, unless ``prefix`` is
    ``index``'s own log10 (a layer whose norm was never finite keeps its grey row).

    Args:
        run: The run.
        prefix: The tag group of the values, with its ``/``.
        index: The tag group whose layers and steps make the rows and columns, with its ``/``.
        rounds: Make a column of each logging round rather than each step: consecutive steps at which disjoint sets of
            layers were logged (a GAN's generator and discriminator, each at its own optimizer's steps) are one
            column, at the round's first step, so that no layer is grey every other column.

    Returns:
        ``(layers, steps, values)``: ``values[i, j]`` is layer ``i``'s ``prefix`` value at ``steps[j]`` (with
        ``rounds``, in the round starting at ``steps[j]``).
    """
    layers = run.layers(index)
    steps = np.unique(np.concatenate([run.scalars[index + layer].steps for layer in layers]))
    if prefix.rstrip("/").removesuffix("_log10") != index.rstrip("/"):
        layers = [layer for layer in layers if prefix + layer in run.scalars]
    values = np.full((len(layers), len(steps)), np.nan)
    for i, layer in enumerate(layers):
        series = run.scalars.get(prefix + layer)
        if series is not None:
            values[i, np.searchsorted(steps, series.steps)] = series.values
    if rounds:
        logged = np.zeros(values.shape, dtype=bool)
        for i, layer in enumerate(layers):
            logged[i, np.searchsorted(steps, run.scalars[index + layer].steps)] = True
        starts = _round_starts(logged)
        merged = np.full((len(layers), len(starts)), np.nan)
        for j, column in enumerate(np.searchsorted(starts, np.arange(len(steps)), side="right") - 1):
            merged[logged[:, j], column] = values[logged[:, j], j]
        return layers, steps[starts], merged
    return layers, steps, values


def _round_starts(logged: np.ndarray) -> np.ndarray:
    """The columns of ``logged`` (layer x step) that start a logging round: a column whose layers overlap those
    logged since the round's start begins a new one."""
    starts, seen = [], np.zeros(logged.shape[0], dtype=bool)
    for j in range(logged.shape[1]):
        if not starts or (seen & logged[:, j]).any():
            starts.append(j)
            seen = np.zeros_like(seen)
        seen |= logged[:, j]
    return np.array(starts, dtype=np.int64)


def layer_norms(run: Run, index: int = -1) -> tuple[int, dict[str, float]]:
    """Every layer's gradient norm (``grad_norm/<layer>``) at one of its logged steps.

    Args:
        run: A run that logged gradient norms.
        index: Which logged step: the first (0) or the last (-1).

    Returns:
        ``(step, norms)``: the step, and the norms by layer in depth order.
    """
    layers = run.layers()
    step = int(run.scalars[tags.tag(tags.GRAD_NORM, layers[0])].steps[index])
    return step, {layer: float(run.scalars[tags.tag(tags.GRAD_NORM, layer)].values[index]) for layer in layers}


def flagged_steps(run: Run) -> dict[str, np.ndarray]:
    """The steps GradHealthMonitor flagged at least one layer at.

    Args:
        run: The run.

    Returns:
        Per condition GradHealthMonitor logged, the steps, sorted: from the per-step counts
        (``grad_health/<condition>`` > 0) and the per-layer flags (``grad_health_flag/<layer>``).
    """
    found: dict[str, list[np.ndarray]] = {}
    for condition in CONDITIONS:
        series = run.scalars.get(tags.health_count(condition))
        if series is not None:
            found.setdefault(condition, []).append(series.steps[series.values > 0])
    for per_condition in layer_flags(run).values():
        for condition, steps in per_condition.items():
            found.setdefault(condition, []).append(steps)
    return {c: np.unique(np.concatenate(found[c])) for c in CONDITIONS if c in found}


def layer_flags(run: Run) -> dict[str, dict[str, np.ndarray]]:
    """The steps GradHealthMonitor flagged each layer at.

    Args:
        run: The run.

    Returns:
        ``{layer: {condition: steps}}`` from ``grad_health_flag/<layer>`` (1 vanishing, 2 exploding, 3 non-finite);
        empty when the run did not log per-layer flags.
    """
    flags: dict[str, dict[str, np.ndarray]] = {}
    for layer in run.layers(FLAG_PREFIX):
        series = run.scalars[FLAG_PREFIX + layer]
        codes = np.rint(series.values)
        per_condition = {c: series.steps[codes == i + 1] for i, c in enumerate(CONDITIONS)}
        flags[layer] = {c: steps for c, steps in per_condition.items() if len(steps)}
    return flags


@dataclass
class HealthSummary:
    """What a run's health and gradient-check scalars say, for one row of ``summary.md``.

    ``metric`` is the tag the ``metric_value`` (its last logged value) was read from, ``None`` when the run has none.
    """

    last_step: int | None
    flagged_steps: dict[str, int]
    first_flagged: dict[str, int | None]
    skipped_steps: int | None
    gradcheck_max_rel_error: float | None
    metric: str | None = None
    metric_value: float | None = None
    #: Steps a GradScaler skipped for overflowing fp16 gradients (``grad_health/amp_overflow_steps``, its last value),
    #: ``None`` when the run had no GradScaler.
    amp_overflow_steps: int | None = None


def health_summary(run: Run, metric: str | None = None) -> HealthSummary:
    """The summary row of ``run``.

    Args:
        run: The run.
        metric: The metric's tag, as in :func:`find_metric`.

    Returns:
        What the run's health, gradient-check and metric scalars say.
    """
    flagged: dict[str, int] = {}
    first: dict[str, int | None] = {}
    for condition in CONDITIONS:
        series = run.scalars.get(tags.health_count(condition))
        hits = series.steps[series.values > 0] if series is not None else np.array([], dtype=np.int64)
        flagged[condition] = len(hits)
        first[condition] = int(hits[0]) if len(hits) else None
    steps = [int(s.steps.max()) for tag, s in run.scalars.items() if tag.split("/", 1)[0] in _GRADMON_GROUPS]
    skipped = run.scalars.get(tags.tag(tags.GRAD_HEALTH, tags.SKIPPED_STEPS))
    gradcheck = run.scalars.get(tags.GRADCHECK_MAX_REL_ERROR)
    overflows = run.scalars.get(tags.tag(tags.GRAD_HEALTH, tags.AMP_OVERFLOW_STEPS))
    tag = find_metric(run, metric)
    return HealthSummary(
        last_step=max(steps) if steps else None,
        flagged_steps=flagged,
        first_flagged=first,
        skipped_steps=int(skipped.last) if skipped is not None else None,
        gradcheck_max_rel_error=float(np.nanmax(gradcheck.values)) if gradcheck is not None else None,
        metric=tag,
        metric_value=run.scalars[tag].last if tag is not None else None,
        amp_overflow_steps=int(overflows.last) if overflows is not None else None,
    )
