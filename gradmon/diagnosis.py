r"""Diagnosis: from the evidence of one step, say what is wrong, its likely cause, and what to change.

gradmon's monitors measure; this module reads the measurements together and names a cause, the way one would by
hand. The evidence (:class:`Evidence`) is what one step offers: the weight layers in forward order, each with its
fan-in, its weight scale and the activation that follows it (:class:`LayerInfo`); the statistics of the modules'
outputs and of their gradients (:class:`gradmon.activations.ModuleStats`), when they were recorded; per-layer
gradient norms and update ratios; what :mod:`gradmon.init` (or ``WeightInit``) did to each layer; and the total
gradient norm at earlier observed steps. :func:`diagnose` returns a list of :class:`Finding`: the condition, the
layers, the likely cause, the suggested change and the numbers behind them.

The rules, and why (every threshold is a module constant):

- **The signal through depth.** Over the weight layers' outputs in forward order (at least :data:`DEPTH_MIN_LAYERS`,
  no normalisation layer among them), log10 of the output RMS is fitted against depth (least squares). A forward
  signal that changes by at least :data:`DEPTH_CHANGE` (10x) overall, steadily (at least :data:`DEPTH_FACTOR` per
  layer), shrinks or grows through depth; a healthy net at its start stays within a few x (kaiming ReLU; Xavier
  tanh, whose signal shrinks as a power of depth, 5x over the demo's 17 layers, not geometrically). The same test on the
  RMS of the gradients with respect to those outputs, read from the output back to the input, says whether the
  gradient shrinks or grows on its way back. A change nothing in the evidence explains is reported only beyond
  :data:`UNEXPLAINED_CHANGE` (100x).
- **Init scale.** A layer followed by an activation needs weights of RMS ``gain / sqrt(fan_in)`` to keep the signal's
  scale, ``gain`` being what the activation needs (:func:`needed_gain`: ``torch.nn.init.calculate_gain``, sqrt(2) for
  ReLU). The weights' own gain is ``RMS * sqrt(fan_in)``. When the signal shrinks or grows through depth: weights
  whose gain is that of a standard scheme made for another activation (1 for Xavier or LeCun, sqrt(2), 5/3, 3/4;
  within :data:`GAIN_MATCH`) are a *gain mismatch* (Xavier under ReLU keeps sqrt(1/2) = 0.71 of the signal per
  layer); otherwise *init too small* or *too large* (N(0, 0.01) or N(0, 1) on a 64-wide ReLU layer against
  kaiming's 0.177; PyTorch's default for ``Linear``, uniform with RMS ``1 / sqrt(3 fan_in)``, is 0.41x kaiming under
  ReLU). Weights that grew or shrank more than :data:`DRIFT` since the start are the learning rate's doing, not the
  init's.
- **Saturating activations.** A gradient that shrinks on its way back while the forward signal does not, through
  bounded activations whose mean slope is below :data:`SLOPE_LIMIT` (a sigmoid's slope is at most 0.25), is the
  activations' slope bound; a bounded activation saturated (slope below 1% of its largest) in at least
  :data:`SATURATED_LIMIT` of its outputs is a finding of its own.
- **Dead units.** A ReLU-like module with at least :data:`DEAD_LIMIT` of its units zero for the whole batch.
- **Update ratio.** The median over layers of ``||w_after - w_before|| / ||w_before||`` above
  :data:`UPDATE_RATIO_HIGH` (learning rate too high) or below :data:`UPDATE_RATIO_LOW` (too low) while the usual
  range is around 1e-3; not reported when the signal through depth already explains it.
- **Non-finite values.** The first layer (in forward order) whose gradient is NaN or inf, and what preceded it:
  weights already non-finite (an earlier update overflowed them, after the gradient spike of an earlier step when
  there was one), or the first module whose output overflowed in the forward pass.

Without activation statistics (nothing recorded yet) the signal through depth is predicted from the weights, for
activations whose effect on it follows from the weights alone (ReLU-like, whose output scales with its input) and
for the sigmoid's slope bound; such findings say they are predicted.

A plain loop::

    from gradmon.activations import ActivationRecorder
    from gradmon.diagnosis import diagnose_model
    from gradmon.norms import layer_norms

    recorder = ActivationRecorder(model)
    for step, (x, y) in enumerate(loader):
        if step % 100 == 0:
            with recorder:
                loss_fn(model(x), y).backward()
            for finding in diagnose_model(model, recorder.stats(), step=step, grad_norms=layer_norms(model)[0]):
                print(finding.line())
        else:
            loss_fn(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()

This module never imports Lightning.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from gradmon.activations import (
    ACTIVATION_TYPES,
    DEAD_TYPES,
    ModuleStats,
    is_compiled,
    observed_modules,
)
from gradmon.init import InitRecord
from gradmon.init_schemes import compute_fans
from gradmon.init_spec import format_scheme
from gradmon.sharding import DTensor

#: What a finding is about, by code (``Finding.condition``), with its words.
CONDITIONS: dict[str, str] = {
    "nonfinite": "non-finite values",
    "forward_decay": "forward signal shrinks through depth",
    "forward_growth": "forward signal grows through depth",
    "backward_decay": "gradient shrinks on its way back through depth",
    "backward_growth": "gradient grows on its way back through depth",
    "saturation": "saturated activations",
    "dead_units": "dead units",
    "update_ratio_high": "update ratio far above the usual range",
    "update_ratio_low": "update ratio far below the usual range",
}
#: The likely causes, by code (``Finding.cause``), with their words.
CAUSES: dict[str, str] = {
    "saturating_activation": "saturating activation",
    "init_too_small": "init scale too small",
    "init_too_large": "init scale too large",
    "gain_mismatch": "init gain mismatch",
    "dead_relu": "dead ReLUs",
    "lr_too_high": "learning rate too high",
    "lr_too_low": "learning rate too low",
    "activation_overflow": "activation overflow",
    "gradient_spike": "gradient spike",
    "unknown": "cause not found",
}

#: How a written finding is marked as cleared: the text ``**<condition>**: no longer found.`` at the step it cleared.
CLEARED = "no longer found."

#: Fewer weight layers than this have no "depth" to judge.
DEPTH_MIN_LAYERS = 4
#: The signal must change by this factor between the first and the last layer: a healthy net stays within a few x.
DEPTH_CHANGE = 10.0
#: ... at a rate of at least this factor per layer: a steady, geometric change, not a long net's slow drift.
DEPTH_FACTOR = 1.1
#: A change through depth that nothing in the evidence explains is reported only beyond this factor: trained healthy
#: nets drift by 10x at times (a kaiming ReLU net a few steps in), while a broken one is off by orders of magnitude.
UNEXPLAINED_CHANGE = 100.0
#: Weights within this factor of the RMS their fan-in and activation need are at the right scale.
SCALE_TOLERANCE = 1.18
#: Weights whose gain is within this fraction of a standard scheme's are taken for that scheme.
GAIN_MATCH = 0.15
#: Weights whose RMS moved more than this factor since the first observation were moved by training.
DRIFT = 2.0
#: A backward signal shrinking through bounded activations whose mean slope is below this is their slope bound.
SLOPE_LIMIT = 0.5
#: A bounded activation saturated in at least this fraction of its outputs is a finding.
SATURATED_LIMIT = 0.5
#: A ReLU-like module with at least this fraction of dead units is a finding.
DEAD_LIMIT = 0.5
#: Median update ratio above this is far above the usual ~1e-3 (a hundredfold).
UPDATE_RATIO_HIGH = 0.1
#: ... and below this far below it (a hundredfold).
UPDATE_RATIO_LOW = 1e-5
#: A total gradient norm this large, or this many times the previous one, at an earlier step is a spike.
SPIKE_NORM = 1e4
SPIKE_FACTOR = 100.0

#: Gains of the standard schemes, by what they are made for: weights at one of these were initialised for it.
SCHEME_GAINS: dict[str, float] = {
    "gain 1 (Xavier or LeCun: linear, sigmoid)": 1.0,
    "gain sqrt(2) (kaiming for ReLU)": math.sqrt(2.0),
    "gain 5/3 (for tanh)": 5.0 / 3.0,
    "gain 3/4 (for SELU)": 0.75,
}
#: PyTorch's own init for Linear and Conv (kaiming_uniform with a = sqrt(5)): RMS 1 / sqrt(3 fan_in).
TORCH_DEFAULT_GAIN = 1.0 / math.sqrt(3.0)
# Activations whose output scales with their input: the signal's change per layer follows from the weights alone.
_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.RReLU, nn.PReLU)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
          nn.LocalResponseNorm)
# Weights without fans in the torch.nn.init sense.
_NOT_WEIGHT_LAYERS = (nn.Embedding, nn.EmbeddingBag) + _NORMS
_LARGEST_SLOPE = {"Sigmoid": 0.25, "Hardsigmoid": 1.0 / 6.0}


@dataclass(frozen=True)
class LayerInfo:
    """One weight layer as the diagnosis sees it.

    ``activation`` is the class name of the first activation module run after this layer and before the next weight
    layer (``None``: none, e.g. the output layer or an ``F.relu``), ``needed_gain`` the gain it needs
    (:func:`needed_gain`), ``normalized`` whether a normalisation layer runs in between. ``weight_rms`` is the RMS of
    the ``weight`` tensor, ``bias_mean`` the mean of the bias (``None`` without one).
    """

    name: str
    kind: str
    fan_in: int
    weight_rms: float = math.nan
    activation: str | None = None
    needed_gain: float | None = None
    normalized: bool = False
    homogeneous: bool = False
    bias_mean: float | None = None

    @property
    def gain(self) -> float:
        """The weights' gain: RMS times sqrt(fan_in) (1 for Xavier on a square layer, sqrt(2) for kaiming ReLU)."""
        return self.weight_rms * math.sqrt(self.fan_in)


