"""Numerical gradient checks: is the gradient autograd computes the derivative of the loss?

Two checks, both by central differences, ``f'(x) ~ (f(x + eps) - f(x - eps)) / 2 eps``:

- :func:`numerical_gradient`, the textbook one: perturb one element at a time. Two evaluations per element, so only
  for small inputs or a few selected elements.
- :func:`check_gradients`, for whole models: per layer, compare the autograd directional derivative ``g . v`` along a
  random unit direction ``v`` restricted to that layer with ``(L(w + eps v) - L(w - eps v)) / 2 eps``. That costs a
  handful of forward passes per layer instead of two per parameter, and judging each layer alone keeps a large layer
  from hiding a wrong small one (a wrong 64-element bias disappears in one direction over all parameters).

Pure torch: never imports Lightning.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from gradmon._validation import check_float, check_int
from gradmon.norms import layer_name

Status = Literal["good", "acceptable", "wrong"]

#: Dropout modules are switched to eval mode in the checked copy: a random mask makes the loss a different function
#: at every evaluation.
DROPOUT_MODULES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)

#: How many float64 rounding units the loss may be off by; the difference of two such losses is rounding noise.
_LOSS_ROUNDING_UNITS = 100.0


@dataclass(frozen=True)
class LayerCheck:
    """The outcome of :func:`check_gradients` for one layer.

    ``rel_error`` is the worst over the directions tried (each direction counted by its best attempt);
    ``analytic``, ``numerical`` and ``eps`` belong to that direction.
    """

    layer: str
    rel_error: float
    analytic: float
    numerical: float
    eps: float
    status: Status

    @property
    def passed(self) -> bool:
        return self.status != "wrong"


def relative_error(analytic: float, numerical: float, floor: float = 0.0) -> float:
    """``|a - n| / max(|a|, |n|, floor)``, and 0 when ``a == n`` (both zero included).

    ``floor`` keeps two numbers that are both rounding noise around zero from looking wrong relative to each other.
    """
    difference = abs(analytic - numerical)
    if difference == 0.0:
        return 0.0
    return difference / max(abs(analytic), abs(numerical), floor)


def judge(rel_error: float, fail_above: float = 1e-2, good_below: float = 1e-7) -> Status:
    """The usual reading of a relative error: above ``fail_above`` the gradient is wrong, below ``good_below`` it is
    good, in between acceptable (typical with kinks such as ReLU, or in float32)."""
    if not rel_error <= fail_above:  # NaN is wrong too
        return "wrong"
    return "good" if rel_error < good_below else "acceptable"


def numerical_gradient(
    f: Callable[[Tensor], Tensor],
    x: Tensor,
    eps: float = 1e-6,
    indices: Sequence[int] | Tensor | None = None,
) -> Tensor:
    """Central-difference gradient of the scalar function ``f`` at ``x``.

    ``(f(x + eps e_i) - f(x - eps e_i)) / 2 eps`` for each flat index ``i`` of ``x``: all of them by default, shaped
    like ``x``; or only ``indices`` (flat indices into ``x``), as a 1-D tensor in that order. ``x`` is not modified.
    Two evaluations per element, so use float64 and keep ``x`` small or select a few elements.
    """
    point = x.detach().clone(memory_format=torch.contiguous_format)
    flat = point.view(-1)
    selected = range(flat.numel()) if indices is None else torch.as_tensor(indices).reshape(-1).tolist()

    def along(i: int) -> Callable[[float], float]:
        def f_at(t: float) -> float:
            original = flat[i].item()
            flat[i] = original + t
            value = float(f(point))
            flat[i] = original
            return value

        return f_at

    with torch.no_grad():
        derivatives = [central_difference(along(i), eps) for i in selected]
    result = torch.tensor(derivatives, dtype=torch.float64, device=x.device)
    return result.view(x.shape) if indices is None else result


def central_difference(f: Callable[[float], float], eps: float) -> float:
    """``(f(eps) - f(-eps)) / 2 eps``: the derivative at 0 of ``f`` along one line, with error O(eps^2)."""
    return (f(eps) - f(-eps)) / (2.0 * eps)


def layer_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters grouped by layer, in registration order.

    A layer is the module owning the parameters (``net.0`` for ``net.0.weight`` and ``net.0.bias``); a parameter
    registered on the root is its own layer. Tied parameters count once, under their first name.
    """
    layers: dict[str, list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            layers.setdefault(layer_name(name), []).append(param)
    return layers


def apply_to_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``fn`` applied to every tensor in nested tuples, lists and dicts; everything else returned as it is."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return type(obj)({key: apply_to_tensors(value, fn) for key, value in obj.items()})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(apply_to_tensors(item, fn) for item in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(apply_to_tensors(item, fn) for item in obj)
    return obj


def float64_copy(model: nn.Module) -> nn.Module:
    """The function :func:`check_gradients` differentiates: a deep copy of ``model`` in float64, in the same
    train/eval modes except for dropout (eval), and without module hooks.

    Hooks are left behind because they belong to the real run: a monitor's hook must not see the check's passes, and
    a hook bound to an object (a callback) would otherwise be deep-copied with it.
    """
    memo: dict[int, Any] = {
        id(hooks): type(hooks)()
        for module in model.modules()
        for name, hooks in vars(module).items()
        if "_hooks" in name and isinstance(hooks, dict)
    }
    replica = copy.deepcopy(model, memo).double()
    for module in replica.modules():
        if isinstance(module, DROPOUT_MODULES):
            module.eval()
    return replica


def check_gradients(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    inputs: Any,
    *,
    num_directions: int = 2,
    eps: float = 1e-6,
    fail_above: float = 1e-2,
    good_below: float = 1e-7,
    retries: int = 2,
    seed: int = 0,
) -> list[LayerCheck]:
    """Directional gradient check of every layer of ``model``.

    ``loss_fn(replica, inputs)`` must return the scalar loss of ``replica`` (a :func:`float64_copy` of ``model``) on
    ``inputs`` (every floating tensor in it cast to float64). One backward gives the autograd gradient ``g`` of all
    layers; then for each layer and each of ``num_directions`` Gaussian directions ``v`` on that layer's parameters,
    scaled to unit norm so that ``eps`` is the same step length in every layer, the check compares
    ``a = g . v`` with ``n = (L(w + eps v) - L(w - eps v)) / 2 eps`` by :func:`relative_error`.

    A kink (ReLU, max, abs) between ``w - eps v`` and ``w + eps v`` makes one direction look wrong, so a direction
    that fails is tried again, up to ``retries`` times, each with a new direction and a ten times smaller ``eps``.

    ``model`` and the global CPU and CUDA random states are left exactly as they were. Every loss evaluation starts
    from the same random state, so randomness inside ``loss_fn`` is the same in all of them.
    Costs one forward and backward plus ``2 * num_directions`` forward passes per layer (more on retries), and a
    float64 copy of the model (twice its float32 memory).
    """
    check_int("num_directions", num_directions, 1)
    check_float("eps", eps)
    check_int("retries", retries, 0)
    cuda_devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda_devices):
        replica = float64_copy(model)
        inputs = apply_to_tensors(inputs, lambda t: t.double() if t.is_floating_point() else t)
        layers = layer_parameters(replica)

        def loss_at_seed() -> Tensor:
            _reseed(seed, cuda_devices)
            return loss_fn(replica, inputs)

        params = [p for layer in layers.values() for p in layer]
        with torch.enable_grad():
            loss = loss_at_seed()
            grads = torch.autograd.grad(loss, params, allow_unused=True) if params else ()
        loss_scale = max(abs(loss.item()), 1.0)
        generator = torch.Generator().manual_seed(seed)

        records = []
        start = 0
        for name, layer in layers.items():
            layer_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(layer, grads[start:])]
            start += len(layer)
            directions = [
                _check_direction(layer, layer_grads, loss_at_seed, generator, eps, retries, loss_scale, fail_above)
                for _ in range(num_directions)
            ]
            error, analytic, numerical, used_eps = max(directions, key=lambda d: d[0])
            records.append(LayerCheck(name, error, analytic, numerical, used_eps, judge(error, fail_above, good_below)))
    return records


