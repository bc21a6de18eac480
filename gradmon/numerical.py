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
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from gradmon._random import forked_rng, reseed
from gradmon._validation import check_float, check_int, check_seed, invalid
from gradmon.naming import clean_name, layer_name

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

#: ``|a - n| / max(|a|, |n|)`` never exceeds 2 (reached for ``n = -a``): a threshold at or above it can never fail.
MAX_RELATIVE_ERROR = 2.0


@dataclass(frozen=True)
class LayerCheck:
    """The outcome of a gradient check of one layer.

    ``rel_error`` is the worst over the directions tried (each direction counted by its best attempt);
    ``analytic``, ``numerical`` and ``eps`` belong to that direction. ``step`` is ``trainer.global_step`` when
    :class:`~gradmon.callbacks.grad_check.GradCheck` ran the check, and None from :func:`check_gradients` itself.
    """

    layer: str
    rel_error: float
    analytic: float
    numerical: float
    eps: float
    status: Status
    step: int | None = None

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

    def along(index: int) -> Callable[[float], float]:
        def f_shifted(offset: float) -> float:
            original = flat[index].item()
            flat[index] = original + offset
            value = float(f(point))
            flat[index] = original
            return value

        return f_shifted

    with torch.no_grad():
        derivatives = [central_difference(along(index), eps) for index in selected]
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
    train/eval modes except for dropout (eval), without module hooks, and uncompiled.

    Hooks are left behind because they belong to the real run: a monitor's hook must not see the check's passes, and
    a hook bound to an object (a callback) would otherwise be deep-copied with it.

    ``torch.compile`` is undone in the copy, wherever it was applied, so that the check differentiates the model's
    own Python code in float64 and never compiles it again for float64: an ``OptimizedModule`` (the model itself or
    a submodule such as ``self.net = torch.compile(net)``) is replaced by the module it wraps, and a compiled
    callable stored on a module is replaced by the function it compiles, a method rebound to the copy. Lightning's
    ``trainer.fit(torch.compile(model))`` stores such callables as the module's ``forward`` and ``training_step``;
    a deep copy keeps them calling the original float32 module, so without this the copy would run the real model.
    (``Module.compile()`` needs nothing: a deep copy drops its compiled call.)
    """
    memo: dict[int, Any] = {
        id(hooks): type(hooks)()
        for module in model.modules()
        for name, hooks in vars(module).items()
        if "_hooks" in name and isinstance(hooks, dict)
    }
    replica = _uncompiled(copy.deepcopy(model, memo), memo).double()
    for module in replica.modules():
        if isinstance(module, DROPOUT_MODULES):
            module.eval()
    return replica


def _uncompiled(replica: nn.Module, copies: dict[int, Any]) -> nn.Module:
    """``replica`` with every trace of ``torch.compile`` replaced by the code it compiles (see :func:`float64_copy`);
    ``copies`` is the deep copy's memo, mapping ``id`` of an original object to its copy."""
    compiled_type = _compiled_module_type()
    if compiled_type is None:
        return replica
    replica = _unwrap_module(replica, compiled_type)
    for module in replica.modules():
        for name, child in list(module._modules.items()):
            module._modules[name] = None if child is None else _unwrap_module(child, compiled_type)
    for module in replica.modules():
        for name, value in list(vars(module).items()):
            if callable(value) and hasattr(value, "_torchdynamo_orig_callable"):
                module.__dict__[name] = _uncompiled_callable(value, copies)
    return replica


def _compiled_module_type() -> type | None:
    """``torch._dynamo.OptimizedModule``, or None while ``torch._dynamo`` is not imported: nothing can have been
    compiled then, and importing it costs seconds."""
    dynamo = sys.modules.get("torch._dynamo")
    return getattr(dynamo, "OptimizedModule", None)


def _unwrap_module(module: nn.Module, compiled_type: type) -> nn.Module:
    while isinstance(module, compiled_type):
        module = module._orig_mod
    return module


def _uncompiled_callable(fn: Callable[..., Any], copies: dict[int, Any]) -> Callable[..., Any]:
    """The function a dynamo wrapper compiles; a method of an original module is rebound to that module's copy."""
    # Follow only real wrappers, as dynamo's own `innermost_fn` does: `functools.wraps` copies the attribute onto
    # functions that merely wrap a compiled one, and their id does not match.
    while hasattr(fn, "_torchdynamo_orig_callable") and getattr(fn, "_torchdynamo_wrapper_id", None) == id(fn):
        fn = fn._torchdynamo_orig_callable
    if isinstance(fn, types.MethodType) and id(fn.__self__) in copies:
        return types.MethodType(fn.__func__, copies[id(fn.__self__)])
    return fn


