"""Units stuck at a limit: bounded activations saturated, ReLUs that never fire, and what put them there."""

from __future__ import annotations

import math
from collections.abc import Sequence

from gradmon.diagnosis.evidence import Evidence
from gradmon.diagnosis.scale import init_off, median_fan_in, median_needed_gain
from gradmon.diagnosis.text import Finding, fmt, suggested_init
from gradmon.diagnosis.training import lr_finding, weight_drift

#: A bounded activation saturated in at least this fraction of its outputs is a finding.
SATURATED_LIMIT = 0.5
#: A ReLU-like module with at least this fraction of dead units is a finding.
DEAD_LIMIT = 0.5
#: Biases below this many times the output RMS of their layer hold most units below zero.
NEGATIVE_BIAS = -0.5


def saturated_units(evidence: Evidence, found: Sequence[Finding]) -> list[Finding]:
    """Bounded activations saturated (slope below 1% of its largest) in at least :data:`SATURATED_LIMIT` of their
    outputs. Not a cause of its own when the gradient grows on its way back (a saturated unit passes back little,
    so something else makes it grow): then the init or the learning rate found beside it is the cause."""
    saturated = [s for s in evidence.activations if (s.saturated_fraction or 0.0) >= SATURATED_LIMIT]
    if not saturated or any(f.condition == "backward_decay" and f.cause == "saturating_activation" for f in found):
        return []
    worst = max(saturated, key=lambda s: s.saturated_fraction or 0.0)
    before = evidence.input_of(worst.name)
    numbers = {"saturated fraction": worst.saturated_fraction or 0.0}
    inputs = ""
    if before is not None:
        numbers["input RMS"] = before.rms
        inputs = f" (its input has RMS {fmt(before.rms)})"
    names = tuple(s.name for s in saturated)
    what = (f"{len(saturated)} {worst.kind} module(s) saturated (slope below 1% of its largest), {worst.name} in "
            f"{worst.saturated_fraction:.0%} of its outputs{inputs}")
    growing = any(f.condition in ("backward_growth", "forward_growth") for f in found)
    hidden = [layer for layer in evidence.layers if layer.activation is not None and math.isfinite(layer.gain)]
    off = init_off(evidence, hidden)
    if off is not None and off > 1 and weight_drift(evidence, hidden) is None:
        init, try_init = suggested_init(worst.kind, median_needed_gain(hidden), median_fan_in(hidden))
        return [Finding(
            evidence.step, "saturation", "init_too_large", names,
            f"{what}: the weights were initialised at {fmt(off)}x the scale {worst.kind} needs, which drives its "
            "inputs into the flat tails", try_init, dict(numbers, **{"initial weight RMS / needed": off}),
            {"init": init}, "activations",
        )]
    if growing:
        return []
    return [Finding(
        evidence.step, "saturation", "saturating_activation", names,
        f"{what}: a saturated unit passes back almost no gradient",
        "smaller pre-activations: normalisation before the activation, or a non-saturating activation", numbers,
        {"activation": "relu", "init": "kaiming_normal(nonlinearity='relu')"}, "activations",
    )]


def dead_units(evidence: Evidence, found: Sequence[Finding]) -> list[Finding]:
    """ReLU-like modules with at least :data:`DEAD_LIMIT` of their units zero for the whole batch, and why.

    Biases negative from the start and large against their layer's output hold the units below zero: ``dead_relu``
    (zero biases fix it). Biases or weights that training pushed there are the learning rate's doing. Units dead
    behind a signal that already vanished, or that a finding beside it explains, are its consequence and not
    reported here.
    """
    dead = [s for s in evidence.activations if (s.dead_fraction or 0.0) >= DEAD_LIMIT]
    if not dead or any(f.condition in ("forward_decay", "backward_decay") for f in found):
        return []
    worst = max(dead, key=lambda s: s.dead_fraction or 0.0)
    numbers: dict[str, float] = {"dead fraction": worst.dead_fraction or 0.0}
    names = tuple(s.name for s in dead)
    what = (f"{worst.dead_fraction:.0%} of the units of {worst.name} are zero for the whole batch"
            + (f" ({len(dead)} ReLU modules with half or more dead)" if len(dead) > 1 else "")
            + " and pass back no gradient")
    # The first dead module in forward order: those after it may be dead only because it passes them nothing.
    feeding = evidence.input_of(dead[0].name)
    info = next((layer for layer in evidence.layers if feeding is not None and layer.name == feeding.name), None)
    bias = info.bias_mean if info is not None else None
    initial_bias = (evidence.initial_bias_mean or {}).get(info.name) if info is not None else None
    negative = feeding is not None and bias is not None and bias < NEGATIVE_BIAS * feeding.rms
    hidden = [layer for layer in evidence.layers if layer.activation is not None]
    drift = weight_drift(evidence, hidden)
    if negative and (initial_bias is None or initial_bias < NEGATIVE_BIAS * feeding.rms):  # type: ignore[union-attr]
        numbers["bias mean before"] = bias  # type: ignore[assignment]
        return [Finding(
            evidence.step, "dead_units", "dead_relu", names,
            f"{what}: the biases of {feeding.name} are negative (mean {fmt(bias)}"  # type: ignore[union-attr]
            + (f", {fmt(initial_bias)} at the start" if initial_bias is not None else "")
            + f") and hold its outputs below zero for every example (output RMS {fmt(feeding.rms)})",  # type: ignore
            "biases initialised at zero (gradmon.WeightInit(..., bias=0.0))", numbers, {"bias": 0.0}, "activations",
        )]
    if negative or (drift is not None and drift > 1):
        if negative:
            numbers["bias mean before"] = bias  # type: ignore[assignment]
            numbers["bias mean at start"] = initial_bias  # type: ignore[assignment]
            why = (f"the biases of {feeding.name} went from {fmt(initial_bias)} at the start to {fmt(bias)}: "  # type: ignore
                   "large updates pushed the pre-activations below zero")
        else:
            numbers["weight RMS change since start"] = drift  # type: ignore[assignment]
            why = f"the weights' RMS grew {fmt(drift)}x since the start: large updates"  # type: ignore[arg-type]
        return [lr_finding(evidence, "dead_units", names, f"{what}: {why}", numbers, "activations")]
    return [Finding(
        evidence.step, "dead_units", "unknown", names,
        f"{what}; the biases are not negative and the weights did not grow, so no cause is established",
        "LeakyReLU or GELU, which pass back a gradient below zero; check the inputs of "
        + (feeding.name if feeding is not None else dead[0].name), numbers, {}, "activations",
    )]