def _check_direction(
    layer: list[nn.Parameter],
    grads: list[Tensor],
    loss: Callable[[], Tensor],
    generator: torch.Generator,
    eps: float,
    retries: int,
    loss_scale: float,
    fail_above: float,
) -> tuple[float, float, float, float]:
    """(relative error, analytic, numerical, eps) of the best of up to ``1 + retries`` attempts."""
    weights = [p.detach().clone() for p in layer]
    best = (math.inf, math.nan, math.nan, eps)
    for attempt in range(retries + 1):
        step = eps / 10**attempt
        direction = _unit_direction(layer, generator)
        analytic = sum((g * v).sum() for g, v in zip(grads, direction)).item()

        def loss_along(t: float, direction: list[Tensor] = direction) -> float:
            with torch.no_grad():
                for p, w, v in zip(layer, weights, direction):
                    p.copy_(w + t * v)
                return loss().item()

        numerical = central_difference(loss_along, step)
        with torch.no_grad():
            for p, w in zip(layer, weights):
                p.copy_(w)
        # With this floor a difference the rounding of the loss can explain never exceeds `fail_above`.
        rounding = _LOSS_ROUNDING_UNITS * torch.finfo(torch.float64).eps * loss_scale / step
        error = relative_error(analytic, numerical, floor=rounding / fail_above)
        if error < best[0]:
            best = (error, analytic, numerical, step)
        if error <= fail_above:
            break
    return best


def _unit_direction(layer: list[nn.Parameter], generator: torch.Generator) -> list[Tensor]:
    """A Gaussian direction over all of the layer's parameters, with unit norm taken jointly."""
    direction = [torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.device) for p in layer]
    norm = torch.stack([v.square().sum() for v in direction]).sum().sqrt()
    return [v / norm for v in direction]


def _reseed(seed: int, cuda_devices: list[int]) -> None:
    """Seed only the generators :func:`torch.random.fork_rng` restores: the CPU one and those of ``cuda_devices``."""
    torch.default_generator.manual_seed(seed)
    for index in cuda_devices:
        torch.cuda.default_generators[index].manual_seed(seed)