def batch_statistics_layers(model: nn.Module) -> list[str]:
    """The BatchNorm layers of ``model`` (by :func:`gradmon.naming.clean_name`) that normalize with the statistics of
    the batch they are given: those in training mode, and those without running statistics in either mode.

    On the samples :func:`check_gradients` is given these need at least two: with one sample per channel PyTorch
    refuses the forward pass, and the statistics of a single sample are not those the run normalizes with.
    """
    return [
        clean_name(name)
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        and (module.training or (module.running_mean is None and module.running_var is None))
    ]


def check_thresholds(fail_above: Any, good_below: Any) -> tuple[float, float]:
    """``(fail_above, good_below)`` as floats if ``0 < good_below < fail_above < 2``, else ``ValueError`` naming the
    argument at fault. A relative error never exceeds 2, so ``fail_above >= 2`` could never fail a layer."""
    fail = check_float("fail_above", fail_above, maximum=MAX_RELATIVE_ERROR, max_inclusive=False)
    good = check_float("good_below", good_below)
    if not good < fail:
        raise invalid("good_below", good_below, f"a number below fail_above={fail_above!r}")
    return fail, good


def max_retries(eps: float) -> int:
    """The most retries :func:`check_gradients` can make from ``eps``: each divides the step by ten, and the last
    step must still be a normal float64 (the central difference divides by it)."""
    count, step = 0, eps
    # Counted the way `_check_direction` divides, so that rounding cannot put the bound one off.
    while step / 10.0 >= sys.float_info.min:
        count, step = count + 1, step / 10.0
    return count


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
    """Directional gradient check of every layer of ``model``: autograd against central differences, in float64.

    One backward gives the autograd gradient ``g`` of all layers; then for each layer and each of ``num_directions``
    Gaussian directions ``v`` on that layer's parameters, scaled to unit norm so that ``eps`` is the same step length
    in every layer, the check compares ``a = g . v`` with ``n = (L(w + eps v) - L(w - eps v)) / 2 eps`` by
    :func:`relative_error`. A kink (ReLU, max, abs) between ``w - eps v`` and ``w + eps v`` makes one direction look
    wrong, so a direction that fails is tried again with a new direction and a ten times smaller ``eps``.

    ``model`` and the global CPU and CUDA random states are left exactly as they were; every loss evaluation starts
    from the same random state, so randomness inside ``loss_fn`` is the same in all of them. Costs one forward and
    backward plus ``2 * num_directions`` forward passes per layer (more on retries), and a float64 copy of the model.
    A compiled model is checked uncompiled (see :func:`float64_copy`).

    Args:
        model: The model to check; it is not changed.
        loss_fn: ``loss_fn(replica, inputs)`` returns the scalar loss of ``replica`` (a :func:`float64_copy` of
            ``model``) on ``inputs``.
        inputs: Passed to ``loss_fn`` with every floating tensor in it cast to float64.
        num_directions: Random directions per layer (at least 1); the worst one is reported.
        eps: Step length of the central difference (finite, > 0).
        fail_above: A relative error above this is ``"wrong"`` (``good_below < fail_above < 2``).
        good_below: A relative error below this is ``"good"``; in between, ``"acceptable"``.
        retries: Attempts after a failing direction, each with a smaller step (``0 <= retries <= max_retries(eps)``).
        seed: Seeds the directions and every loss evaluation (``0 <= seed < 2**64``).

    Returns:
        One :class:`LayerCheck` per layer with parameters, named as the user named the layer
        (:func:`gradmon.naming.layer_name`: wrapper pieces such as ``_orig_mod.`` are dropped).

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``loss_fn`` is not callable.
        ValueError: naming the argument, for any other argument out of its range; checked before any work.
    """
    eps, fail_above, good_below = _checked_arguments(
        model, loss_fn, num_directions, eps, fail_above, good_below, retries, seed
    )
    with forked_rng(model) as cuda_devices:
        replica = float64_copy(model)
        inputs = apply_to_tensors(inputs, lambda t: t.double() if t.is_floating_point() else t)
        layers = layer_parameters(replica)

        def loss_at_seed() -> Tensor:
            reseed(seed, cuda_devices)
            return loss_fn(replica, inputs)

        parameters = [param for layer in layers.values() for param in layer]
        with torch.enable_grad():
            loss = loss_at_seed()
            gradients = torch.autograd.grad(loss, parameters, allow_unused=True) if parameters else ()
        loss_scale = max(abs(loss.item()), 1.0)
        generator = torch.Generator().manual_seed(seed)
        checks = []
        for (name, layer), layer_gradients in zip(layers.items(), _per_layer(layers, parameters, gradients)):
            attempts = [
                _check_direction(layer, layer_gradients, loss_at_seed, generator, eps, retries, loss_scale, fail_above)
                for _ in range(num_directions)
            ]
            worst = max(attempts, key=lambda attempt: attempt.rel_error)
            checks.append(LayerCheck(name, *worst, status=judge(worst.rel_error, fail_above, good_below)))
    return checks


