"""Non-finite values: where NaN or inf first appear, and what made them."""

from __future__ import annotations

import math
from collections.abc import Sequence

from gradmon.activations import ModuleStats
from gradmon.diagnosis.evidence import Evidence, StepRecord
from gradmon.diagnosis.text import Finding, fmt
from gradmon.diagnosis.training import DRIFT

#: An earlier total gradient norm this large, or this many times the previous one, is a spike.
SPIKE_NORM = 1e4
SPIKE_FACTOR = 100.0
#: Inputs below this RMS cannot overflow a layer with finite weights in float32 or bfloat16.
MODERATE = 1e4


#: What keeps a non-finite update from landing, for the texts.
GUARD = "GradHealthMonitor(on_exploding='skip', on_nonfinite='skip') or gradient clipping"


def nonfinite_values(evidence: Evidence) -> Finding | None:
    """The first layer (in forward order) whose gradient, weights or output is NaN or inf, and what made it.

    An output that turns non-finite while its input and the weights are finite and moderate, or gradients that do
    while every output, the weights and the history are, come from an operation (log or sqrt at 0, division by 0):
    ``bad_op``. Weights already non-finite were overflowed by an earlier update; an output that overflows from a
    large input is ``activation_overflow``.
    """
    grads = evidence.grad_norms or {}
    known = {x.name for x in evidence.layers}
    order = [layer.name for layer in evidence.layers] + [n for n in grads if n not in known]
    bad_grads = [n for n in order if n in grads and not math.isfinite(grads[n])]
    bad_weights = [layer.name for layer in evidence.layers if not math.isfinite(layer.weight_rms)]
    overflow = next((s for s in evidence.activations if not math.isfinite(s.rms)), None)
    if not (bad_grads or bad_weights or overflow):
        return None
    first = bad_grads[0] if bad_grads else bad_weights[0] if bad_weights else overflow.name  # type: ignore[union-attr]
    spike = _spike(evidence.history)
    numbers: dict[str, float] = {}
    if spike is not None:
        numbers.update({"spike step": spike.step, "spike gradient norm": spike.grad_norm})
    if bad_weights:
        cause, why, try_, fix = _overflowed_weights(bad_weights[0], spike)
    elif overflow is not None:
        cause, why, try_, fix = _nonfinite_output(evidence, overflow, spike, numbers)
    elif spike is None and not _grown(evidence) and evidence.activations:
        cause, why, try_, fix = _nonfinite_behind_finite_outputs(evidence)
    elif spike is not None:
        cause, why, try_, fix = ("gradient_spike", f"gradients grew to a total norm of {fmt(spike.grad_norm)} at step "
                                 f"{spike.step}", f"{GUARD}, a smaller learning rate, or warm-up", {})
    else:
        cause, why, try_, fix = ("unknown", "no earlier sign in the observed steps (observe more often to see the "
                                 "steps before)", GUARD, {})
    what = f"first non-finite gradient in {first}" if bad_grads else f"non-finite values from {first}"
    layers = (first,) + ((overflow.name,) if overflow is not None and overflow.name != first else ())
    return Finding(evidence.step, "nonfinite", cause, layers, f"{what}; {why}", try_, numbers, fix, "values")


_Cause = tuple[str, str, str, dict]


def _overflowed_weights(layer: str, spike: StepRecord | None) -> _Cause:
    why = f"the weights of {layer} are already non-finite: an earlier update overflowed them" + (
        f", after a total gradient norm of {fmt(spike.grad_norm)} at step {spike.step}" if spike else "")
    try_ = f"stop such a step before it lands ({GUARD}), then remove what made the gradients large"
    return ("gradient_spike" if spike is not None else "unknown"), why, try_, {}


def _nonfinite_output(
    evidence: Evidence, overflow: ModuleStats, spike: StepRecord | None, numbers: dict[str, float],
) -> _Cause:
    """A module's output is non-finite: made by an operation from a moderate input, or an overflow of a large one."""
    before = evidence.input_of(overflow.name)
    numbers["non-finite output RMS"] = overflow.rms
    if before is not None:
        numbers["input RMS"] = before.rms
    calm = spike is None and not _grown(evidence)
    if calm and (before is None or math.isfinite(before.rms) and before.rms < MODERATE):
        source = (f"its input ({before.name}, RMS {fmt(before.rms)})" if before is not None
                  else "it is the first module observed, so its input is the batch or what the forward did to it")
        between = f"between {before.name} and it" if before is not None else "before it (or the batch itself)"
        why = (f"the output of {overflow.name} is non-finite while {source} and every weight are finite and "
               f"moderate: an operation in {overflow.name} or {between} makes NaN or inf from finite values (a "
               "division by zero, log or sqrt of zero or of a negative)")
        return "bad_op", why, "guard that operation: x / (y + eps), log(x + eps), clamp before sqrt", {"guard": True}
    why = f"the forward pass overflowed first at {overflow.name}" + (
        f", after {before.name} (RMS {fmt(before.rms)})" if before is not None else "") + (
        f"; the total gradient norm was {fmt(spike.grad_norm)} at step {spike.step}" if spike else "")
    try_ = ("keep activations in range: normalisation, a smaller init scale or learning rate; under fp16, bf16 or a "
            "loss scale")
    return "activation_overflow", why, try_, {}


def _nonfinite_behind_finite_outputs(evidence: Evidence) -> _Cause:
    """Gradients non-finite behind finite outputs and weights, with no growth before: an operation in the loss."""
    loss = "the loss is finite" if math.isfinite(evidence.loss) else f"the loss is {evidence.loss}"
    why = (f"every module's output, the weights and the earlier gradients are finite and {loss}, yet the gradient is "
           "not: an operation after the last module or in the loss makes inf from finite values or has an infinite "
           "derivative where it is evaluated (log or sqrt at 0, a division by zero; most often the log of a softmax "
           "that underflowed)")
    try_ = "guard that operation: log_softmax instead of log(softmax), log(x + eps), x / (y + eps)"
    return "bad_op", why, try_, {"guard": True}


def _spike(history: Sequence[StepRecord]) -> StepRecord | None:
    """The latest earlier step whose total gradient norm was huge, non-finite or a jump over the one before."""
    for i in range(len(history) - 1, -1, -1):
        record = history[i]
        previous = history[i - 1].grad_norm if i else math.nan
        norm = record.grad_norm
        if not math.isfinite(norm) or norm >= SPIKE_NORM or (previous > 0 and norm >= SPIKE_FACTOR * previous):
            return record
    return None


def _grown(evidence: Evidence) -> bool:
    growth = [r.weight_growth for r in evidence.history if math.isfinite(r.weight_growth)]
    return any(g > DRIFT for g in growth)

