"""Statistics of module outputs and of the gradients that flow back into them, for one batch: the forward and the
backward signal through depth, measured where it passes.

Observed modules (:func:`observed_modules`): every module that owns parameters (``Linear``, ``Conv2d``, norms, ...),
and every activation module (:data:`ACTIVATION_TYPES`, by ``isinstance``: ``ReLU``, ``GELU``, ``Sigmoid``, ...).
An activation called as a function (``F.relu``, ``torch.sigmoid``) is no module and cannot be hooked; the output of
the layer before it is still observed, so the forward signal through depth is still seen, only its dead or
saturated fraction is not. Per observed module, at its first call in the batch:

- ``rms``: root mean square of its output (the first tensor of a tuple output, as for ``LSTM`` or attention);
- ``grad_rms``: root mean square of the gradient of the loss with respect to that output, from the backward pass;
- ``dead_fraction`` (ReLU-like modules, :data:`DEAD_TYPES`): the fraction of units that are zero for every example of
  the batch. A unit is a feature of an ``(N, F)`` output and a channel of a convolution's ``(N, C, ...)``; for an
  output of 3 or more dimensions the channel axis is dim 1 when the layer that last ran before the activation is a
  convolution or a batch/group/instance norm, else the last axis (a transformer's ``(N, T, F)``);
- ``saturated_fraction`` (bounded activations, :data:`SATURATING_TYPES`): the fraction of outputs where the
  activation's slope is below 1% of its largest slope (a sigmoid's ``sigmoid'(x) < 0.01 * 0.25``, |x| > 6.9);
- ``slope``: the mean slope of a bounded activation over the batch, computed from its output
  (``y * (1 - y)`` for a sigmoid): what each such layer multiplies the backward signal by, on average.

Every statistic stays on the device; :meth:`ActivationRecorder.stop` stacks them into one vector, which reaches the
host in one transfer. Hooks live only between :meth:`ActivationRecorder.start` and :meth:`~ActivationRecorder.stop`:
a batch that is not recorded pays nothing. The hooks read and never write, so recording does not change the run.

Compiled code (``torch.compile``): Dynamo does not guard on module hooks (``torch._dynamo.config.
skip_nnmodule_hook_guards``), so a hook added for one batch inside a compiled module fires or not depending on
whether it existed when the code was compiled. Modules inside a compiled module are therefore not observed; the
compiled module itself is, under the user's name (``self.net = torch.compile(net)`` is observed as ``net``, its
output and the gradient flowing into it), because its own hooks run outside the compiled code.

A plain PyTorch loop::

    recorder = ActivationRecorder(model)
    with recorder:  # hooks for this batch only
        loss_fn(model(x), y).backward()
    for stats in recorder.stats():  # one host transfer
        print(stats)

This module never imports Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gradmon.naming import clean_name
from gradmon.norms import read_host

#: Activation modules observed even though they own no parameters; subclasses count.
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.RReLU, nn.PReLU, nn.GELU, nn.SiLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish,
    nn.Softplus, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softsign, nn.LogSigmoid,
    nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.Threshold, nn.GLU,
)
#: Activations whose output is exactly zero on a half-line: a unit zero for a whole batch passes back no gradient.
DEAD_TYPES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)
#: Bounded activations, each with its slope as a function of its output and its largest slope.
SATURATING_TYPES: tuple[type[nn.Module], ...] = (nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid, nn.Softsign,
                                                 nn.LogSigmoid)
#: A bounded activation is saturated where its slope is below this fraction of its largest slope.
SATURATION_SLOPE = 0.01
# Layers whose outputs have their channels at dim 1 (N, C, ...): what a ReLU after them counts as units.
_CHANNELS_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                   nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)
# The statistics, in the order each module's values are stacked (those that apply to it).
FIELDS = ("rms", "dead_fraction", "saturated_fraction", "slope", "grad_rms")


def is_dead_type(module: nn.Module) -> bool:
    return isinstance(module, DEAD_TYPES)


def is_saturating_type(module: nn.Module) -> bool:
    # ReLU6 is a Hardtanh in torch, but its lower bound is a ReLU's dead zone: it counts as ReLU-like.
    return isinstance(module, SATURATING_TYPES) and not isinstance(module, DEAD_TYPES)


def slope_and_max(module: nn.Module, y: Tensor) -> tuple[Tensor, float]:
    """The slope of a bounded activation at each of its outputs ``y`` (float32), and its largest slope."""
    if isinstance(module, nn.Sigmoid):
        return y * (1.0 - y), 0.25
    if isinstance(module, nn.Tanh):
        return 1.0 - y * y, 1.0
    if isinstance(module, nn.Hardsigmoid):  # relu6(x + 3) / 6: slope 1/6 strictly inside (0, 1)
        return ((y > 0.0) & (y < 1.0)).float() / 6.0, 1.0 / 6.0
    if isinstance(module, nn.Hardtanh):
        return ((y > module.min_val) & (y < module.max_val)).float(), 1.0
    if isinstance(module, nn.Softsign):  # x / (1 + |x|): slope 1 / (1 + |x|)^2 = (1 - |y|)^2
        return (1.0 - y.abs()).square(), 1.0
    if isinstance(module, nn.LogSigmoid):  # log(sigmoid(x)): slope 1 - sigmoid(x) = 1 - exp(y)
        return 1.0 - y.exp(), 1.0
    raise TypeError(f"{type(module).__name__} is not a bounded activation gradmon knows")


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` is what ``torch.compile`` returns for a module (an ``OptimizedModule``), told by its name
    so that importing Dynamo is left to the user."""
    return type(module).__name__ == "OptimizedModule" and isinstance(getattr(module, "_orig_mod", None), nn.Module)