@dataclass(frozen=True)
class Evidence:
    """What one step offers the diagnosis; every part but ``layers`` may be missing.

    ``activations`` in forward order (:class:`gradmon.activations.ModuleStats`); ``grad_norms`` and
    ``update_ratios`` by layer; ``init`` the last :class:`gradmon.init.InitRecord` of each layer;
    ``initial_weight_rms`` each layer's weight RMS when it was first observed (or initialised);
    ``earlier_grad_norms`` (step, total gradient norm) at earlier observed steps, oldest first.
    """

    step: int
    layers: Sequence[LayerInfo]
    activations: Sequence[ModuleStats] = ()
    grad_norms: Mapping[str, float] | None = None
    update_ratios: Mapping[str, float] | None = None
    init: Mapping[str, InitRecord] | None = None
    initial_weight_rms: Mapping[str, float] | None = None
    earlier_grad_norms: Sequence[tuple[int, float]] = ()


@dataclass(frozen=True)
class Finding:
    """One thing found at one step: the ``condition`` (a key of :data:`CONDITIONS`), the ``layers`` it concerns (by
    the user's names, in forward order), the likely ``cause`` (a key of :data:`CAUSES`) with its ``explanation``, the
    ``suggestion`` (what to change) and the ``numbers`` that support it."""

    step: int
    condition: str
    cause: str
    layers: tuple[str, ...]
    explanation: str
    suggestion: str
    numbers: Mapping[str, float] = field(default_factory=dict)

    def line(self) -> str:
        """One line: ``likely cause: <cause>: <explanation>; try: <suggestion>``."""
        return f"likely cause: {CAUSES[self.cause]}: {self.explanation}; try: {self.suggestion}"

    def markdown(self) -> str:
        """A paragraph for TensorBoard's text tab and the report."""
        numbers = ", ".join(f"{name} {_fmt(value)}" for name, value in self.numbers.items())
        return (
            f"**{CONDITIONS[self.condition]}** at step {self.step}, in {_layer_span(self.layers)}.  \n"
            f"Likely cause: **{CAUSES[self.cause]}**: {self.explanation}.  \nTry: {self.suggestion}."
            + (f"  \nNumbers: {numbers}." if numbers else "")
        )

    def __str__(self) -> str:
        return f"step {self.step}: {CONDITIONS[self.condition]} in {_layer_span(self.layers)}; {self.line()}"