def _checked_arguments(
    model: Any,
    loss_fn: Any,
    num_directions: Any,
    eps: Any,
    fail_above: Any,
    good_below: Any,
    retries: Any,
    seed: Any,
) -> tuple[float, float, float]:
    """``(eps, fail_above, good_below)`` as floats once every argument of :func:`check_gradients` is valid; raises
    ``TypeError``/``ValueError`` naming the first that is not."""
    if not isinstance(model, nn.Module):
        raise TypeError(*invalid("model", model, "a torch.nn.Module").args)
    if not callable(loss_fn):
        raise TypeError(*invalid("loss_fn", loss_fn, "a callable loss_fn(model, inputs)").args)
    check_int("num_directions", num_directions, 1)
    eps = check_float("eps", eps)
    fail_above, good_below = check_thresholds(fail_above, good_below)
    check_int("retries", retries, 0, maximum=max_retries(eps))
    check_seed("seed", seed)
    return eps, fail_above, good_below


def _per_layer(
    layers: dict[str, list[nn.Parameter]], parameters: list[nn.Parameter], gradients: Sequence[Tensor | None]
) -> list[list[Tensor]]:
    """Each layer's autograd gradients (zeros for a parameter the loss does not use), from one flat list."""
    gradient_of = {id(param): gradient for param, gradient in zip(parameters, gradients)}
    return [
        [torch.zeros_like(param) if gradient_of.get(id(param)) is None else gradient_of[id(param)] for param in layer]
        for layer in layers.values()
    ]


class _Attempt(NamedTuple):
    """One central difference along one direction, compared with autograd."""

    rel_error: float
    analytic: float
    numerical: float
    eps: float


def _check_direction(
    layer: list[nn.Parameter],
    gradients: list[Tensor],
    loss: Callable[[], Tensor],
    generator: torch.Generator,
    eps: float,
    retries: int,
    loss_scale: float,
    fail_above: float,
) -> _Attempt:
    """The first passing one of up to ``1 + retries`` attempts, each along a new direction, else the best failure.

    A kink (ReLU, max, abs) within the step makes one direction look wrong, so each retry after a failure takes a ten
    times smaller step. But the smaller the step, the larger the part of the loss's rounding in the central
    difference, and the error's floor (what that rounding can explain) grows with it: after enough retries any two
    numbers agree. So a pass counts as measured only when the derivatives are above that floor. A pass that is not
    measured settles the layer only when nothing has failed (a derivative that is zero, or rounding noise, along the
    direction tried); after a failure it is no verdict, and the next retry goes back to the first step, with a new
    direction. A layer that failed where it could be measured, and passed only where it could not, fails."""
    weights = [param.detach().clone() for param in layer]
    best = _Attempt(math.inf, math.nan, math.nan, eps)
    step, measured = eps, True
    for retry in range(retries + 1):
        if retry:
            # One division at a time: `eps / 10**retry` overflows converting 10**retry past 308.
            step = step / 10.0 if measured else eps
        direction = _unit_direction(layer, generator)
        analytic = sum((g * v).sum() for g, v in zip(gradients, direction)).item()
        numerical = central_difference(partial(_loss_along, layer, weights, direction, loss), step)
        # With this floor a difference the rounding of the loss can explain never exceeds `fail_above`.
        rounding = _LOSS_ROUNDING_UNITS * torch.finfo(torch.float64).eps * loss_scale / step
        floor = rounding / fail_above
        error = relative_error(analytic, numerical, floor=floor)
        measured = max(abs(analytic), abs(numerical)) >= floor
        if error <= fail_above:
            if measured or best.rel_error == math.inf:
                return _Attempt(error, analytic, numerical, step)
            continue
        if error < best.rel_error:
            best = _Attempt(error, analytic, numerical, step)
    return best

@torch.no_grad()
def _loss_along(
    layer: list[nn.Parameter], weights: list[Tensor], direction: list[Tensor], loss: Callable[[], Tensor], offset: float
) -> float:
    """The loss with ``layer`` moved to ``weights + offset * direction``; the layer is put back to ``weights``."""
    for param, weight, component in zip(layer, weights, direction):
        param.copy_(weight + offset * component)
    value = loss().item()
    for param, weight in zip(layer, weights):
        param.copy_(weight)
    return value



def _unit_direction(layer: list[nn.Parameter], generator: torch.Generator) -> list[Tensor]:
    """A Gaussian direction over all of the layer's parameters, with unit norm taken jointly."""
    direction = [torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.device) for p in layer]
    norm = torch.stack([v.square().sum() for v in direction]).sum().sqrt()
    return [v / norm for v in direction]