def observed_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the modules :class:`ActivationRecorder` observes in ``model``, in registration order,
    under their cleaned names (:func:`gradmon.naming.clean_name`): those that own parameters and the activation
    modules, not the root, nothing inside a compiled module (the compiled module itself instead; see the module
    docstring), each module once."""
    found: list[tuple[str, nn.Module]] = []
    seen_names: set[str] = set()
    seen: set[int] = set()
    compiled: list[str] = []  # prefixes of compiled modules: what lies below them runs inside compiled code
    for name, module in model.named_modules(remove_duplicate=True):
        if not name or any(name.startswith(prefix) for prefix in compiled):
            continue
        if is_compiled(module):
            compiled.append(name + ".")
        elif not (isinstance(module, ACTIVATION_TYPES) or next(module.parameters(recurse=False), None) is not None):
            continue
        clean = clean_name(name)
        if clean and clean not in seen_names and id(module) not in seen:
            seen_names.add(clean)
            seen.add(id(module))
            found.append((clean, module))
    return found


@dataclass(frozen=True)
class ModuleStats:
    """One observed module's statistics for one batch (``None`` where one does not apply or was not measured: no
    ``grad_rms`` for an output no gradient reached, no ``dead_fraction`` for a sigmoid).

    ``kind`` is the module's class name (``"Linear"``, ``"ReLU"``, ``"OptimizedModule"`` for a compiled module).
    """

    name: str
    kind: str
    rms: float
    grad_rms: float | None = None
    dead_fraction: float | None = None
    saturated_fraction: float | None = None
    slope: float | None = None


@dataclass(eq=False)
class _Observation:
    name: str
    module: nn.Module
    values: dict[str, Tensor] = field(default_factory=dict)


@dataclass(eq=False)
class RecordedBatch:
    """What :meth:`ActivationRecorder.stop` hands over: the modules observed in call order, each with the names of
    its statistics, and all their values as one device vector (not yet transferred)."""

    modules: list[tuple[str, str, tuple[str, ...]]]
    values: Tensor

    def stats(self, host_values: list[float] | None = None) -> list[ModuleStats]:
        """The statistics, in call order (the forward's order), from ``host_values`` (this batch's :attr:`values`
        already on the host) or else from one transfer now."""
        values = read_host(self.values) if host_values is None else host_values
        out, i = [], 0
        for name, kind, names in self.modules:
            row = dict(zip(names, values[i : i + len(names)]))
            i += len(names)
            out.append(ModuleStats(name, kind, **row))
        return out


class ActivationRecorder:
    """Hooks on the observed modules of ``model`` (:func:`observed_modules`) for one batch at a time: forward hooks
    that compute each output's statistics on the device, and, through them, a tensor hook on each output that
    computes the RMS of its gradient in the backward pass.

    ``start()`` registers them, ``stop()`` removes every hook (forward and tensor hooks, whether the backward ran or
    not) and returns the :class:`RecordedBatch`; used as a context manager it does both, and :meth:`stats` reads the
    result. A module called several times in one forward (shared weights, a loop, activation checkpointing's
    recomputation) is observed at its first call. Forward hooks fire in forward mode and in ``no_grad`` alike; a
    gradient is recorded only for outputs that require one.
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules = observed_modules(model)
        self._handles: list[RemovableHandle] = []
        self._observations: dict[str, _Observation] = {}
        self._channels_first = False
        self._last: RecordedBatch | None = None

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def start(self) -> None:
        """Register the forward hooks for the coming batch (a second call without :meth:`stop` starts afresh)."""
        self._remove()
        self._observations = {}
        self._channels_first = False
        for name, module in self.modules:
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))

    def stop(self) -> RecordedBatch:
        """Remove every hook and stack what was observed into one device vector (no host sync)."""
        self._remove()
        self._last = self.peek()
        self._observations = {}
        return self._last

    def peek(self) -> RecordedBatch:
        """What has been observed so far in this batch, hooks left in place (no host sync)."""
        observations = list(self._observations.values())
        modules = [(o.name, type(o.module).__name__, tuple(f for f in FIELDS if f in o.values)) for o in observations]
        tensors = [o.values[f] for o in observations for f in FIELDS if f in o.values]
        if not tensors:
            return RecordedBatch(modules, torch.zeros(0))
        device = tensors[0].device
        return RecordedBatch(modules, torch.stack([t.to(device) for t in tensors]))

    def stats(self) -> list[ModuleStats]:
        """The last recorded batch's statistics (one host transfer); empty before any."""
        return self._last.stats() if self._last is not None else []

    def __enter__(self) -> ActivationRecorder:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _remove(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def _forward_hook(self, name: str) -> Callable[[nn.Module, object, object], None]:
        def hook(module: nn.Module, args: object, output: object) -> None:
            if not isinstance(module, ACTIVATION_TYPES):
                self._channels_first = isinstance(module, _CHANNELS_FIRST)
            if name in self._observations:
                return
            y = _first_tensor(output)
            if y is None or not y.is_floating_point() or y.numel() == 0:
                return
            observation = self._observations[name] = _Observation(name, module)
            with torch.no_grad():
                observation.values.update(output_statistics(module, y.detach(), self._channels_first))
            if y.requires_grad and torch.is_grad_enabled():
                self._handles.append(y.register_hook(self._grad_hook(observation)))

        return hook

    @staticmethod
    def _grad_hook(observation: _Observation) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            if "grad_rms" not in observation.values:
                observation.values["grad_rms"] = rms(grad.detach())

        return hook


def output_statistics(module: nn.Module, y: Tensor, channels_first: bool = False) -> dict[str, Tensor]:
    """The forward statistics of one output ``y`` of ``module``, as 0-d float32 tensors on ``y``'s device: ``rms``,
    and ``dead_fraction`` (ReLU-like) or ``saturated_fraction`` and ``slope`` (bounded). ``channels_first``: the
    units of a 3+-dimensional output are along dim 1 rather than the last (see the module docstring)."""
    values = {"rms": rms(y)}
    if is_dead_type(module) and y.dim() >= 2:
        values["dead_fraction"] = dead_fraction(y, 1 if y.dim() == 2 or channels_first else -1)
    elif is_saturating_type(module):
        slope, largest = slope_and_max(module, y.float())
        values["saturated_fraction"] = (slope < SATURATION_SLOPE * largest).float().mean()
        values["slope"] = slope.mean()
    return values


def rms(t: Tensor) -> Tensor:
    """Root mean square, accumulated in (at least) float32 without a float32 copy of ``t``."""
    return torch.linalg.vector_norm(t, dtype=torch.promote_types(t.dtype, torch.float32)) / math.sqrt(t.numel())


def dead_fraction(y: Tensor, unit_dim: int) -> Tensor:
    """The fraction of units (indices along ``unit_dim``) whose output is zero for every example and position."""
    alive = y.ne(0).movedim(unit_dim, -1).reshape(-1, y.shape[unit_dim]).any(dim=0)
    return (~alive).float().mean()


def _first_tensor(output: object) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return None