# ---------------------------------------------------------------------------------------------------------------
# The model's structure
# ---------------------------------------------------------------------------------------------------------------


def needed_gain(module: nn.Module | None) -> float | None:
    """The gain weights before ``module`` need to keep the signal's scale: ``torch.nn.init.calculate_gain`` for the
    activations it knows (ReLU sqrt(2), LeakyReLU sqrt(2 / (1 + slope^2)), tanh 5/3, sigmoid 1, SELU 3/4; none
    after it: 1), else ``1 / sqrt(E[f(z)^2])`` for z ~ N(0, 1), the gain that keeps a unit-variance input's mean
    square, by quadrature (GELU 1.53, SiLU 1.68). ``None`` for a module it cannot evaluate."""
    if module is None:
        return 1.0
    if isinstance(module, DEAD_TYPES):
        return nn.init.calculate_gain("relu")
    if isinstance(module, nn.LeakyReLU):
        return nn.init.calculate_gain("leaky_relu", module.negative_slope)
    if isinstance(module, nn.RReLU):
        return nn.init.calculate_gain("leaky_relu", (module.lower + module.upper) / 2)
    if isinstance(module, nn.PReLU):
        return nn.init.calculate_gain("leaky_relu", float(module.weight.detach().float().mean()))
    for kind, name in ((nn.Tanh, "tanh"), (nn.Sigmoid, "sigmoid"), (nn.SELU, "selu")):
        if isinstance(module, kind):
            return nn.init.calculate_gain(name)
    function = _elementwise(module)
    if function is None:
        return None
    z = torch.linspace(-12.0, 12.0, 24001, dtype=torch.float64)
    density = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi) * (z[1] - z[0])
    mean_square = float((function(z) ** 2 * density).sum())
    return 1.0 / math.sqrt(mean_square) if mean_square > 0 else None


