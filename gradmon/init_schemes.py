r"""The initialisation schemes: one function per scheme, in the style of ``torch/nn/init.py``.

Each fills a tensor in place; its docstring gives the formula and the paper. Fans come from :func:`compute_fans` and
the gain from :func:`compute_gain`, shared by every scheme rather than derived again in each. The schemes that draw
take a keyword ``generator`` (the global RNG when None); ``constant_``, ``zeros_`` and ``ones_`` draw nothing and take
none, so callers go through :func:`apply_scheme`, which hands the generator only to the schemes that use it.

:data:`SCHEMES` names them for :mod:`gradmon.init_spec` (the string form ``"normal(std=0.01)"``) and
:func:`gradmon.init.initialize` (which layers and weights get them). Pure torch: never imports Lightning.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from gradmon._validation import FLOAT32_MAX, check_choice, check_float, invalid
from gradmon.sharding import DTensor

#: The names ``torch.nn.init.calculate_gain`` knows.
NONLINEARITIES = (
    "linear",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "sigmoid",
    "tanh",
    "relu",
    "leaky_relu",
    "selu",
)

#: Keyword arguments of ``check_float`` for a weight value, bound or slope: it must survive the cast to float32
#: (1e39 is finite in Python and inf in the tensor).
FLOAT32_RANGE = {"minimum": -FLOAT32_MAX, "inclusive": True, "maximum": FLOAT32_MAX}


# ----------------------------------------------------------------------------------------------------------------
# Fans and gains, shared by every scheme
# ----------------------------------------------------------------------------------------------------------------


def compute_fans(tensor: torch.Tensor) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a weight shaped ``(out, in, *kernel)``: ``in * prod(kernel)``, ``out * prod(kernel)``.

    The same convention as ``torch.nn.init``; a transposed convolution's weight is ``(in, out, *kernel)``, so its
    fans come out swapped, as they do in torch. Stacked weights (an LSTM's four gates, attention's query, key and
    value) count as one matrix: fan_out is the stacked size.
    """
    if tensor.dim() < 2:
        raise ValueError(f"fans need a weight with at least 2 dimensions, this one has shape {tuple(tensor.shape)}")
    receptive_field = math.prod(tensor.shape[2:])
    return tensor.shape[1] * receptive_field, tensor.shape[0] * receptive_field


def compute_gain(gain: float | None = None, nonlinearity: str | None = None, param: float | None = None) -> float:
    """The factor a scheme scales its spread by: ``gain`` as given, else
    ``torch.nn.init.calculate_gain(nonlinearity, param)`` (``param`` is leaky_relu's negative slope), else 1."""
    if nonlinearity is None:
        if param is not None:
            # Without a nonlinearity the slope would be silently ignored, and the gain would be 1.
            raise invalid(
                "param",
                param,
                "None without `nonlinearity`, or nonlinearity='leaky_relu' with param its negative slope",
            )
        return 1.0 if gain is None else check_float("gain", gain, maximum=FLOAT32_MAX)
    if gain is not None:
        raise invalid(
            "gain",
            gain,
            f"gain or nonlinearity, not both given (the gain is computed from nonlinearity={nonlinearity!r})",
        )
    check_choice("nonlinearity", nonlinearity, NONLINEARITIES)
    check_float("param", param, **FLOAT32_RANGE, allow_none=True)
    return float(nn.init.calculate_gain(nonlinearity, param))


def _fan(tensor: torch.Tensor, mode: str) -> int:
    fan_in, fan_out = compute_fans(tensor)
    return fan_in if check_choice("mode", mode, ("fan_in", "fan_out")) == "fan_in" else fan_out


def _check_range(a: float, b: float) -> None:
    check_float("a", a, **FLOAT32_RANGE)
    check_float("b", b, **FLOAT32_RANGE)
    if not a < b:
        raise invalid("b", b, f"a number above `a={a!r}`")


def largest_value(tensor: torch.Tensor) -> float:
    """The largest value ``tensor``'s dtype holds (unbounded for an integer tensor, which no scheme fills)."""
    return torch.finfo(tensor.dtype).max if tensor.is_floating_point() else math.inf


def _uniform(
    tensor: torch.Tensor, low: float, high: float, generator: torch.Generator | None, name: str, value: Any
) -> torch.Tensor:
    # torch refuses a range wider than the dtype's largest value with a RuntimeError deep in the draw; refuse it
    # here instead, naming the argument that made it.
    largest = largest_value(tensor)
    if high - low > largest:
        raise invalid(name, value, f"a range [{low:g}, {high:g}] no wider than {largest:g}, the largest {tensor.dtype}")
    return nn.init.uniform_(tensor, low, high, generator=generator)


