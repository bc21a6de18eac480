"""The signal through depth and the scale of the weights: init too small or too large, a gain mismatch, a saturating
activation's slope bound, recurrent weights that make the gradient grow through time."""

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
    Trend,
    depth_trend,
)
from gradmon.diagnosis.text import Finding, fmt, suggested_init
from gradmon.diagnosis.training import lr_finding, weight_drift
from gradmon.init_spec import format_scheme

#: A change through depth that nothing in the evidence explains is reported only beyond this factor: trained healthy
#: nets drift by 10x at times (a kaiming ReLU net a few steps in), while a broken one is off by orders of magnitude.
UNEXPLAINED_CHANGE = 100.0
#: Weights within this factor of the RMS their fan-in and activation need are at the right scale.
SCALE_TOLERANCE = 1.18
#: Weights whose gain is within this fraction of a standard scheme's are taken for that scheme.
GAIN_MATCH = 0.15
#: A backward signal shrinking through bounded activations whose mean slope is below this is their slope bound.
SLOPE_LIMIT = 0.5
#: A recurrent layer whose hidden-to-hidden gain (about its spectral radius) is above this makes the gradient grow
#: through time; PyTorch's default is 0.58, orthogonal 1.
RECURRENT_GAIN = 2.0
#: Gains of the standard schemes, by what they are made for: weights at one of these were initialised for it.
SCHEME_GAINS: dict[str, float] = {
    "gain 1 (Xavier or LeCun: linear, sigmoid)": 1.0,
    "gain sqrt(2) (kaiming for ReLU)": math.sqrt(2.0),
    "gain 5/3 (for tanh)": 5.0 / 3.0,
    "gain 3/4 (for SELU)": 0.75,
}
#: PyTorch's own init for Linear and Conv (kaiming_uniform with a = sqrt(5)): RMS 1 / sqrt(3 fan_in).
TORCH_DEFAULT_GAIN = 1.0 / math.sqrt(3.0)
LARGEST_SLOPE = {"Sigmoid": 0.25, "Hardsigmoid": 1.0 / 6.0}


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
    if kind in LARGEST_SLOPE and count + 1 >= DEPTH_MIN_LAYERS:
        gain = statistics.median(layer.gain for layer in hidden)
        factor = LARGEST_SLOPE[kind] * gain
        if factor**count < 1 / DEPTH_CHANGE:
            trend = Trend(names[::-1], factor, factor**count, math.nan, math.nan)
            return [_saturating(evidence, "backward_decay", trend, kind, LARGEST_SLOPE[kind], count,
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
    off = init_off(evidence, named)
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


def at_start(evidence: Evidence, layer: LayerInfo) -> LayerInfo:
    """``layer`` with the weight RMS it had at the start: the init is judged by the weights it made."""
    rms = (evidence.initial_weight_rms or {}).get(layer.name)
    if rms is None or not math.isfinite(rms) or rms <= 0:
        return layer
    return LayerInfo(layer.name, layer.kind, layer.fan_in, rms, layer.activation, layer.needed_gain,
                     layer.normalized, layer.homogeneous, layer.bias_mean)


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
    drift = weight_drift(evidence, hidden)
    if drift is not None:
        numbers["weight RMS change since start"] = drift
        if drift > 1:
            return lr_finding(
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
    initial = [at_start(evidence, layer) for layer in hidden]
    gain = statistics.median(layer.gain for layer in initial)
    need = median_needed_gain(initial)
    activation = Counter(layer.activation for layer in initial).most_common(1)[0][0] or "no activation"
    fan_in = median_fan_in(initial)
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
    off = init_off(evidence, hidden)
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


def init_off(evidence: Evidence, hidden: list[LayerInfo]) -> float | None:
    """The initial weights' gain over the gain their activations need, when outside :data:`SCALE_TOLERANCE`
    (squared: a gain a little off is the activations' business, not the init's)."""
    initial = [at_start(evidence, layer) for layer in hidden if layer.needed_gain]
    if not initial:
        return None
    off = statistics.median(layer.gain / layer.needed_gain for layer in initial)  # type: ignore[operator]
    return off if abs(math.log(off)) > 2 * math.log(SCALE_TOLERANCE) else None


def _saturating(
    evidence: Evidence, condition: str, backward: Trend, kind: str, slope: float, count: int,
    predicted: bool = False, numbers: Mapping[str, float] | None = None,
) -> Finding:
    largest = LARGEST_SLOPE.get(kind, 1.0)
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


def median_needed_gain(hidden: Sequence[LayerInfo]) -> float:
    gains = [layer.needed_gain for layer in hidden if layer.needed_gain]
    return statistics.median(gains) if gains else 1.0  # type: ignore[type-var]


def median_fan_in(hidden: Sequence[LayerInfo]) -> int:
    return int(statistics.median(layer.fan_in for layer in hidden)) if hidden else 1