def _elementwise(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The activation as a pure function (no module call: a module may draw random numbers or hold state)."""
    functions: list[tuple[type[nn.Module], Callable[[nn.Module], Callable[[torch.Tensor], torch.Tensor]]]] = [
        (nn.GELU, lambda m: lambda z: F.gelu(z, approximate=m.approximate)),
        (nn.SiLU, lambda m: F.silu),
        (nn.ELU, lambda m: lambda z: F.elu(z, m.alpha)),
        (nn.CELU, lambda m: lambda z: F.celu(z, m.alpha)),
        (nn.Mish, lambda m: F.mish),
        (nn.Softplus, lambda m: lambda z: F.softplus(z, m.beta, m.threshold)),
        (nn.Hardswish, lambda m: F.hardswish),
        (nn.Hardtanh, lambda m: lambda z: F.hardtanh(z, m.min_val, m.max_val)),
        (nn.Hardsigmoid, lambda m: F.hardsigmoid),
        (nn.Softsign, lambda m: F.softsign),
        (nn.LogSigmoid, lambda m: F.logsigmoid),
        (nn.Tanhshrink, lambda m: F.tanhshrink),
        (nn.Softshrink, lambda m: lambda z: F.softshrink(z, m.lambd)),
        (nn.Hardshrink, lambda m: lambda z: F.hardshrink(z, m.lambd)),
        (nn.Threshold, lambda m: lambda z: F.threshold(z, m.threshold, m.value)),
    ]
    for kind, make in functions:
        if isinstance(module, kind):
            return make(module)
    return None


def is_weight_layer(module: nn.Module) -> bool:
    """A module with a ``weight`` of 2 or more dimensions that has fans (``Linear``, convolutions; not embeddings
    or norms)."""
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, torch.Tensor) and weight.dim() >= 2 and not isinstance(module, _NOT_WEIGHT_LAYERS)
        and not is_compiled(module)
    )


def layer_structure(model: nn.Module, order: Sequence[str] | None = None) -> list[LayerInfo]:
    """The weight layers of ``model`` (:func:`is_weight_layer`, among :func:`gradmon.activations.observed_modules`)
    in forward order, each with its fan-in and the activation after it; ``weight_rms`` and ``bias_mean`` are left
    for :func:`measure_layers` (or the caller's own measurement).

    ``order``: module names in the order the forward called them (a :class:`~gradmon.activations.RecordedBatch`'s);
    by default registration order, which is the forward order of ``nn.Sequential`` stacks. Modules that ``order``
    does not name keep their registration order after those it names.
    """
    modules = dict(observed_modules(model))
    names = list(modules)
    if order is not None:
        rank = {name: i for i, name in enumerate(order)}
        registered = {name: i for i, name in enumerate(names)}
        names.sort(key=lambda name: rank.get(name, len(rank) + registered[name]))
    infos: list[LayerInfo] = []
    current: dict | None = None
    for name in names:
        module = modules[name]
        if is_weight_layer(module):
            if current is not None:
                infos.append(LayerInfo(**current))
            current = {"name": name, "kind": type(module).__name__, "fan_in": compute_fans(module.weight)[0],
                       "activation": None, "needed_gain": 1.0, "normalized": False, "homogeneous": True}
        elif current is not None:
            if isinstance(module, _NORMS):
                current["normalized"] = True
            elif current["activation"] is None and isinstance(module, ACTIVATION_TYPES):
                current.update(activation=type(module).__name__, needed_gain=needed_gain(module),
                               homogeneous=isinstance(module, _HOMOGENEOUS))
    if current is not None:
        infos.append(LayerInfo(**current))
    return infos


@torch.no_grad()
def measure_layers(model: nn.Module, layers: Sequence[LayerInfo]) -> list[LayerInfo]:
    """``layers`` with their weight RMS and bias mean read from ``model`` now (one host transfer)."""
    modules = dict(observed_modules(model))
    values: list[torch.Tensor] = []
    for info in layers:
        module = modules[info.name]
        weight = _local(module.weight)
        values.append(torch.linalg.vector_norm(weight, dtype=torch.float32) / math.sqrt(max(weight.numel(), 1)))
        bias = getattr(module, "bias", None)
        values.append(_local(bias).float().mean() if isinstance(bias, torch.Tensor) else weight.new_full((), math.nan))
    if not values:
        return []
    device = values[0].device
    host = torch.stack([v.to(device, torch.float32) for v in values]).tolist()
    return [
        replace(info, weight_rms=host[2 * i], bias_mean=None if math.isnan(host[2 * i + 1]) else host[2 * i + 1])
        for i, info in enumerate(layers)
    ]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t.detach()


def diagnose_model(
    model: nn.Module,
    activations: Sequence[ModuleStats] = (),
    *,
    step: int = 0,
    grad_norms: Mapping[str, float] | None = None,
    update_ratios: Mapping[str, float] | None = None,
    init: Sequence[InitRecord] = (),
) -> list[Finding]:
    """:func:`diagnose` of ``model`` as it is now, with what a plain loop measured (see the module docstring)."""
    order = [s.name for s in activations] or None
    layers = measure_layers(model, layer_structure(model, order))
    records = {r.layer: r for r in init if r.weight in ("weight", "")}
    return diagnose(Evidence(step, layers, tuple(activations), grad_norms, update_ratios, records or None))


# ---------------------------------------------------------------------------------------------------------------
# The rules
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trend:
    """A fitted change of a signal through the layers: ``factor`` per layer (input to output), ``change`` overall."""

    layers: tuple[str, ...]
    factor: float
    change: float
    first: float
    last: float


def depth_trend(names: Sequence[str], values: Sequence[float]) -> Trend | None:
    """The steady change of ``values`` (one per layer, input to output) through depth, from a least-squares fit of
    their log10 against depth; ``None`` when there is none: fewer than :data:`DEPTH_MIN_LAYERS` finite positive
    values, an overall change below :data:`DEPTH_CHANGE`, or a rate below :data:`DEPTH_FACTOR` per layer."""
    if len(values) < DEPTH_MIN_LAYERS or not all(math.isfinite(v) and v > 0 for v in values):
        return None
    logs = [math.log10(v) for v in values]
    n = len(logs)
    slope = _slope(range(n), logs)
    if abs(slope) * (n - 1) < math.log10(DEPTH_CHANGE) or abs(slope) < math.log10(DEPTH_FACTOR):
        return None
    return Trend(tuple(names), 10**slope, 10 ** (slope * (n - 1)), values[0], values[-1])


def _slope(xs: Sequence[float] | range, ys: Sequence[float]) -> float:
    xs = list(xs)
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0


def diagnose(evidence: Evidence) -> list[Finding]:
    """The findings of one step, the most severe first: non-finite values, the signal through depth, saturated
    activations, dead units, the update ratio. A healthy step gives an empty list. See the module docstring for
    the rules."""
    nonfinite = _nonfinite(evidence)
    if nonfinite is not None:
        return [nonfinite]
    findings = _depth(evidence)
    findings += _saturation(evidence)
    if not any(f.condition == "forward_decay" for f in findings):  # a vanished signal leaves the biases' sign alone
        findings += _dead(evidence)
    if not any(f.condition.startswith(("forward", "backward")) for f in findings):
        findings += _update_ratio(evidence)
    return findings


def _stats(evidence: Evidence) -> dict[str, ModuleStats]:
    return {s.name: s for s in evidence.activations}


def _depth(evidence: Evidence) -> list[Finding]:
    layers = list(evidence.layers)
    if len(layers) < DEPTH_MIN_LAYERS or any(layer.normalized for layer in layers):
        return []
    stats = _stats(evidence)
    measured = [layer for layer in layers if layer.name in stats]
    if len(measured) < DEPTH_MIN_LAYERS:
        return _predicted(evidence)
    names = [layer.name for layer in measured]
    forward = depth_trend(names, [stats[n].rms for n in names])
    back_names = [n for n in names if stats[n].grad_rms is not None]
    # Read from the output back to the input: a factor below 1 means the gradient shrinks on its way back.
    backward = depth_trend(back_names[::-1], [stats[n].grad_rms for n in back_names][::-1])
    if forward is not None:
        condition = "forward_decay" if forward.factor < 1 else "forward_growth"
        finding = _scale_finding(evidence, condition, forward, backward, measured)
        trend = forward
    elif backward is not None:
        condition = "backward_decay" if backward.factor < 1 else "backward_growth"
        finding = _backward_finding(evidence, condition, backward)
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
        factor = statistics.median(layer.gain / layer.needed_gain for layer in hidden if math.isfinite(layer.gain))
        change = factor ** len(hidden)
        if not (1 / DEPTH_CHANGE < change < DEPTH_CHANGE) and abs(math.log10(factor)) >= math.log10(DEPTH_FACTOR):
            trend = Trend(names, factor, change, math.nan, math.nan)
            condition = "forward_decay" if factor < 1 else "forward_growth"
            return [_scale_finding(evidence, condition, trend, None, list(evidence.layers), predicted=True)]
    kinds = Counter(layer.activation for layer in hidden)
    kind, count = kinds.most_common(1)[0]
    if kind in _LARGEST_SLOPE and count + 1 >= DEPTH_MIN_LAYERS:
        gain = statistics.median(layer.gain for layer in hidden)
        factor = _LARGEST_SLOPE[kind] * gain
        if factor ** count < 1 / DEPTH_CHANGE:
            trend = Trend(names[::-1], factor, factor**count, math.nan, math.nan)
            return [_saturating_finding(evidence, "backward_decay", trend, kind, _LARGEST_SLOPE[kind], count,
                                        predicted=True)]
    return []


def _scale_finding(
    evidence: Evidence,
    condition: str,
    forward: Trend,
    backward: Trend | None,
    layers: list[LayerInfo],
    predicted: bool = False,
) -> Finding:
    """The signal shrinks or grows through depth: which of init scale, gain or training moved the weights."""
    hidden = [layer for layer in layers if layer.activation is not None and math.isfinite(layer.gain)]
    numbers = {"forward factor per layer": forward.factor, "forward change": forward.change}
    if backward is not None:
        numbers["gradient factor per layer back"] = backward.factor
    verb = "is predicted to " if predicted else ""
    how = (
        f"{verb}{'keep' if predicted else 'keeps'} {forward.factor:.2g} of the forward signal" if forward.factor < 1
        else f"{verb}{'multiply' if predicted else 'multiplies'} the forward signal by {forward.factor:.2g}"
    )
    over = f"{_fmt(forward.change)}x over {len(forward.layers)} layers"
    if not predicted:
        over += (f" (output RMS {_fmt(forward.first)} at {forward.layers[0]}, {_fmt(forward.last)} at "
                 f"{forward.layers[-1]})")
    if backward is not None:
        moves = "keeps" if backward.factor < 1 else "grows by"
        over += f", and the gradient {moves} {_fmt(backward.factor)} per layer on its way back"
    drift = _drift(evidence, hidden)
    if drift is not None:
        grew = drift > 1
        numbers["weight RMS change since start"] = drift
        return Finding(
            evidence.step, condition, "lr_too_high" if grew else "lr_too_low", forward.layers,
            f"the weights' RMS {'grew' if grew else 'shrank'} {_fmt(drift if grew else 1 / drift)}x since the start "
            f"of training, and each layer now {how}: {over}",
            "a smaller learning rate, warm-up, or gradient clipping" if grew else "a larger learning rate",
            numbers,
        )
    if not hidden:
        return Finding(
            evidence.step, condition, "unknown", forward.layers,
            f"each layer {how}: {over}, and no activation module tells what the weights' scale should be",
            "check each layer's init for its fan-in and activation; normalisation layers keep the scale", numbers,
        )
    gain = statistics.median(layer.gain for layer in hidden)
    need = statistics.median(layer.needed_gain for layer in hidden if layer.needed_gain) if any(
        layer.needed_gain for layer in hidden) else gain / forward.factor
    activation = Counter(layer.activation for layer in hidden).most_common(1)[0][0]
    fan_in = int(statistics.median(layer.fan_in for layer in hidden))
    numbers.update({"weight gain": gain, "needed gain": need, "weight RMS / needed": gain / need})
    scheme = _scheme(evidence, hidden)
    weights = (
        f"weights of RMS {_fmt(gain / math.sqrt(fan_in))} = {gain:.2f}/sqrt(fan_in {fan_in})"
        + (f" ({scheme})" if scheme else "")
    )
    needs = f"gain {need:.2f} (RMS {_fmt(need / math.sqrt(fan_in))} at fan_in {fan_in})"
    if abs(math.log(gain / need)) <= math.log(SCALE_TOLERANCE):
        return Finding(
            evidence.step, condition, "unknown", forward.layers,
            f"{weights} are what {activation} needs, {needs}, yet each layer {how}: {over}",
            "look for a layer that rescales its output (a constant factor, pooling, a residual sum)", numbers,
        )
    try_init = _suggested_init(activation, need, fan_in)
    matched = next((label for label, g in SCHEME_GAINS.items() if abs(gain / g - 1) <= GAIN_MATCH), None)
    if matched is not None and abs(need / SCHEME_GAINS[matched] - 1) > GAIN_MATCH:
        return Finding(
            evidence.step, condition, "gain_mismatch", forward.layers,
            f"{weights} are scaled for {matched}, but {activation} needs {needs}: each layer {how}: {over}", try_init,
            numbers,
        )
    small = gain < need
    torch_default = abs(gain / TORCH_DEFAULT_GAIN - 1) <= GAIN_MATCH
    default = " are PyTorch's default init (RMS 1/sqrt(3 fan_in))" if torch_default else ""
    return Finding(
        evidence.step, condition, "init_too_small" if small else "init_too_large", forward.layers,
        f"{weights}{default}, {_fmt(gain / need)}x the {needs} {activation} needs: each layer {how}: {over}",
        try_init, numbers,
    )


def _backward_finding(evidence: Evidence, condition: str, backward: Trend) -> Finding:
    """The gradient shrinks or grows on its way back while the forward signal does not."""
    numbers = {"gradient factor per layer back": backward.factor, "gradient change back": backward.change}
    over = (
        f"the gradient {'keeps' if backward.factor < 1 else 'grows by'} {_fmt(backward.factor)} per layer on its way "
        f"back, {_fmt(backward.change)}x from {backward.layers[0]} to {backward.layers[-1]}"
    )
    if condition == "backward_decay":
        bounded = [s for s in evidence.activations if s.slope is not None and math.isfinite(s.slope)]
        if bounded:
            slope = math.exp(statistics.fmean(math.log(max(s.slope, 1e-30)) for s in bounded))
            if slope < SLOPE_LIMIT:
                kind = Counter(s.kind for s in bounded).most_common(1)[0][0]
                return _saturating_finding(evidence, condition, backward, kind, slope, len(bounded), numbers=numbers)
        dead = [s for s in evidence.activations if (s.dead_fraction or 0.0) >= DEAD_LIMIT]
        if dead:
            return _dead_finding(evidence, dead, condition, over, numbers)
    return Finding(
        evidence.step, condition, "unknown", backward.layers,
        f"{over}, while the forward signal keeps its scale", "look for a layer whose backward rescales the gradient",
        numbers,
    )


def _saturating_finding(
    evidence: Evidence, condition: str, backward: Trend, kind: str, slope: float, count: int,
    predicted: bool = False, numbers: Mapping[str, float] | None = None,
) -> Finding:
    largest = _LARGEST_SLOPE.get(kind, 1.0)
    bound = f"at most {largest:.2g}" if predicted else f"at most {largest:.2g}, on average {slope:.2g} here"
    return Finding(
        evidence.step, condition, "saturating_activation", backward.layers,
        f"{kind}'s slope is {bound}, so each of the {count} {kind} layers passes back about "
        f"{_fmt(backward.factor)} of the gradient: {_fmt(backward.change)}x by {backward.layers[-1]}"
        + (" (predicted from the slope bound)" if predicted else ""),
        f"a non-saturating activation in the hidden layers (ReLU with kaiming_normal(nonlinearity='relu'), or "
        f"GELU), or normalisation or residual connections between the {kind} layers; keep {kind} for outputs and gates",
        dict(numbers or {}, **{"mean slope": slope, "largest slope": largest}),
    )


def _saturation(evidence: Evidence) -> list[Finding]:
    saturated = [s for s in evidence.activations if (s.saturated_fraction or 0.0) >= SATURATED_LIMIT]
    if not saturated:
        return []
    worst = max(saturated, key=lambda s: s.saturated_fraction or 0.0)
    before = _input_of(evidence, worst.name)
    numbers = {"saturated fraction": worst.saturated_fraction or 0.0}
    inputs = ""
    if before is not None:
        numbers["input RMS"] = before.rms
        inputs = f" (its input has RMS {_fmt(before.rms)})"
    return [Finding(
        evidence.step, "saturation", "saturating_activation", tuple(s.name for s in saturated),
        f"{len(saturated)} {worst.kind} module(s) saturated (slope below 1% of its largest), {worst.name} in "
        f"{worst.saturated_fraction:.0%} of its outputs{inputs}: a saturated unit passes back almost no gradient",
        "smaller pre-activations: a smaller init scale or learning rate, normalisation before the activation, or a "
        "non-saturating activation",
        numbers,
    )]


def _dead(evidence: Evidence) -> list[Finding]:
    dead = [s for s in evidence.activations if (s.dead_fraction or 0.0) >= DEAD_LIMIT]
    return [_dead_finding(evidence, dead)] if dead else []


def _dead_finding(
    evidence: Evidence, dead: list[ModuleStats], condition: str = "dead_units", extra: str = "",
    numbers: Mapping[str, float] | None = None,
) -> Finding:
    worst = max(dead, key=lambda s: s.dead_fraction or 0.0)
    numbers = dict(numbers or {}, **{"dead fraction": worst.dead_fraction or 0.0})
    # The first dead module in forward order: those after it may be dead only because it passes them nothing.
    feeding = _input_of(evidence, dead[0].name)
    info = next((layer for layer in evidence.layers if feeding is not None and layer.name == feeding.name), None)
    bias = info.bias_mean if info is not None else None
    if feeding is not None and bias is not None and bias < -0.5 * feeding.rms:
        numbers["bias mean before"] = bias
        why = (f"the biases of {feeding.name} are negative (mean {_fmt(bias)}) and hold its outputs below zero for "
               f"every example (output RMS {_fmt(feeding.rms)})")
    else:
        why = "their pre-activations are below zero for every example (large negative biases, or large updates)"
    return Finding(
        evidence.step, condition, "dead_relu", tuple(s.name for s in dead),
        f"{worst.dead_fraction:.0%} of the units of {worst.name} are zero for the whole batch"
        + (f" ({len(dead)} ReLU modules with half or more dead)" if len(dead) > 1 else "")
        + f" and pass back no gradient: {why}" + (f"; {extra}" if extra else ""),
        "biases initialised at zero (or slightly positive), a smaller learning rate, or LeakyReLU or GELU, which "
        "pass back a gradient below zero",
        numbers,
    )


def _update_ratio(evidence: Evidence) -> list[Finding]:
    # A ratio of exactly 0 is a step not taken (skipped, frozen), not a small learning rate.
    ratios = {k: v for k, v in (evidence.update_ratios or {}).items() if math.isfinite(v) and v > 0}
    if not ratios:
        return []
    median = statistics.median(ratios.values())
    numbers = {"median update ratio": median, "usual": 1e-3}
    high = median > UPDATE_RATIO_HIGH
    if not (high or median < UPDATE_RATIO_LOW):
        return []
    layers = tuple(k for k, v in ratios.items() if (v > UPDATE_RATIO_HIGH if high else v < UPDATE_RATIO_LOW))
    largest = max(ratios, key=ratios.get) if high else min(ratios, key=ratios.get)
    return [Finding(
        evidence.step, "update_ratio_high" if high else "update_ratio_low", "lr_too_high" if high else "lr_too_low",
        layers,
        f"the step changed the weights by {_fmt(median)} of their norm (median over {len(ratios)} layers; "
        f"{largest}: {_fmt(ratios[largest])}) where about 1e-3 is usual",
        "a learning rate 10 to 100 times smaller, warm-up, or gradient clipping" if high
        else "a larger learning rate (or check that the optimizer is given these parameters)",
        numbers,
    )]


def _nonfinite(evidence: Evidence) -> Finding | None:
    grads = evidence.grad_norms or {}
    order = [layer.name for layer in evidence.layers] + [n for n in grads if n not in {x.name for x in evidence.layers}]
    bad_grads = [n for n in order if n in grads and not math.isfinite(grads[n])]
    bad_weights = [layer.name for layer in evidence.layers if not math.isfinite(layer.weight_rms)]
    overflow = next((s for s in evidence.activations if not math.isfinite(s.rms)), None)
    if not (bad_grads or bad_weights or overflow):
        return None
    first = bad_grads[0] if bad_grads else bad_weights[0] if bad_weights else overflow.name  # type: ignore[union-attr]
    spike = _spike(evidence.earlier_grad_norms)
    numbers: dict[str, float] = {}
    if spike is not None:
        numbers.update({"spike step": spike[0], "spike gradient norm": spike[1]})
    guard = "GradHealthMonitor(on_exploding='skip', on_nonfinite='skip') or gradient clipping"
    what = f"first non-finite gradient in {first}" if bad_grads else f"non-finite values from {first}"
    if bad_weights:
        cause = "gradient_spike" if spike is not None else "unknown"
        why = f"the weights of {bad_weights[0]} are already non-finite: an earlier update overflowed them" + (
            f", after a total gradient norm of {_fmt(spike[1])} at step {spike[0]}" if spike is not None else "")
        try_ = f"stop such a step before it lands ({guard}), then remove what made the gradients large"
    elif overflow is not None:
        cause = "activation_overflow"
        before = _input_of(evidence, overflow.name)
        numbers["overflow output RMS"] = overflow.rms
        why = f"the forward pass overflowed first at {overflow.name} (output RMS {_fmt(overflow.rms)})" + (
            f", after {before.name} (RMS {_fmt(before.rms)})" if before is not None else "") + (
            f"; the total gradient norm was {_fmt(spike[1])} at step {spike[0]}" if spike is not None else "")
        try_ = ("keep activations in range: normalisation, a smaller init scale or learning rate; under fp16, bf16 "
                "or a loss scale")
    elif spike is not None:
        cause = "gradient_spike"
        why = f"gradients grew to a total norm of {_fmt(spike[1])} at step {spike[0]}"
        try_ = f"{guard}, a smaller learning rate, or warm-up"
    else:
        cause = "unknown"
        why = "no earlier sign in the observed steps (log more often to see the steps before)"
        try_ = guard
    layers = (first,) + ((overflow.name,) if overflow is not None and overflow.name != first else ())
    return Finding(evidence.step, "nonfinite", cause, layers, f"{what}; {why}", try_, numbers)


def _spike(history: Sequence[tuple[int, float]]) -> tuple[int, float] | None:
    """The latest earlier step whose total gradient norm was huge, non-finite or a jump over the one before."""
    for i in range(len(history) - 1, -1, -1):
        step, norm = history[i]
        previous = history[i - 1][1] if i else math.nan
        if not math.isfinite(norm) or norm >= SPIKE_NORM or (previous > 0 and norm >= SPIKE_FACTOR * previous):
            return step, norm
    return None


def _input_of(evidence: Evidence, name: str) -> ModuleStats | None:
    """The observed module that ran just before ``name`` in the forward."""
    previous = None
    for s in evidence.activations:
        if s.name == name:
            return previous
        previous = s
    return None


def _drift(evidence: Evidence, layers: Sequence[LayerInfo]) -> float | None:
    """The median factor the weights' RMS moved by since first observed, when beyond :data:`DRIFT`."""
    initial = evidence.initial_weight_rms or {}
    moves = [layer.weight_rms / initial[layer.name] for layer in layers
             if initial.get(layer.name, 0) > 0 and math.isfinite(initial[layer.name])]
    if not moves:
        return None
    move = statistics.median(moves)
    return move if not 1 / DRIFT <= move <= DRIFT else None


def _scheme(evidence: Evidence, layers: Sequence[LayerInfo]) -> str | None:
    records = [evidence.init[layer.name] for layer in layers if evidence.init and layer.name in evidence.init]
    if not records:
        return None
    scheme = Counter(format_scheme(r.scheme, r.arguments) for r in records).most_common(1)[0][0]
    return f"initialised {scheme}"


#: The scheme to suggest per activation (string form, as WeightInit takes it); others get normal(std=...).
SUGGESTED_SCHEMES: dict[str, str] = {
    "ReLU": "kaiming_normal(nonlinearity='relu')",
    "ReLU6": "kaiming_normal(nonlinearity='relu')",
    "Tanh": "xavier_normal(gain=1.667)",
    "Sigmoid": "xavier_normal",
    "SELU": "lecun_normal",
}


def _suggested_init(activation: str, need: float, fan_in: int) -> str:
    std = need / math.sqrt(fan_in)
    scheme = SUGGESTED_SCHEMES.get(activation, f"normal(std={std:.3g})")
    return (f"{scheme}: weights of RMS {need:.2f}/sqrt(fan_in) = {std:.3g} at fan_in {fan_in} "
            f"(gradmon.WeightInit(\"{scheme}\"))")


#: For each GradHealthMonitor condition, the findings that can explain it, the likeliest first.
EXPLAINS: dict[str, tuple[str, ...]] = {
    "vanishing": ("backward_decay", "forward_decay", "dead_units", "saturation", "update_ratio_low"),
    "exploding": ("forward_growth", "backward_growth", "update_ratio_high", "nonfinite"),
    "nonfinite": ("nonfinite", "forward_growth", "backward_growth", "update_ratio_high"),
}


def explain(findings: Sequence[Finding], condition: str, layers: Sequence[str] = ()) -> Finding | None:
    """The finding that best explains a health condition (``"vanishing"``, ``"exploding"``, ``"nonfinite"``) in
    ``layers``: among those that can (:data:`EXPLAINS`), one that names one of ``layers`` first, then the likeliest.
    ``None`` when none can."""
    wanted = EXPLAINS.get(condition, ())
    candidates = [f for f in findings if f.condition in wanted]
    if not candidates:
        return None
    named = set(layers)
    return min(candidates, key=lambda f: (not named.intersection(f.layers), wanted.index(f.condition)))


def _fmt(value: float) -> str:
    return format(value, ".2g").replace("e+", "e").replace("e-0", "e-").replace("e0", "e")


def _layer_span(layers: Sequence[str]) -> str:
    if len(layers) <= 3:
        return ", ".join(layers)
    return f"{layers[0]} to {layers[-1]} ({len(layers)} layers)"