def _finite(tensor: torch.Tensor, name: str, value: Any) -> torch.Tensor:
    # A spread that is finite itself can still draw values beyond the dtype (std=3e38 in float32, 1e5 in float16).
    # A shard is checked as the whole tensor, by the caller that drew it.
    if tensor.is_meta or isinstance(tensor, DTensor) or bool(torch.isfinite(tensor).all()):
        return tensor
    raise invalid(name, value, f"a value whose draws fit in {tensor.dtype} (some became inf)")


# ----------------------------------------------------------------------------------------------------------------
# The schemes: each fills ``tensor`` in place; those that draw take ``generator`` (the global RNG when None)
# ----------------------------------------------------------------------------------------------------------------


def normal_(
    tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    r""":math:`\mathcal{N}(\text{mean}, \text{std}^2)`."""
    check_float("mean", mean, **FLOAT32_RANGE)
    check_float("std", std, inclusive=True, maximum=FLOAT32_MAX)
    return _finite(nn.init.normal_(tensor, mean, std, generator=generator), "std", std)


def uniform_(
    tensor: torch.Tensor, a: float = 0.0, b: float = 1.0, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    r""":math:`\mathcal{U}(a, b)`, with torch's defaults :math:`a = 0, b = 1`."""
    _check_range(a, b)
    return _uniform(tensor, a, b, generator, "b", b)


def constant_(tensor: torch.Tensor, val: float) -> torch.Tensor:
    """Every entry ``val``."""
    check_float("val", val, **FLOAT32_RANGE)
    if abs(val) > largest_value(tensor):
        raise invalid("val", val, f"a number within {tensor.dtype}'s range")
    return nn.init.constant_(tensor, val)


def zeros_(tensor: torch.Tensor) -> torch.Tensor:
    """Every entry 0."""
    return nn.init.zeros_(tensor)


def ones_(tensor: torch.Tensor) -> torch.Tensor:
    """Every entry 1."""
    return nn.init.ones_(tensor)


def xavier_uniform_(
    tensor: torch.Tensor,
    gain: float | None = None,
    nonlinearity: str | None = None,
    param: float | None = None,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r""":math:`\mathcal{U}(-b, b)` with :math:`b = \text{gain} \sqrt{6 / (\text{fan\_in} + \text{fan\_out})}`.

    Glorot, X. & Bengio, Y. (2010), *Understanding the difficulty of training deep feedforward neural networks*.
    """
    fan_in, fan_out = compute_fans(tensor)
    bound = compute_gain(gain, nonlinearity, param) * math.sqrt(6.0 / (fan_in + fan_out))
    return _uniform(tensor, -bound, bound, generator, "gain", gain)


def xavier_normal_(
    tensor: torch.Tensor,
    gain: float | None = None,
    nonlinearity: str | None = None,
    param: float | None = None,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r""":math:`\mathcal{N}(0, \sigma^2)`, :math:`\sigma = \text{gain} \sqrt{2 / (\text{fan\_in} + \text{fan\_out})}`.

    Glorot, X. & Bengio, Y. (2010), *Understanding the difficulty of training deep feedforward neural networks*.
    """
    fan_in, fan_out = compute_fans(tensor)
    std = compute_gain(gain, nonlinearity, param) * math.sqrt(2.0 / (fan_in + fan_out))
    return _finite(nn.init.normal_(tensor, 0.0, std, generator=generator), "gain", gain)


def kaiming_uniform_(
    tensor: torch.Tensor,
    a: float = 0.0,
    mode: str = "fan_in",
    nonlinearity: str = "leaky_relu",
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r""":math:`\mathcal{U}(-b, b)` with :math:`b = \text{gain} \sqrt{3 / \text{fan\_mode}}`, the gain of
    ``nonlinearity`` with negative slope ``a`` (torch's defaults: :math:`\sqrt{2}`).

    He, K. et al. (2015), *Delving deep into rectifiers: Surpassing human-level performance on ImageNet
    classification*.
    """
    check_float("a", a, **FLOAT32_RANGE)
    check_choice("nonlinearity", nonlinearity, NONLINEARITIES)
    bound = compute_gain(nonlinearity=nonlinearity, param=a) * math.sqrt(3.0 / _fan(tensor, mode))
    return nn.init.uniform_(tensor, -bound, bound, generator=generator)


def kaiming_normal_(
    tensor: torch.Tensor,
    a: float = 0.0,
    mode: str = "fan_in",
    nonlinearity: str = "leaky_relu",
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r""":math:`\mathcal{N}(0, \sigma^2)` with :math:`\sigma = \text{gain} / \sqrt{\text{fan\_mode}}`, the gain of
    ``nonlinearity`` with negative slope ``a`` (torch's defaults: :math:`\sqrt{2}`).

    He, K. et al. (2015), *Delving deep into rectifiers: Surpassing human-level performance on ImageNet
    classification*.
    """
    check_float("a", a, **FLOAT32_RANGE)
    check_choice("nonlinearity", nonlinearity, NONLINEARITIES)
    std = compute_gain(nonlinearity=nonlinearity, param=a) / math.sqrt(_fan(tensor, mode))
    return nn.init.normal_(tensor, 0.0, std, generator=generator)


def lecun_uniform_(tensor: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    r""":math:`\mathcal{U}(-b, b)` with :math:`b = \sqrt{3 / \text{fan\_in}}`, so the variance is
    :math:`1 / \text{fan\_in}`.

    LeCun, Y. et al. (1998), *Efficient BackProp*.
    """
    bound = math.sqrt(3.0 / compute_fans(tensor)[0])
    return nn.init.uniform_(tensor, -bound, bound, generator=generator)


def lecun_normal_(tensor: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    r""":math:`\mathcal{N}(0, 1 / \text{fan\_in})` (not truncated).

    LeCun, Y. et al. (1998), *Efficient BackProp*.
    """
    std = 1.0 / math.sqrt(compute_fans(tensor)[0])
    return nn.init.normal_(tensor, 0.0, std, generator=generator)


def orthogonal_(
    tensor: torch.Tensor,
    gain: float | None = None,
    nonlinearity: str | None = None,
    param: float | None = None,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""A (semi-)orthogonal matrix times the gain: :math:`W W^\top = \text{gain}^2 I` for a wide weight,
    :math:`W^\top W = \text{gain}^2 I` for a tall one (an LSTM's stacked gates), trailing dimensions flattened.

    Saxe, A. et al. (2013), *Exact solutions to the nonlinear dynamics of learning in deep linear neural networks*.
    """
    compute_fans(tensor)
    nn.init.orthogonal_(tensor, compute_gain(gain, nonlinearity, param), generator=generator)
    return _finite(tensor, "gain", gain)


def trunc_normal_(
    tensor: torch.Tensor,
    mean: float = 0.0,
    std: float = 1.0,
    a: float | None = None,
    b: float | None = None,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r""":math:`\mathcal{N}(\text{mean}, \text{std}^2)` restricted to :math:`[a, b]`, by default
    :math:`\text{mean} \pm 2\,\text{std}` (torch's own default is the absolute :math:`[-2, 2]`). Cut at
    :math:`\pm 2\,\text{std}`, the standard deviation of the result is about :math:`0.88\,\text{std}`.
    """
    check_float("mean", mean, **FLOAT32_RANGE)
    check_float("std", std, maximum=FLOAT32_MAX)
    # Only the bounds the user wrote are held to float32's range; the defaults are clamped to it like the draws.
    low = max(mean - 2.0 * std, -FLOAT32_MAX) if a is None else a
    high = min(mean + 2.0 * std, FLOAT32_MAX) if b is None else b
    if a is None and b is None and not low < high:
        raise invalid("std", std, f"mean ± 2 std to be distinct numbers (mean={mean!r})")
    _check_range(low, high)
    return _finite(nn.init.trunc_normal_(tensor, mean, std, low, high, generator=generator), "std", std)


#: Every tensor scheme by name; ``default`` is not here, it calls the layer's ``reset_parameters``.
SCHEMES: dict[str, Callable[..., torch.Tensor]] = {
    "normal": normal_,
    "uniform": uniform_,
    "constant": constant_,
    "zeros": zeros_,
    "ones": ones_,
    "xavier_uniform": xavier_uniform_,
    "xavier_normal": xavier_normal_,
    "kaiming_uniform": kaiming_uniform_,
    "kaiming_normal": kaiming_normal_,
    "lecun_uniform": lecun_uniform_,
    "lecun_normal": lecun_normal_,
    "orthogonal": orthogonal_,
    "trunc_normal": trunc_normal_,
}
DEFAULT = "default"
SCHEME_NAMES: tuple[str, ...] = (*SCHEMES, DEFAULT)

#: The schemes that draw random numbers, and so take a ``generator``.
RANDOM_SCHEMES = frozenset(
    name for name, function in SCHEMES.items() if "generator" in inspect.signature(function).parameters
)


def apply_scheme(
    scheme: str, tensor: torch.Tensor, arguments: Mapping[str, Any], generator: torch.Generator | None
) -> torch.Tensor:
    """Fill ``tensor`` in place by the scheme named ``scheme`` with its keyword ``arguments``, drawing from
    ``generator`` if the scheme draws at all."""
    if scheme in RANDOM_SCHEMES:
        return SCHEMES[scheme](tensor, **arguments, generator=generator)
    return SCHEMES[scheme](tensor, **arguments)
