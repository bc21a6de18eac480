"""What the diagnosis measures: the model's weight layers in forward order, the optimizer, and what one step and the
steps before it offer (:class:`Evidence`). Nothing here judges; :mod:`gradmon.diagnosis.rules` does."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from gradmon.activations import ACTIVATION_TYPES, DEAD_TYPES, ModuleStats, is_compiled, observed_modules
from gradmon.init import InitRecord
from gradmon.init_schemes import compute_fans
from gradmon.sharding import local_tensor

# Activations whose output scales with their input: the signal's change per layer follows from the weights alone.
_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.RReLU, nn.PReLU)
NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
         nn.LocalResponseNorm)
RECURRENT = (nn.RNN, nn.LSTM, nn.GRU)
# Weights without fans in the torch.nn.init sense.
_NOT_WEIGHT_LAYERS = (nn.Embedding, nn.EmbeddingBag) + NORMS
#: Optimizers whose step moves each weight by about the learning rate, whatever the gradient's scale.
ADAPTIVE = ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Adagrad", "Adadelta", "RMSprop", "Adafactor", "Lion")


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
class RecurrentInfo:
    """A recurrent module (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``): its hidden size and the RMS of its first layer's
    hidden-to-hidden weights (``weight_hh_l0``), whose gain ``RMS * sqrt(hidden)`` is about the spectral radius of a
    random recurrent matrix: above 1 the gradient grows at each step back through time."""

    name: str
    kind: str
    hidden: int
    recurrent_rms: float

    @property
    def gain(self) -> float:
        return self.recurrent_rms * math.sqrt(self.hidden)


@dataclass(frozen=True)
class OptimizerInfo:
    """What the diagnosis needs of the optimizer: its class name, whether it is adaptive (:data:`ADAPTIVE`: a step
    moves each weight by about ``lr``) or not (SGD: by ``lr`` times the gradient), and the learning rate now."""

    name: str
    lr: float
    adaptive: bool

    @classmethod
    def of(cls, optimizer: torch.optim.Optimizer) -> OptimizerInfo:
        """The info of ``optimizer`` (its first parameter group's learning rate)."""
        name = type(optimizer).__name__
        lr = optimizer.param_groups[0].get("lr", math.nan) if optimizer.param_groups else math.nan
        return cls(name, float(lr), name in ADAPTIVE)


@dataclass(frozen=True)
class StepRecord:
    """What later steps remember of an observed step: the total gradient norm, the loss (``nan`` when unknown), the
    median over layers of the weights' RMS over their RMS at the start, the learning rate and the median update
    ratio."""

    step: int
    grad_norm: float
    loss: float = math.nan
    weight_growth: float = math.nan
    lr: float = math.nan
    update_ratio: float = math.nan


@dataclass(frozen=True)
class Evidence:
    """What one step offers the diagnosis; every part but ``step`` and ``layers`` may be missing.

    Args:
        step: The optimizer step.
        layers: The weight layers in forward order (:func:`layer_structure`, measured by :func:`measure_layers`).
        activations: The observed modules' statistics in forward order (:class:`gradmon.activations.ModuleStats`).
        grad_norms: Gradient norms by layer.
        update_ratios: ``||w_after - w_before|| / ||w_before||`` by layer, for this step's update.
        init: The last :class:`gradmon.init.InitRecord` of each layer.
        initial_weight_rms: Each layer's weight RMS at the start of fit (or when first observed).
        initial_bias_mean: Each layer's bias mean at the start of fit.
        history: Earlier observed steps, oldest first.
        optimizer: The optimizer that takes this step.
        loss: This step's training loss.
        recurrent: The recurrent modules.
        post_norm: Whether a normalisation layer sits after the residual sum of the blocks (post-LN), when known.
    """

    step: int
    layers: Sequence[LayerInfo]
    activations: Sequence[ModuleStats] = ()
    grad_norms: Mapping[str, float] | None = None
    update_ratios: Mapping[str, float] | None = None
    init: Mapping[str, InitRecord] | None = None
    initial_weight_rms: Mapping[str, float] | None = None
    initial_bias_mean: Mapping[str, float] | None = None
    history: Sequence[StepRecord] = ()
    optimizer: OptimizerInfo | None = None
    loss: float = math.nan
    recurrent: Sequence[RecurrentInfo] = ()
    post_norm: bool | None = None

    @property
    def stats(self) -> dict[str, ModuleStats]:
        """The activation statistics by module name."""
        return {s.name: s for s in self.activations}

    def input_of(self, name: str) -> ModuleStats | None:
        """The observed module that ran just before ``name`` in the forward."""
        previous = None
        for s in self.activations:
            if s.name == name:
                return previous
            previous = s
        return None

    def total_grad_norm(self) -> float:
        """The 2-norm over every layer's gradient norm (``nan`` without gradient norms)."""
        if not self.grad_norms:
            return math.nan
        return math.sqrt(sum(v * v for v in self.grad_norms.values()))

    def weight_growth(self, layers: Sequence[LayerInfo] | None = None) -> float:
        """The median over ``layers`` (by default every weight layer) of the weights' RMS now over their RMS at the
        start (``nan`` when unknown)."""
        initial = self.initial_weight_rms or {}
        moves = [layer.weight_rms / initial[layer.name] for layer in (self.layers if layers is None else layers)
                 if initial.get(layer.name, 0) > 0 and math.isfinite(initial[layer.name])
                 and math.isfinite(layer.weight_rms)]
        return statistics.median(moves) if moves else math.nan

    def median_update_ratio(self) -> float:
        """The median over layers of the update ratios, leaving out steps not taken (0); ``nan`` without any."""
        ratios = [v for v in (self.update_ratios or {}).values() if math.isfinite(v) and v > 0]
        return statistics.median(ratios) if ratios else math.nan

    def record(self) -> StepRecord:
        """What later steps remember of this one."""
        lr = self.optimizer.lr if self.optimizer is not None else math.nan
        return StepRecord(self.step, self.total_grad_norm(), self.loss, self.weight_growth(), lr,
                          self.median_update_ratio())


# ---------------------------------------------------------------------------------------------------------------
# The model's structure
# ---------------------------------------------------------------------------------------------------------------


def needed_gain(module: nn.Module | None) -> float | None:
    """The gain weights before ``module`` need to keep the signal's scale: ``torch.nn.init.calculate_gain`` for the
    activations it knows (ReLU sqrt(2), LeakyReLU sqrt(2 / (1 + slope^2)), tanh 5/3, sigmoid 1, SELU 3/4; none
    after it: 1), else ``1 / sqrt(E[f(z)^2])`` for z ~ N(0, 1), the gain that keeps a unit-variance input's mean
    square, by quadrature (GELU 1.53, SiLU 1.68).

    Returns:
        The gain, or ``None`` for a module it cannot evaluate.
    """
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


def _ordered(model: nn.Module, order: Sequence[str] | None) -> tuple[dict[str, nn.Module], list[str]]:
    modules = dict(observed_modules(model))
    names = list(modules)
    if order is not None:
        rank = {name: i for i, name in enumerate(order)}
        registered = {name: i for i, name in enumerate(names)}
        names.sort(key=lambda name: rank.get(name, len(rank) + registered[name]))
    return modules, names


def layer_structure(model: nn.Module, order: Sequence[str] | None = None) -> list[LayerInfo]:
    """The weight layers of ``model`` (:func:`is_weight_layer`, among :func:`gradmon.activations.observed_modules`)
    in forward order, each with its fan-in and the activation after it; ``weight_rms`` and ``bias_mean`` are left
    for :func:`measure_layers` (or the caller's own measurement).

    Args:
        model: The model.
        order: Module names in the order the forward called them (a :class:`~gradmon.activations.RecordedBatch`'s);
            by default registration order, which is the forward order of ``nn.Sequential`` stacks. Modules that
            ``order`` does not name keep their registration order after those it names.
    """
    modules, names = _ordered(model, order)
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
            if isinstance(module, NORMS):
                current["normalized"] = True
            elif current["activation"] is None and isinstance(module, ACTIVATION_TYPES):
                current.update(activation=type(module).__name__, needed_gain=needed_gain(module),
                               homogeneous=isinstance(module, _HOMOGENEOUS))
    if current is not None:
        infos.append(LayerInfo(**current))
    return infos


def post_norm(model: nn.Module, order: Sequence[str] | None = None) -> bool | None:
    """Whether ``model`` normalises after its blocks' residual sums (post-LN) rather than before each block
    (pre-LN), told by what the forward runs first after the embedding: a normalisation layer (pre-LN) or a weight
    layer (post-LN). ``None`` for a model without both an embedding and a ``LayerNorm``."""
    modules, names = _ordered(model, order)
    kinds = [modules[n] for n in names]
    if not any(isinstance(m, nn.LayerNorm) for m in kinds):
        return None
    first = next((i for i, m in enumerate(kinds) if isinstance(m, nn.Embedding)), None)
    if first is None:
        return None
    after = next((m for m in kinds[first + 1:] if not isinstance(m, nn.Embedding | nn.Dropout)), None)
    if after is None:
        return None
    return not isinstance(after, NORMS)


def weight_rms(weight: torch.Tensor) -> torch.Tensor:
    """The RMS of this rank's piece of ``weight``, as a float32 scalar on its device (no host transfer)."""
    piece = local_tensor(weight).detach()
    return torch.linalg.vector_norm(piece, dtype=torch.float32) / math.sqrt(max(piece.numel(), 1))


def recurrent_layers(model: nn.Module) -> list[RecurrentInfo]:
    """The recurrent modules of ``model`` with the RMS of their first layer's hidden-to-hidden weights."""
    infos = []
    for name, module in observed_modules(model):
        if isinstance(module, RECURRENT):
            rms = float(weight_rms(module.weight_hh_l0))
            infos.append(RecurrentInfo(name, type(module).__name__, module.hidden_size, rms))
    return infos


@torch.no_grad()
def measure_layers(model: nn.Module, layers: Sequence[LayerInfo]) -> list[LayerInfo]:
    """``layers`` with their weight RMS and bias mean read from ``model`` now (one host transfer)."""
    modules = dict(observed_modules(model))
    values: list[torch.Tensor] = []
    for info in layers:
        module = modules[info.name]
        weight = local_tensor(module.weight).detach()
        values.append(weight_rms(weight))
        bias = getattr(module, "bias", None)
        values.append(local_tensor(bias).detach().float().mean() if isinstance(bias, torch.Tensor)
                      else weight.new_full((), math.nan))
    if not values:
        return []
    device = values[0].device
    host = torch.stack([v.to(device, torch.float32) for v in values]).tolist()
    return [
        replace(info, weight_rms=host[2 * i], bias_mean=None if math.isnan(host[2 * i + 1]) else host[2 * i + 1])
        for i, info in enumerate(layers)
    ]


# ---------------------------------------------------------------------------------------------------------------
# A signal through depth
# ---------------------------------------------------------------------------------------------------------------

#: Fewer weight layers than this have no "depth" to judge.
DEPTH_MIN_LAYERS = 4
#: The signal must change by this factor between the first and the last layer: a healthy net stays within a few x.
DEPTH_CHANGE = 10.0
#: ... at a rate of at least this factor per layer: a steady, geometric change, not a long net's slow drift.
DEPTH_FACTOR = 1.1


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
    their log10 against depth.

    Returns:
        The trend, or ``None`` when there is none: fewer than :data:`DEPTH_MIN_LAYERS` finite positive values, an
        overall change below :data:`DEPTH_CHANGE`, or a rate below :data:`DEPTH_FACTOR` per layer.
    """
    if len(values) < DEPTH_MIN_LAYERS or not all(math.isfinite(v) and v > 0 for v in values):
        return None
    logs = [math.log10(v) for v in values]
    n = len(logs)
    xs = range(n)
    mx, my = (n - 1) / 2, sum(logs) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, logs)) / sxx
    if abs(slope) * (n - 1) < math.log10(DEPTH_CHANGE) or abs(slope) < math.log10(DEPTH_FACTOR):
        return None
    return Trend(tuple(names), 10**slope, 10 ** (slope * (n - 1)), values[0], values[-1])
