"""The rules: one function per cause, each reading :class:`~gradmon.diagnosis.evidence.Evidence` and returning the
findings it supports. Every threshold is a module constant with the reason for its value.

- :func:`nonfinite_values`: where NaN or inf first appear, and what made them (an operation on finite inputs, an
  overflowing activation, weights an earlier update overflowed).
- :func:`signal_through_depth`: the forward signal and the gradient fitted through depth, read against the scale
  the weights need (init too small, too large, a gain mismatch, saturating activations).
- :func:`recurrent_scale`: recurrent weights whose gain makes the gradient grow through time.
- :func:`saturated_units` and :func:`dead_units`: bounded activations stuck at their limits, ReLUs that never fire.
- :func:`learning_rate`: the update ratio read as the optimizer makes it (SGD moves a weight by lr x gradient, Adam by
  about lr), and divergence over the observed steps (the loss rising, the weights growing while it does not fall).

A rule reports a cause only when its own evidence supports it; when the evidence is ambiguous it reports the cause
``"unknown"`` with what was measured. Which finding is the root and which are its consequences is for
:mod:`gradmon.diagnosis.verdict`.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence

from gradmon.diagnosis.evidence import (
    DEPTH_CHANGE,
    DEPTH_FACTOR,
    DEPTH_MIN_LAYERS,
    Evidence,
    LayerInfo,
    StepRecord,
    Trend,
    depth_trend,
)
from gradmon.diagnosis.text import Finding, fmt, round_lr, suggested_init
from gradmon.init_spec import format_scheme

#: A change through depth that nothing in the evidence explains is reported only beyond this factor: trained healthy
#: nets drift by 10x at times (a kaiming ReLU net a few steps in), while a broken one is off by orders of magnitude.
UNEXPLAINED_CHANGE = 100.0
#: Weights within this factor of the RMS their fan-in and activation need are at the right scale.
SCALE_TOLERANCE = 1.18
#: Weights whose gain is within this fraction of a standard scheme's are taken for that scheme.
GAIN_MATCH = 0.15
#: Weights whose RMS moved more than this factor since the start were moved by training, not by the init.
DRIFT = 2.0
#: A backward signal shrinking through bounded activations whose mean slope is below this is their slope bound.
SLOPE_LIMIT = 0.5
#: A bounded activation saturated in at least this fraction of its outputs is a finding.
SATURATED_LIMIT = 0.5
#: A ReLU-like module with at least this fraction of dead units is a finding.
DEAD_LIMIT = 0.5
#: Biases below this many times the output RMS of their layer hold most units below zero.
NEGATIVE_BIAS = -0.5
#: SGD: a median update ratio above this moves the weights by a tenth of their norm in one step, a hundredfold the
#: usual ~1e-3. Adam-like optimizers move each weight by about lr whatever the gradient, so for them the ratio only
#: says lr / RMS(w) (0.15 for a healthy GPT at lr 3e-3 with weights of RMS 0.02): they are judged by divergence.
UPDATE_RATIO_HIGH = 0.1
#: A median update ratio below this is a hundredfold below the usual ~1e-3, for any optimizer.
UPDATE_RATIO_LOW = 1e-5
#: A median update ratio below this (5x below the usual ~1e-3; healthy runs of the diagnosis zoo stay above 4.8e-4)
#: at :data:`SLOW_STEPS` observed steps in a row, while the loss stays above :data:`LOSS_SLOW` of its first value:
#: training crawls.
UPDATE_RATIO_SLOW = 2e-4
SLOW_STEPS = 3
LOSS_SLOW = 0.8
#: The update ratio a suggested learning rate aims at: within the healthy runs' range (2e-3 to 1e-2 on SGD; for an
#: Adam-like optimizer, ADAPTIVE_STEP).
TARGET_RATIO = 1e-2
#: The loss this many times its first observed value: the run diverges (a healthy run's loss falls from the start).
LOSS_RISE = 1.5
#: Weights grown DRIFT-fold while the loss stays above this fraction of its first value: growth that buys nothing.
LOSS_STALL = 0.95
#: For an Adam-like optimizer, the suggested learning rate moves each weight by this fraction of the weights' initial
#: RMS per step (1e-3 for a GPT initialised N(0, 0.02)), and at most a tenth of the learning rate that diverged.
ADAPTIVE_STEP = 0.05
#: Warm-up suggested for a post-LN transformer that broke down without one: over this many times the steps it took
#: to break down (the ramp must span the phase that broke it several times over), and at least WARMUP_MIN steps.
WARMUP_SPAN = 3
WARMUP_MIN = 20
#: In a net with normalisation layers, whose scale the depth rule cannot read, a gradient at the first quarter of the
#: layers below this fraction of the last quarter's, once the weights grew DRIFT-fold, is a collapse the updates made
#: (the normalisation divides by activations that grew). Healthy recurrent and convolutional nets of the zoo stay
#: above 3e-2.
GRADIENT_COLLAPSE = 1e-2
#: A recurrent layer whose hidden-to-hidden gain (about its spectral radius) is above this makes the gradient grow
#: through time; PyTorch's default is 0.58, orthogonal 1.
RECURRENT_GAIN = 2.0
#: An earlier total gradient norm this large, or this many times the previous one, is a spike.
SPIKE_NORM = 1e4
SPIKE_FACTOR = 100.0
#: Inputs below this RMS cannot overflow a layer with finite weights in float32 or bfloat16.
MODERATE = 1e4

#: Gains of the standard schemes, by what they are made for: weights at one of these were initialised for it.
SCHEME_GAINS: dict[str, float] = {
    "gain 1 (Xavier or LeCun: linear, sigmoid)": 1.0,
    "gain sqrt(2) (kaiming for ReLU)": math.sqrt(2.0),
    "gain 5/3 (for tanh)": 5.0 / 3.0,
    "gain 3/4 (for SELU)": 0.75,
}
#: PyTorch's own init for Linear and Conv (kaiming_uniform with a = sqrt(5)): RMS 1 / sqrt(3 fan_in).
TORCH_DEFAULT_GAIN = 1.0 / math.sqrt(3.0)
_LARGEST_SLOPE = {"Sigmoid": 0.25, "Hardsigmoid": 1.0 / 6.0}


def diagnose(evidence: Evidence) -> list[Finding]:
    """The findings of one step, the most severe first: non-finite values, the signal through depth, recurrent
    weights, saturated and dead units, the learning rate. A healthy step gives an empty list.

    Args:
        evidence: What the step offers.

    Returns:
        The findings; their roots and consequences are sorted out by :class:`gradmon.diagnosis.Diagnosis`.
    """
    nonfinite = nonfinite_values(evidence)
    if nonfinite is not None:
        return [nonfinite]
    findings = signal_through_depth(evidence)
    findings += collapse_behind_norms(evidence)
    findings += recurrent_scale(evidence)
    findings += saturated_units(evidence, findings)
    findings += dead_units(evidence, findings)
    findings += learning_rate(evidence, findings)
    return findings


# ---------------------------------------------------------------------------------------------------------------
# Non-finite values
# ---------------------------------------------------------------------------------------------------------------


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
    calm = spike is None and not _grown(evidence)
    numbers: dict[str, float] = {}
    if spike is not None:
        numbers.update({"spike step": spike.step, "spike gradient norm": spike.grad_norm})
    guard = "GradHealthMonitor(on_exploding='skip', on_nonfinite='skip') or gradient clipping"
    what = f"first non-finite gradient in {first}" if bad_grads else f"non-finite values from {first}"
    fix: dict[str, object] = {}
    if bad_weights:
        cause = "gradient_spike" if spike is not None else "unknown"
        why = f"the weights of {bad_weights[0]} are already non-finite: an earlier update overflowed them" + (
            f", after a total gradient norm of {fmt(spike.grad_norm)} at step {spike.step}" if spike else "")
        try_ = f"stop such a step before it lands ({guard}), then remove what made the gradients large"
    elif overflow is not None:
        before = evidence.input_of(overflow.name)
        numbers["non-finite output RMS"] = overflow.rms
        if before is not None:
            numbers["input RMS"] = before.rms
        if calm and (before is None or math.isfinite(before.rms) and before.rms < MODERATE):
            cause = "bad_op"
            source = (f"its input ({before.name}, RMS {fmt(before.rms)})" if before is not None
                      else "it is the first module observed, so its input is the batch or what the forward did to it")
            between = f"between {before.name} and it" if before is not None else "before it (or the batch itself)"
            why = (f"the output of {overflow.name} is non-finite while {source} and every weight are finite and "
                   f"moderate: an operation in {overflow.name} or {between} makes NaN or inf from finite values (a "
                   "division by zero, log or sqrt of zero or of a negative)")
            try_ = "guard that operation: x / (y + eps), log(x + eps), clamp before sqrt"
            fix = {"guard": True}
        else:
            cause = "activation_overflow"
            why = f"the forward pass overflowed first at {overflow.name}" + (
                f", after {before.name} (RMS {fmt(before.rms)})" if before is not None else "") + (
                f"; the total gradient norm was {fmt(spike.grad_norm)} at step {spike.step}" if spike else "")
            try_ = ("keep activations in range: normalisation, a smaller init scale or learning rate; under fp16, "
                    "bf16 or a loss scale")
    elif calm and evidence.activations:
        cause = "bad_op"
        loss = "the loss is finite" if math.isfinite(evidence.loss) else f"the loss is {evidence.loss}"
        why = (f"every module's output, the weights and the earlier gradients are finite and {loss}, yet the gradient "
               "is not: an operation after the last module or in the loss makes inf from finite values or has an "
               "infinite derivative where it is evaluated (log or sqrt at 0, a division by zero; most often the log "
               "of a softmax that underflowed)")
        try_ = "guard that operation: log_softmax instead of log(softmax), log(x + eps), x / (y + eps)"
        fix = {"guard": True}
    elif spike is not None:
        cause = "gradient_spike"
        why = f"gradients grew to a total norm of {fmt(spike.grad_norm)} at step {spike.step}"
        try_ = f"{guard}, a smaller learning rate, or warm-up"
    else:
        cause = "unknown"
        why = "no earlier sign in the observed steps (observe more often to see the steps before)"
        try_ = guard
    layers = (first,) + ((overflow.name,) if overflow is not None and overflow.name != first else ())
    return Finding(evidence.step, "nonfinite", cause, layers, f"{what}; {why}", try_, numbers, fix, "values")


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


# ---------------------------------------------------------------------------------------------------------------
# The signal through depth
# ---------------------------------------------------------------------------------------------------------------


def signal_through_depth(evidence: Evidence) -> list[Finding]:
    """The forward signal, else the gradient, changing steadily through depth, and why.

    Over the weight layers' outputs in forward order (at least :data:`DEPTH_MIN_LAYERS`, no normalisation layer
    among them), log10 of the output RMS is fitted against depth; a change of :data:`DEPTH_CHANGE` overall at
    :data:`DEPTH_FACTOR` per layer is a trend. Without activation statistics the trend is predicted from the
    weights for activations whose effect follows from them (ReLU-like; the sigmoid's slope bound).
    """
    layers = list(evidence.layers)
    if len(layers) < DEPTH_MIN_LAYERS or any(layer.normalized for layer in layers):
        return []
    stats = evidence.stats
    measured = [layer for layer in layers if layer.name in stats]
    if len(measured) < DEPTH_MIN_LAYERS:
        return _predicted(evidence)
    names = [layer.name for layer in measured]
    forward = depth_trend(names, [stats[n].rms for n in names])
    back_names = [n for n in names if stats[n].grad_rms is not None]
    # Read from the output back to the input: a factor below 1 means the gradient shrinks on its way back.
    backward = depth_trend(back_names[::-1], [stats[n].grad_rms for n in back_names][::-1])  # type: ignore[misc]
    if forward is not None:
        condition = "forward_decay" if forward.factor < 1 else "forward_growth"
        finding = _scale_finding(evidence, condition, forward, backward, measured)
        trend = forward
    elif backward is not None:
        condition = "backward_decay" if backward.factor < 1 else "backward_growth"
        finding = _backward_finding(evidence, condition, backward, measured)
        trend = backward
    else:
        return []
    if finding.cause == "unknown" and 1 / UNEXPLAINED_CHANGE < trend.change < UNEXPLAINED_CHANGE:
        return []
    return [finding]


def _predicted(evidence: Evidence) -> list[Finding]:
    """The signal through depth as the weights and the activations' types imply it, without measurements."""
    hidden = [layer for layer in evidence.layers if layer.activation is not None]
    if len(hidden) + 1 < DEPTH_MIN_LAYERS:
        return []
    names = tuple(layer.name for layer in evidence.layers)
    if all(layer.homogeneous and layer.needed_gain for layer in hidden):
        factor = statistics.median(layer.gain / layer.needed_gain for layer in hidden  # type: ignore[operator]
                                   if math.isfinite(layer.gain))
        change = factor ** len(hidden)
        if not (1 / DEPTH_CHANGE < change < DEPTH_CHANGE) and abs(math.log10(factor)) >= math.log10(DEPTH_FACTOR):
            trend = Trend(names, factor, change, math.nan, math.nan)
            condition = "forward_decay" if factor < 1 else "forward_growth"
            return [_scale_finding(evidence, condition, trend, None, list(evidence.layers), predicted=True)]
    kind, count = Counter(layer.activation for layer in hidden).most_common(1)[0]
    if kind in _LARGEST_SLOPE and count + 1 >= DEPTH_MIN_LAYERS:
        gain = statistics.median(layer.gain for layer in hidden)
        factor = _LARGEST_SLOPE[kind] * gain
        if factor**count < 1 / DEPTH_CHANGE:
            trend = Trend(names[::-1], factor, factor**count, math.nan, math.nan)
            return [_saturating(evidence, "backward_decay", trend, kind, _LARGEST_SLOPE[kind], count,
                                predicted=True)]
    return _gradient_norm_trend(evidence, hidden)


def _gradient_norm_trend(evidence: Evidence, hidden: list[LayerInfo]) -> list[Finding]:
    """Without activation statistics, the hidden layers' gradient norms read from the output back to the input: a
    change beyond :data:`UNEXPLAINED_CHANGE` the same way as the initial weights are off their activations' scale
    (a tanh net initialised N(0, 1), whose gradient grows toward the input) is the init's."""
    grads = evidence.grad_norms or {}
    named = [layer for layer in hidden if math.isfinite(grads.get(layer.name, math.nan)) and grads[layer.name] > 0]
    if len(named) < DEPTH_MIN_LAYERS:
        return []
    back = depth_trend([layer.name for layer in named][::-1], [grads[layer.name] for layer in named][::-1])
    off = _init_off(evidence, named)
    if back is None or off is None or (back.factor > 1) != (off > 1):
        return []
    if 1 / UNEXPLAINED_CHANGE < back.change < UNEXPLAINED_CHANGE:
        return []
    condition = "backward_growth" if back.factor > 1 else "backward_decay"
    over = (f"the layers' gradient norms {'grow' if back.factor > 1 else 'shrink'} by {fmt(back.factor)} per layer "
            f"from {back.layers[0]} back to {back.layers[-1]}, {fmt(back.change)}x")
    numbers = {"gradient norm factor per layer back": back.factor}
    return [_init_finding(evidence, condition, named, "passes back a gradient that changes steadily", over, numbers,
                          "weights", back.layers)]


def _initial(evidence: Evidence, layer: LayerInfo) -> LayerInfo:
    """``layer`` with the weight RMS it had at the start: the init is judged by the weights it made."""
    rms = (evidence.initial_weight_rms or {}).get(layer.name)
    if rms is None or not math.isfinite(rms) or rms <= 0:
        return layer
    return LayerInfo(layer.name, layer.kind, layer.fan_in, rms, layer.activation, layer.needed_gain,
                     layer.normalized, layer.homogeneous, layer.bias_mean)


def _drift(evidence: Evidence, layers: Sequence[LayerInfo]) -> float | None:
    """The median factor the weights' RMS moved by since the start, when beyond :data:`DRIFT`."""
    initial = evidence.initial_weight_rms or {}
    moves = [layer.weight_rms / initial[layer.name] for layer in layers
             if initial.get(layer.name, 0) > 0 and math.isfinite(initial[layer.name])]
    if not moves:
        return None
    move = statistics.median(moves)
    return move if not 1 / DRIFT <= move <= DRIFT else None


def _scale_finding(
    evidence: Evidence, condition: str, forward: Trend, backward: Trend | None, layers: list[LayerInfo],
    predicted: bool = False,
) -> Finding:
    """The signal shrinks or grows through depth: which of init scale, gain or training moved the weights."""
    basis = "weights" if predicted else "activations"
    hidden = [layer for layer in layers if layer.activation is not None and math.isfinite(layer.gain)]
    numbers = {"forward factor per layer": forward.factor, "forward change": forward.change}
    if backward is not None:
        numbers["gradient factor per layer back"] = backward.factor
    verb = "is predicted to " if predicted else ""
    how = (
        f"{verb}{'keep' if predicted else 'keeps'} {forward.factor:.2g} of the forward signal" if forward.factor < 1
        else f"{verb}{'multiply' if predicted else 'multiplies'} the forward signal by {forward.factor:.2g}"
    )
    over = f"{fmt(forward.change)}x over {len(forward.layers)} layers"
    if not predicted:
        over += (f" (output RMS {fmt(forward.first)} at {forward.layers[0]}, {fmt(forward.last)} at "
                 f"{forward.layers[-1]})")
    if backward is not None:
        moves = "keeps" if backward.factor < 1 else "grows by"
        over += f", and the gradient {moves} {fmt(backward.factor)} per layer on its way back"
    drift = _drift(evidence, hidden)
    if drift is not None:
        numbers["weight RMS change since start"] = drift
        if drift > 1:
            return _lr_finding(
                evidence, condition, forward.layers,
                f"the weights' RMS grew {fmt(drift)}x since the start of training, and each layer now {how}: {over}",
                numbers, basis,
            )
        return Finding(
            evidence.step, condition, "unknown", forward.layers,
            f"the weights' RMS shrank {fmt(1 / drift)}x since the start of training (weight decay?), and each layer "
            f"now {how}: {over}", "less weight decay; check what shrinks the weights", numbers, {}, basis,
        )
    if not hidden:
        return Finding(
            evidence.step, condition, "unknown", forward.layers,
            f"each layer {how}: {over}, and no activation module tells what the weights' scale should be",
            "check each layer's init for its fan-in and activation; normalisation layers keep the scale", numbers,
            {}, basis,
        )
    return _init_finding(evidence, condition, hidden, how, over, numbers, basis, forward.layers)


def _init_finding(
    evidence: Evidence, condition: str, hidden: list[LayerInfo], how: str, over: str, numbers: dict[str, float],
    basis: str, layers: tuple[str, ...],
) -> Finding:
    """The weights' initial gain against what the activation needs: too small, too large, a gain mismatch, or
    right (then the cause is not the init)."""
    initial = [_initial(evidence, layer) for layer in hidden]
    gain = statistics.median(layer.gain for layer in initial)
    needs_known = [layer.needed_gain for layer in initial if layer.needed_gain]
    need = statistics.median(needs_known) if needs_known else 1.0  # type: ignore[type-var]
    activation = Counter(layer.activation for layer in initial).most_common(1)[0][0] or "no activation"
    fan_in = int(statistics.median(layer.fan_in for layer in initial))
    numbers.update({"initial weight gain": gain, "needed gain": need, "initial weight RMS / needed": gain / need})
    scheme = _scheme(evidence, initial)
    weights = (
        f"weights initialised at RMS {fmt(gain / math.sqrt(fan_in))} = {gain:.2f}/sqrt(fan_in {fan_in})"
        + (f" ({scheme})" if scheme else "")
    )
    needs = f"gain {need:.2f} (RMS {fmt(need / math.sqrt(fan_in))} at fan_in {fan_in})"
    if abs(math.log(gain / need)) <= math.log(SCALE_TOLERANCE):
        return Finding(
            evidence.step, condition, "unknown", layers,
            f"{weights} are what {activation} needs, {needs}, yet each layer {how}: {over}",
            "look for a layer that rescales its output (a constant factor, pooling, a residual sum)", numbers, {},
            basis,
        )
    init, try_init = suggested_init(activation, need, fan_in)
    matched = next((label for label, g in SCHEME_GAINS.items() if abs(gain / g - 1) <= GAIN_MATCH), None)
    if matched is not None and abs(need / SCHEME_GAINS[matched] - 1) > GAIN_MATCH:
        return Finding(
            evidence.step, condition, "gain_mismatch", layers,
            f"{weights} are scaled for {matched}, but {activation} needs {needs}: each layer {how}: {over}",
            try_init, numbers, {"init": init}, basis,
        )
    torch_default = abs(gain / TORCH_DEFAULT_GAIN - 1) <= GAIN_MATCH
    default = " are PyTorch's default init (RMS 1/sqrt(3 fan_in)) and" if torch_default else " are"
    return Finding(
        evidence.step, condition, "init_too_small" if gain < need else "init_too_large", layers,
        f"{weights}{default} {fmt(gain / need)}x the {needs} {activation} needs: each layer {how}: {over}",
        try_init, numbers, {"init": init}, basis,
    )


def _backward_finding(evidence: Evidence, condition: str, backward: Trend, layers: list[LayerInfo]) -> Finding:
    """The gradient shrinks or grows on its way back while the forward signal keeps a steady scale."""
    numbers = {"gradient factor per layer back": backward.factor, "gradient change back": backward.change}
    over = (
        f"the gradient {'keeps' if backward.factor < 1 else 'grows by'} {fmt(backward.factor)} per layer on its way "
        f"back, {fmt(backward.change)}x from {backward.layers[0]} to {backward.layers[-1]}"
    )
    if condition == "backward_decay":
        bounded = [s for s in evidence.activations if s.slope is not None and math.isfinite(s.slope)]
        if bounded:
            slope = math.exp(statistics.fmean(math.log(max(s.slope or 0.0, 1e-30)) for s in bounded))
            if slope < SLOPE_LIMIT:
                kind = Counter(s.kind for s in bounded).most_common(1)[0][0]
                return _saturating(evidence, condition, backward, kind, slope, len(bounded), numbers=numbers)
    hidden = [layer for layer in layers if layer.activation is not None and math.isfinite(layer.gain)]
    off = _init_off(evidence, hidden)
    large = not 1 / UNEXPLAINED_CHANGE < backward.change < UNEXPLAINED_CHANGE
    if large and off is not None and (off > 1) == (condition == "backward_growth"):
        # Weights far from the scale their activation needs explain a gradient that moves the same way.
        return _init_finding(evidence, condition, hidden, "passes back a gradient that changes steadily", over,
                             numbers, "activations", backward.layers)
    return Finding(
        evidence.step, condition, "unknown", backward.layers,
        f"{over}, while the forward signal keeps its scale and the weights are at the scale their activations need;"
        " no cause established", "look for a layer whose backward rescales the gradient", numbers, {}, "activations",
    )


def _init_off(evidence: Evidence, hidden: list[LayerInfo]) -> float | None:
    """The initial weights' gain over the gain their activations need, when outside :data:`SCALE_TOLERANCE`
    (squared: a gain a little off is the activations' business, not the init's)."""
    initial = [_initial(evidence, layer) for layer in hidden if layer.needed_gain]
    if not initial:
        return None
    off = statistics.median(layer.gain / layer.needed_gain for layer in initial)  # type: ignore[operator]
    return off if abs(math.log(off)) > 2 * math.log(SCALE_TOLERANCE) else None


def _saturating(
    evidence: Evidence, condition: str, backward: Trend, kind: str, slope: float, count: int,
    predicted: bool = False, numbers: Mapping[str, float] | None = None,
) -> Finding:
    largest = _LARGEST_SLOPE.get(kind, 1.0)
    bound = f"at most {largest:.2g}" if predicted else f"at most {largest:.2g}, on average {slope:.2g} here"
    return Finding(
        evidence.step, condition, "saturating_activation", backward.layers,
        f"{kind}'s slope is {bound}, so each of the {count} {kind} layers passes back about "
        f"{fmt(backward.factor)} of the gradient: {fmt(backward.change)}x by {backward.layers[-1]}"
        + (" (predicted from the slope bound)" if predicted else ""),
        f"a non-saturating activation in the hidden layers (ReLU with kaiming_normal(nonlinearity='relu'), or "
        f"GELU), or normalisation or residual connections between the {kind} layers; keep {kind} for outputs and gates",
        dict(numbers or {}, **{"mean slope": slope, "largest slope": largest}),
        {"activation": "relu", "init": "kaiming_normal(nonlinearity='relu')"},
        "weights" if predicted else "activations",
    )


def _scheme(evidence: Evidence, layers: Sequence[LayerInfo]) -> str | None:
    records = [evidence.init[layer.name] for layer in layers if evidence.init and layer.name in evidence.init]
    if not records:
        return None
    scheme = Counter(format_scheme(r.scheme, r.arguments) for r in records).most_common(1)[0][0]
    return f"initialised {scheme}"


# ---------------------------------------------------------------------------------------------------------------
# Recurrent weights, saturated and dead units
# ---------------------------------------------------------------------------------------------------------------


def collapse_behind_norms(evidence: Evidence) -> list[Finding]:
    """In a net with normalisation layers (where :func:`signal_through_depth` cannot read the scale), weights grown
    :data:`DRIFT`-fold and a gradient at the first quarter of the layers (in registration order) below
    :data:`GRADIENT_COLLAPSE` of the last quarter's: the updates were too large (a post-LN transformer on an
    Adam-like optimizer without warm-up: no warm-up)."""
    grads = [(name, v) for name, v in (evidence.grad_norms or {}).items() if math.isfinite(v)]
    if not any(layer.normalized for layer in evidence.layers) or len(grads) < 2 * DEPTH_MIN_LAYERS:
        return []
    growth = evidence.weight_growth()
    if not (math.isfinite(growth) and growth > DRIFT):
        return []
    quarter = len(grads) // 4
    first = statistics.median(v for _, v in grads[:quarter])
    last = statistics.median(v for _, v in grads[-quarter:])
    if not last > 0 or first / last >= GRADIENT_COLLAPSE:
        return []
    numbers = {"first layers / last layers gradient": first / last, "weight RMS change since start": growth}
    what = (f"the gradient at the first {quarter} layers ({grads[0][0]}, ...) is {fmt(first / last)} of the last "
            f"{quarter} layers' while the weights' RMS grew {fmt(growth)}x since the start: the normalisation layers "
            "divide by activations the updates made large, and pass little gradient back")
    layers = tuple(name for name, _ in grads[:quarter])
    optimizer = evidence.optimizer
    if optimizer is not None and optimizer.adaptive and evidence.post_norm and not _warming(evidence):
        return [_warmup_finding(evidence, "backward_decay", layers, what, numbers)]
    return [_lr_finding(evidence, "backward_decay", layers, what, numbers, "activations")]


def _warming(evidence: Evidence) -> bool:
    """Whether the learning rate rose over the observed steps (a warm-up)."""
    records = [*evidence.history, evidence.record()]
    return any(r.lr < records[-1].lr for r in records[:-1] if math.isfinite(r.lr))


def _warmup_finding(
    evidence: Evidence, condition: str, layers: Sequence[str], what: str, numbers: dict[str, float],
) -> Finding:
    optimizer = evidence.optimizer
    assert optimizer is not None
    steps = max(WARMUP_MIN, WARMUP_SPAN * evidence.step)
    return Finding(
        evidence.step, condition, "no_warmup", tuple(layers),
        f"{what}; a post-LN transformer (LayerNorm after each residual sum) on {optimizer.name} at lr "
        f"{fmt(optimizer.lr)} from the first step takes early updates too large for it",
        f"a linear learning-rate warm-up over the first {steps} steps or more (or pre-LN blocks)",
        numbers, {"warmup_steps": steps}, "history",
    )


def recurrent_scale(evidence: Evidence) -> list[Finding]:
    """Recurrent weights whose gain (:class:`~gradmon.diagnosis.evidence.RecurrentInfo`) is above
    :data:`RECURRENT_GAIN`: the gradient grows by about that factor per time step back."""
    large = [r for r in evidence.recurrent if r.gain > RECURRENT_GAIN]
    if not large:
        return []
    worst = max(large, key=lambda r: r.gain)
    return [Finding(
        evidence.step, "backward_growth", "init_too_large", tuple(r.name for r in large),
        f"the hidden-to-hidden weights of {worst.name} ({worst.kind}, hidden size {worst.hidden}) have RMS "
        f"{fmt(worst.recurrent_rms)}, a gain of {fmt(worst.gain)} (about their spectral radius), so the gradient "
        "grows by about that factor at each step back through time",
        "orthogonal hidden-to-hidden weights (gradmon.WeightInit(\"orthogonal\", types=\"RNN\", weights=\"weight_hh\")"
        ", or types=\"LSTM\"/\"GRU\"), which keep the gradient's scale through time",
        {"recurrent gain": worst.gain}, {"init_recurrent": "orthogonal"}, "weights",
    )]


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
    off = _init_off(evidence, hidden)
    if off is not None and off > 1 and _drift(evidence, hidden) is None:
        init, try_init = suggested_init(worst.kind, _needed(hidden), _fan_in(hidden))
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


def _needed(hidden: Sequence[LayerInfo]) -> float:
    gains = [layer.needed_gain for layer in hidden if layer.needed_gain]
    return statistics.median(gains) if gains else 1.0  # type: ignore[type-var]


def _fan_in(hidden: Sequence[LayerInfo]) -> int:
    return int(statistics.median(layer.fan_in for layer in hidden)) if hidden else 1


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
    drift = _drift(evidence, hidden)
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
        return [_lr_finding(evidence, "dead_units", names, f"{what}: {why}", numbers, "activations")]
    return [Finding(
        evidence.step, "dead_units", "unknown", names,
        f"{what}; the biases are not negative and the weights did not grow, so no cause is established",
        "LeakyReLU or GELU, which pass back a gradient below zero; check the inputs of "
        + (feeding.name if feeding is not None else dead[0].name), numbers, {}, "activations",
    )]


# ---------------------------------------------------------------------------------------------------------------
# The learning rate
# ---------------------------------------------------------------------------------------------------------------


def learning_rate(evidence: Evidence, found: Sequence[Finding]) -> list[Finding]:
    """The learning rate, judged as the optimizer uses it, and divergence over the observed steps.

    - SGD (and an unknown optimizer): a median update ratio above :data:`UPDATE_RATIO_HIGH` is too high.
    - Any optimizer: a median update ratio below :data:`UPDATE_RATIO_LOW`, or below :data:`UPDATE_RATIO_SLOW` at
      :data:`SLOW_STEPS` observed steps in a row while the loss stays above :data:`LOSS_SLOW` of its first value, is
      too low, unless a signal vanishing through depth (found beside it) explains the small gradients, or a schedule
      lowered the learning rate on purpose (below half its largest value so far).
    - Any optimizer, over the observed steps: the loss rising :data:`LOSS_RISE`-fold from its first value, or the
      weights grown :data:`DRIFT`-fold while it stays above :data:`LOSS_STALL` of it, is divergence (a post-LN
      transformer on an Adam-like optimizer without warm-up: no warm-up).
    """
    if any(f.condition.startswith(("forward", "backward")) or f.cause == "lr_too_high" for f in found):
        return []
    diverging = _divergence(evidence)
    if diverging is not None:
        return [diverging]
    ratios = {k: v for k, v in (evidence.update_ratios or {}).items() if math.isfinite(v) and v > 0}
    if not ratios:  # a ratio of exactly 0 is a step not taken (skipped, frozen), not a small learning rate
        return []
    median = statistics.median(ratios.values())
    numbers = {"median update ratio": median, "usual": 1e-3}
    optimizer = evidence.optimizer
    adaptive = optimizer is not None and optimizer.adaptive
    lr = optimizer.lr if optimizer is not None else math.nan
    name = f"{optimizer.name} at lr {fmt(lr)}" if optimizer is not None else "the optimizer"
    what = (f"the step changed the weights by {fmt(median)} of their norm (median over {len(ratios)} layers)"
            f" where about 1e-3 is usual")
    if (median < UPDATE_RATIO_LOW or _crawling(evidence)) and not _annealed(evidence):
        layers = tuple(k for k, v in ratios.items() if v < UPDATE_RATIO_SLOW)
        target = ADAPTIVE_STEP if adaptive else TARGET_RATIO
        new = round_lr(lr * min(1e3, target / median)) if math.isfinite(lr) else math.nan
        mechanism = ("it moves each weight by about lr" if adaptive
                     else "it moves each weight by lr times its gradient, and the gradients are not vanishing")
        losses = [r.loss for r in evidence.history if math.isfinite(r.loss)]
        if losses and math.isfinite(evidence.loss):
            mechanism += f"; the loss went from {fmt(losses[0])} to {fmt(evidence.loss)}"
        return [Finding(
            evidence.step, "update_ratio_low", "lr_too_low", layers, f"{what}: {name}; {mechanism}",
            f"a larger learning rate ({fmt(new)})" if math.isfinite(new) else "a larger learning rate",
            numbers, {"lr": new} if math.isfinite(new) else {}, "weights",
        )]
    if median > UPDATE_RATIO_HIGH and not adaptive:
        layers = tuple(k for k, v in ratios.items() if v > UPDATE_RATIO_HIGH)
        new = round_lr(lr * TARGET_RATIO / median) if math.isfinite(lr) else math.nan
        return [Finding(
            evidence.step, "update_ratio_high", "lr_too_high", layers,
            f"{what}: {name} moves each weight by lr times its gradient, a tenth of the weights or more in one step",
            f"a smaller learning rate ({fmt(new)}), warm-up, or gradient clipping" if math.isfinite(new)
            else "a learning rate 10 to 100 times smaller, warm-up, or gradient clipping",
            numbers, {"lr": new} if math.isfinite(new) else {}, "weights",
        )]
    return []


def _crawling(evidence: Evidence) -> bool:
    """The update ratio below :data:`UPDATE_RATIO_SLOW` at the last :data:`SLOW_STEPS` observed steps, and the loss
    above :data:`LOSS_SLOW` of its first value."""
    records = [*evidence.history, evidence.record()][-SLOW_STEPS:]
    losses = [r.loss for r in [*evidence.history, evidence.record()] if math.isfinite(r.loss)]
    return (
        len(records) == SLOW_STEPS and all(r.update_ratio < UPDATE_RATIO_SLOW for r in records)
        and len(losses) >= 2 and losses[-1] > LOSS_SLOW * losses[0]
    )


def _annealed(evidence: Evidence) -> bool:
    """Whether a schedule brought the learning rate below half its largest value so far."""
    rates = [r.lr for r in [*evidence.history, evidence.record()] if math.isfinite(r.lr)]
    return bool(rates) and rates[-1] < 0.5 * max(rates)


def _divergence(evidence: Evidence) -> Finding | None:
    """The loss rising, or the weights growing while it does not fall, over the observed steps."""
    records = [*evidence.history, evidence.record()]
    losses = [r for r in records if math.isfinite(r.loss)]
    if len(losses) < 2 or not math.isfinite(evidence.loss) or losses[0].loss <= 0:
        return None
    first = losses[0]
    rise = evidence.loss / first.loss
    growth = evidence.weight_growth()
    numbers = {"loss": evidence.loss, "first loss": first.loss}
    if rise >= LOSS_RISE:
        what = f"the loss rose from {fmt(first.loss)} at step {first.step} to {fmt(evidence.loss)}"
    elif math.isfinite(growth) and growth > DRIFT and rise > LOSS_STALL:
        what = (f"the weights' RMS grew {fmt(growth)}x since the start while the loss went from {fmt(first.loss)} "
                f"at step {first.step} to {fmt(evidence.loss)}")
    else:
        return None
    if math.isfinite(growth):
        numbers["weight RMS change since start"] = growth
    layers = tuple(layer.name for layer in evidence.layers)
    optimizer = evidence.optimizer
    if optimizer is not None and optimizer.adaptive and evidence.post_norm and not _warming(evidence):
        return _warmup_finding(evidence, "divergence", layers, what, numbers)
    return _lr_finding(evidence, "divergence", layers, what, numbers, "history")


def _lr_finding(
    evidence: Evidence, condition: str, layers: Sequence[str], what: str, numbers: dict[str, float], basis: str,
) -> Finding:
    """Learning rate too high, with the learning rate to try: for an Adam-like optimizer, one that moves each weight
    by :data:`ADAPTIVE_STEP` of the weights' initial RMS per step (at most a tenth of the current one); for SGD, a
    tenth of the current one."""
    optimizer = evidence.optimizer
    new = math.nan
    if optimizer is not None and math.isfinite(optimizer.lr):
        new = optimizer.lr / 10
        initial = [v for v in (evidence.initial_weight_rms or {}).values() if math.isfinite(v) and v > 0]
        if optimizer.adaptive and initial:
            new = min(new, ADAPTIVE_STEP * statistics.median(initial))
        new = round_lr(new)
    mechanism = ""
    if optimizer is not None:
        mechanism = (f" ({optimizer.name} moves each weight by about lr = {fmt(optimizer.lr)} a step)" if
                     optimizer.adaptive else f" ({optimizer.name} at lr {fmt(optimizer.lr)})")
    return Finding(
        evidence.step, condition, "lr_too_high", tuple(layers), what + mechanism,
        (f"a smaller learning rate ({fmt(new)})" if math.isfinite(new) else "a learning rate 10 to 100 times smaller")
        + ", warm-up, or gradient clipping", numbers, {"lr": new} if math.isfinite(new) else {}, basis,
    )
