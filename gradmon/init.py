r"""Weight initialisation by scheme name, on any ``nn.Module``, without Lightning.

A scheme is one of :data:`SCHEME_NAMES`, given with its arguments as keywords,
``initialize(model, "normal", std=0.01)``, or as a string, ``initialize(model, "normal(std=0.01)")``, which is how
configs and command lines spell it. Each scheme is one function below, in the style of ``torch/nn/init.py``: in place,
the formula and the paper in its docstring, the fans from :func:`compute_fans` and the gain from :func:`compute_gain`.
``default`` is the layer's own ``reset_parameters``.

:func:`initialize` picks the layers (by type, then by ``include`` / ``exclude`` regular expressions on the module
names from ``named_modules``, cleaned by :func:`gradmon.naming.clean_name` so that ``torch.compile``, FSDP1 and
activation checkpointing wrappers do not change them), then the weight tensors of each layer (:func:`layer_weights`,
optionally narrowed by the ``weights`` regular expression), initialises each weight and the bias that goes with it,
and returns one :class:`InitRecord` per weight tensor.

A layer's weights are its ``weight``, except for the recurrent layers (``RNN``, ``LSTM``, ``GRU`` and their cells:
every ``weight_ih_l*``, ``weight_hh_l*`` and, with ``proj_size``, ``weight_hr_l*``, ``_reverse`` included) and
``MultiheadAttention`` (``in_proj_weight``, or ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight`` when the key
and value sizes differ; its ``out_proj`` is a ``Linear`` of its own). Each tensor gets its own fans, as
``torch.nn.init`` computes them for that tensor: the gates of an LSTM (or the query, key and value projections of
``in_proj_weight``) are stacked along the first dimension, so ``weight_hh_l0`` of an LSTM with hidden size ``H`` has
fan_in ``H`` and fan_out ``4H``, and ``orthogonal`` makes the whole stacked matrix (semi-)orthogonal.

Example::

    records = initialize(model, "kaiming_normal", nonlinearity="relu", generator=torch.Generator().manual_seed(0))
    initialize(model, "normal(std=0.01)", include=r"^head\.")
    initialize(model, "orthogonal", types="LSTM", weights="weight_hh")
"""

from __future__ import annotations

import ast
import importlib
import inspect
import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradmon._validation import FLOAT32_MAX, check_choice, check_float
from gradmon.naming import clean_name
from gradmon.norms import DTensor

#: The layers initialised unless ``types`` says otherwise; subclasses count. Normalisation layers and embeddings
#: are left alone because their weights are not fan-scaled matrices: select them explicitly to initialise them.
DEFAULT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.RNN,
    nn.LSTM,
    nn.GRU,
    nn.RNNCell,
    nn.LSTMCell,
    nn.GRUCell,
    nn.MultiheadAttention,
)

#: The ``torch.nn`` layers whose weights :func:`layer_weights` knows, subclasses included. ``types`` accepts these
#: and any ``nn.Module`` subclass defined outside torch (whose weights cannot be known before it is built).
SUPPORTED_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Embedding,
    nn.EmbeddingBag,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.RNNBase,
    nn.RNNCellBase,
    nn.MultiheadAttention,
)

_ACCEPTED_TYPES = (
    "layer types whose weights gradmon can initialise (Linear, Bilinear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, "
    "Embedding, EmbeddingBag, BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm1d/2d/3d, LayerNorm, GroupNorm, RMSNorm, "
    "RNN, LSTM, GRU, RNNCell, LSTMCell, GRUCell, MultiheadAttention, and their subclasses) or nn.Module subclasses "
    "defined outside torch, as classes or names such as 'Linear' or 'torch.nn.Embedding'"
)

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

BIAS_CHOICES = ("zeros", "keep")

#: A layer type, or its name: ``"Linear"`` (from ``torch.nn``) or a dotted path such as ``"torch.nn.Embedding"``.
LayerType = str | type

# A weight value, bound or slope must survive the cast to float32: 1e39 is finite in Python and inf in the tensor.
_FLOAT32 = {"minimum": -FLOAT32_MAX, "inclusive": True, "maximum": FLOAT32_MAX}


@dataclass(frozen=True)
class InitRecord:
    """What :func:`initialize` did to one weight tensor: its standard deviation before and after.

    ``layer`` is the layer's cleaned module name and ``weight`` the tensor's name within the layer (``"weight"``,
    ``"weight_hh_l0"``, ``"in_proj_weight"``; empty for a ``default`` reset of a layer without weights).
    """

    layer: str
    scheme: str
    arguments: dict[str, Any]
    std_before: float
    std_after: float
    weight: str = "weight"

    @property
    def name(self) -> str:
        """The layer's name for a layer's only ``weight`` (``net.0``), else ``layer.weight`` (``lstm.weight_hh_l0``)."""
        return _weight_name(self.layer, self.weight)


def _weight_name(layer: str, weight: str) -> str:
    own = "" if weight == "weight" else weight
    return ".".join(part for part in (layer, own) if part)


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
            raise ValueError(
                f"`param={param!r}` is not valid without `nonlinearity`: expected None, or nonlinearity='leaky_relu' "
                "with param its negative slope."
            )
        return 1.0 if gain is None else check_float("gain", gain, maximum=FLOAT32_MAX)
    if gain is not None:
        raise ValueError(
            f"`gain={gain!r}` and `nonlinearity={nonlinearity!r}` are both given: expected one of them "
            "(the gain is computed from the nonlinearity)."
        )
    check_choice("nonlinearity", nonlinearity, NONLINEARITIES)
    check_float("param", param, **_FLOAT32, allow_none=True)
    return float(nn.init.calculate_gain(nonlinearity, param))


def _fan(tensor: torch.Tensor, mode: str) -> int:
    fan_in, fan_out = compute_fans(tensor)
    return fan_in if check_choice("mode", mode, ("fan_in", "fan_out")) == "fan_in" else fan_out


def _check_range(a: float, b: float) -> None:
    check_float("a", a, **_FLOAT32)
    check_float("b", b, **_FLOAT32)
    if not a < b:
        raise ValueError(f"`a={a!r}` and `b={b!r}` are not valid: expected a < b.")


def _largest(tensor: torch.Tensor) -> float:
    return torch.finfo(tensor.dtype).max if tensor.is_floating_point() else math.inf


def _uniform(
    tensor: torch.Tensor, low: float, high: float, generator: torch.Generator | None, name: str, value: Any
) -> torch.Tensor:
    # torch refuses a range wider than the dtype's largest value with a RuntimeError deep in the draw; refuse it
    # here instead, naming the argument that made it.
    if high - low > _largest(tensor):
        raise ValueError(
            f"`{name}={value!r}` is not valid: expected a range [{low:g}, {high:g}] no wider than "
            f"{_largest(tensor):g}, the largest {tensor.dtype}."
        )
    return nn.init.uniform_(tensor, low, high, generator=generator)


def _finite(tensor: torch.Tensor, name: str, value: Any) -> torch.Tensor:
    # A spread that is finite itself can still draw values beyond the dtype (std=3e38 in float32, 1e5 in float16).
    # A shard is checked as the whole tensor, by the caller that drew it.
    if tensor.is_meta or isinstance(tensor, DTensor) or bool(torch.isfinite(tensor).all()):
        return tensor
    raise ValueError(
        f"`{name}={value!r}` is not valid: expected a value whose draws fit in {tensor.dtype} (some became inf)."
    )


# ----------------------------------------------------------------------------------------------------------------
# The schemes: each fills ``tensor`` in place, drawing from ``generator`` (the global RNG when None)
# ----------------------------------------------------------------------------------------------------------------


def normal_(
    tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    r""":math:`\mathcal{N}(\text{mean}, \text{std}^2)`."""
    check_float("mean", mean, **_FLOAT32)
    check_float("std", std, inclusive=True, maximum=FLOAT32_MAX)
    return _finite(nn.init.normal_(tensor, mean, std, generator=generator), "std", std)


def uniform_(
    tensor: torch.Tensor, a: float = 0.0, b: float = 1.0, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    r""":math:`\mathcal{U}(a, b)`, with torch's defaults :math:`a = 0, b = 1`."""
    _check_range(a, b)
    return _uniform(tensor, a, b, generator, "b", b)


def constant_(tensor: torch.Tensor, val: float, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Every entry ``val``."""
    check_float("val", val, **_FLOAT32)
    if abs(val) > _largest(tensor):
        raise ValueError(f"`val={val!r}` is not valid: expected a number within {tensor.dtype}'s range.")
    return nn.init.constant_(tensor, val)


def zeros_(tensor: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Every entry 0."""
    return nn.init.zeros_(tensor)


def ones_(tensor: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
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
    check_float("a", a, **_FLOAT32)
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
    check_float("a", a, **_FLOAT32)
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
    check_float("mean", mean, **_FLOAT32)
    check_float("std", std, maximum=FLOAT32_MAX)
    # Only the bounds the user wrote are held to float32's range; the defaults are clamped to it like the draws.
    low = max(mean - 2.0 * std, -FLOAT32_MAX) if a is None else a
    high = min(mean + 2.0 * std, FLOAT32_MAX) if b is None else b
    if a is None and b is None and not low < high:
        raise ValueError(f"`std={std!r}` is not valid: expected mean ± 2 std to be distinct numbers (mean={mean!r}).")
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


# ----------------------------------------------------------------------------------------------------------------
# Reading and checking what the user wrote
# ----------------------------------------------------------------------------------------------------------------


def parse_scheme(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``"normal(std=0.01)"`` into ``("normal", {"std": 0.01})``; a bare name has no arguments.

    The string comes from configs and command lines, so it is parsed, never evaluated: only a name, optionally
    called with keyword arguments whose values are Python literals.
    """
    malformed = ValueError(
        f"`scheme={spec!r}` is not valid: expected a scheme name, optionally with literal keyword arguments, "
        "such as 'xavier_uniform' or \"normal(std=0.01)\"."
    )
    if not isinstance(spec, str):
        raise malformed
    try:
        node = ast.parse(spec.strip(), mode="eval").body
    except (SyntaxError, ValueError):  # ValueError: a null byte in the string
        raise malformed from None
    if isinstance(node, ast.Name):
        return node.id, {}
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)) or node.args:
        raise malformed
    names = [keyword.arg for keyword in node.keywords]
    if None in names or len(set(names)) < len(names):
        raise malformed
    try:
        return node.func.id, {keyword.arg: ast.literal_eval(keyword.value) for keyword in node.keywords}
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise malformed from None


def format_scheme(scheme: str, arguments: Mapping[str, Any]) -> str:
    """The string form :func:`parse_scheme` reads: ``format_scheme("normal", {"std": 0.01}) == "normal(std=0.01)"``."""
    if not arguments:
        return scheme
    return f"{scheme}({', '.join(f'{key}={value!r}' for key, value in arguments.items())})"


def scheme_keywords(scheme: str) -> tuple[str, ...]:
    """The keyword arguments a scheme accepts."""
    if scheme == DEFAULT:
        return ()
    return tuple(p for p in inspect.signature(SCHEMES[scheme]).parameters if p not in ("tensor", "generator"))


def resolve_scheme(scheme: str, arguments: Mapping[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """The scheme's name and all its arguments, from the string form and keywords together, checked.

    Raises ``ValueError`` naming the argument for an unknown name, an unknown or missing keyword, a keyword given
    twice, or a value the scheme rejects (not a finite number, beyond float32's range, a bad choice); the checks
    run on a small scratch tensor with a private generator, so they cost nothing and leave the global RNG alone.
    """
    name, parsed = parse_scheme(scheme)
    check_choice("scheme", name, SCHEME_NAMES)
    arguments = dict(arguments or {})
    twice = sorted(parsed.keys() & arguments.keys())
    if twice:
        raise ValueError(f"`{twice[0]}` is given both in `scheme={scheme!r}` and as a keyword: expected it once.")
    arguments = {**parsed, **arguments}
    accepted = scheme_keywords(name)
    unknown = [keyword for keyword in arguments if keyword not in accepted]
    if unknown:
        keywords = (
            f"one of the keywords scheme {name!r} accepts: {', '.join(accepted)}"
            if accepted
            else f"no keywords: scheme {name!r} accepts none"
        )
        raise ValueError(f"`{unknown[0]}={arguments[unknown[0]]!r}` is not valid: expected {keywords}.")
    if name == DEFAULT:
        return name, arguments
    function = SCHEMES[name]
    required = [p.name for p in inspect.signature(function).parameters.values() if p.default is p.empty]
    missing = [keyword for keyword in required if keyword != "tensor" and keyword not in arguments]
    if missing:
        raise ValueError(
            f"`scheme={scheme!r}` is not valid: expected a value for its keyword {missing[0]!r}, "
            f"such as {format_scheme(name, {missing[0]: 0.0})!r}."
        )
    try:
        function(torch.empty(4, 4), **arguments, generator=torch.Generator())
    except ValueError as error:
        raise ValueError(f"Scheme {name!r}: {error}") from None
    return name, arguments


def resolve_types(types: LayerType | Sequence[LayerType]) -> tuple[type[nn.Module], ...]:
    """Layer types from classes or names: ``"Linear"`` is looked up in ``torch.nn``, ``"pkg.module.Class"`` imported.

    Accepted: the ``torch.nn`` layers in :data:`SUPPORTED_TYPES` and their subclasses, and any ``nn.Module``
    subclass defined outside torch; a ``torch.nn`` class without weights (``ReLU``, ``Sequential``, ``Dropout``)
    would either be skipped or fail at fit start, so it is refused here.
    """
    if isinstance(types, (str, type)):
        entries: tuple[Any, ...] = (types,)
    elif isinstance(types, Iterable) and not isinstance(types, (bytes, bytearray, Mapping)):
        entries = tuple(types)
    else:
        raise ValueError(
            f"`types={types!r}` is not valid: expected a layer type, its name, or a list of them: {_ACCEPTED_TYPES}."
        )
    if not entries:
        raise ValueError(f"`types={types!r}` is not valid: expected at least one of the {_ACCEPTED_TYPES}.")
    return tuple(_resolve_type(types, entry) for entry in entries)


def _resolve_type(types: Any, entry: Any) -> type[nn.Module]:
    layer_type: Any = entry
    if isinstance(entry, str):
        module_name, _, class_name = entry.rpartition(".")
        try:
            layer_type = getattr(importlib.import_module(module_name or "torch.nn"), class_name)
        except (ImportError, AttributeError, TypeError, ValueError):
            layer_type = None
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise ValueError(
            f"`types={types!r}` is not valid: expected {_ACCEPTED_TYPES}; {entry!r} is not an nn.Module subclass or "
            "the name of one."
        )
    in_torch = layer_type.__module__ == "torch" or layer_type.__module__.startswith("torch.")
    if in_torch and not issubclass(layer_type, SUPPORTED_TYPES):
        raise ValueError(
            f"`types={types!r}` is not valid: expected {_ACCEPTED_TYPES}; {layer_type.__module__}."
            f"{layer_type.__qualname__} has no weights gradmon can initialise."
        )
    return layer_type


def compile_pattern(name: str, pattern: str | re.Pattern | None) -> re.Pattern | None:
    """``pattern`` compiled (a string), as it is (a compiled string pattern) or None; anything else is refused,
    naming ``name``."""
    if pattern is None or (isinstance(pattern, re.Pattern) and isinstance(pattern.pattern, str)):
        return pattern
    if isinstance(pattern, str):
        try:
            return re.compile(pattern)
        except (re.error, OverflowError, RecursionError):
            pass
    raise ValueError(f"`{name}={pattern!r}` is not valid: expected a regular expression (a string) or None.")


def check_weights(weights: str | re.Pattern | None, scheme: str) -> re.Pattern | None:
    """The ``weights`` pattern, compiled; refused with ``default``, which resets a whole layer at once."""
    pattern = compile_pattern("weights", weights)
    if pattern is not None and scheme == DEFAULT:
        raise ValueError(
            f"`weights={weights!r}` is not valid with scheme 'default': expected None, since the layer's own "
            "reset_parameters resets all its weights."
        )
    return pattern


def check_bias(bias: str | float) -> str | float:
    """``"zeros"``, ``"keep"`` or a constant within float32's range."""
    if isinstance(bias, str) and bias in BIAS_CHOICES:
        return bias
    if not isinstance(bias, str):
        try:
            return check_float("bias", bias, **_FLOAT32)
        except ValueError:
            pass
    raise ValueError(
        f"`bias={bias!r}` is not valid: expected 'zeros', 'keep' or a finite number within float32's range "
        f"(at most {FLOAT32_MAX:g} in magnitude)."
    )


# ----------------------------------------------------------------------------------------------------------------
# Selecting and initialising layers
# ----------------------------------------------------------------------------------------------------------------


def select_layers(
    module: nn.Module,
    types: LayerType | Sequence[LayerType] = DEFAULT_TYPES,
    include: str | re.Pattern | None = None,
    exclude: str | re.Pattern | None = None,
) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` for every layer that is an instance of ``types``, whose name ``include`` finds
    (``re.search``) and ``exclude`` does not. Names are those of ``named_modules`` without the pieces that
    ``torch.compile``, FSDP1 and activation checkpointing insert (:func:`gradmon.naming.clean_name`), so
    ``include=r"^net\\.0$"`` finds ``net.0`` however ``net`` is wrapped. Warns when a pattern matches none of the
    layers of those types, or when nothing is selected, since either is almost always a typo."""
    types = resolve_types(types)
    include, exclude = compile_pattern("include", include), compile_pattern("exclude", exclude)
    typed = [(clean_name(name), layer) for name, layer in module.named_modules() if isinstance(layer, types)]
    type_names = ", ".join(t.__qualname__ for t in types)
    silent = True
    for argument, pattern in (("include", include), ("exclude", exclude)):
        if pattern is not None and not any(pattern.search(name) for name, _ in typed):
            warnings.warn(f"`{argument}={pattern.pattern!r}` matches no layer of types {type_names}.", stacklevel=3)
            silent = False
    selected = [
        (name, layer)
        for name, layer in typed
        if (include is None or include.search(name)) and not (exclude is not None and exclude.search(name))
    ]
    if not selected and silent:
        warnings.warn(f"No layer is selected: no layer of types {type_names} passes include and exclude.", stacklevel=3)
    return selected


def layer_weights(layer: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The weight tensors of ``layer`` the schemes initialise, by their names within it: ``weight``; for
    ``RNN`` / ``LSTM`` / ``GRU`` (and their cells) every ``weight_*`` (``weight_ih_l0``, ``weight_hh_l0_reverse``,
    ``weight_hr_l1``, ...); for ``MultiheadAttention`` ``in_proj_weight``, or ``q_proj_weight``, ``k_proj_weight``
    and ``v_proj_weight`` when the key and value sizes differ. Empty when the layer has none (a ``LayerNorm``
    without ``elementwise_affine``)."""
    if isinstance(layer, nn.MultiheadAttention):
        names: Iterable[str] = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
    elif isinstance(layer, (nn.RNNBase, nn.RNNCellBase)):
        names = [name for name, _ in layer.named_parameters(recurse=False) if name.startswith("weight_")]
    else:
        names = ("weight",)
    found = [(name, getattr(layer, name, None)) for name in names]
    return [(name, tensor) for name, tensor in found if isinstance(tensor, torch.Tensor)]


def _layer_biases(layer: nn.Module, weight_names: Iterable[str]) -> list[torch.Tensor]:
    # Each bias goes with its weight (bias_ih_l0 with weight_ih_l0), so a callback restricted to some weights by
    # `weights` leaves the biases of the others to the callback that initialises them; attention's one in_proj_bias
    # serves q, k and v alike.
    weight_names = list(weight_names)
    if isinstance(layer, nn.MultiheadAttention):
        names = ["in_proj_bias"] if weight_names else []
    else:
        names = [name.replace("weight", "bias", 1) for name in weight_names]
    found = [getattr(layer, name, None) for name in dict.fromkeys(names)]
    return [tensor for tensor in found if isinstance(tensor, torch.Tensor)]


def initialize(
    module: nn.Module,
    scheme: str,
    *,
    types: LayerType | Sequence[LayerType] = DEFAULT_TYPES,
    include: str | re.Pattern | None = None,
    exclude: str | re.Pattern | None = None,
    weights: str | re.Pattern | None = None,
    bias: str | float = "zeros",
    generator: torch.Generator | None = None,
    **arguments: Any,
) -> list[InitRecord]:
    """Initialise the weights of the layers :func:`select_layers` picks with ``scheme``, and their biases by
    ``bias``: ``"zeros"``, ``"keep"`` (left as the scheme leaves it: untouched, except that ``default`` resets it
    with the layer's own rule) or a constant.

    ``weights`` narrows each layer to the weight tensors (:func:`layer_weights`) whose name within the layer it finds
    (``re.search``): ``weights="weight_hh"`` picks an LSTM's hidden-to-hidden matrices, and leaves a ``Linear``
    (whose one tensor is ``weight``) alone. A bias is set only when its own weight is initialised (``bias_hh_l0``
    with ``weight_hh_l0``; attention's ``in_proj_bias`` with any in-projection). Not allowed with ``default``, which
    resets whole layers.

    With a ``generator`` the global RNG is untouched and the same seed gives bit-identical weights on any device
    (values are drawn on the generator's device and copied). Without one, draws come from the global RNG, as
    ``torch.nn.init`` does.

    Returns one :class:`InitRecord` per weight tensor initialised.

    Raises ``ValueError`` (``TypeError`` for a ``module`` or ``generator`` of the wrong kind) for bad arguments,
    naming the argument, before touching any layer; and for a scheme that cannot apply to a selected layer, naming
    both, e.g. ``xavier_uniform`` on a 1-d weight, or a selected layer without weights.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"`module={module!r}` is not valid: expected an nn.Module.")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"`generator={generator!r}` is not valid: expected a torch.Generator or None.")
    scheme, arguments = resolve_scheme(scheme, arguments)
    types = resolve_types(types)
    include, exclude = compile_pattern("include", include), compile_pattern("exclude", exclude)
    weights = check_weights(weights, scheme)
    bias = check_bias(bias)
    layers = select_layers(module, types, include, exclude)
    if (
        weights is not None
        and layers
        and not any(weights.search(name) for _, layer in layers for name, _ in layer_weights(layer))
    ):
        warnings.warn(f"`weights={weights.pattern!r}` matches no weight of the selected layers.", stacklevel=2)
    records: list[InitRecord] = []
    with torch.no_grad():
        for name, layer in layers:
            records += _initialize_layer(name, layer, scheme, arguments, weights, bias, generator)
    return records


def _initialize_layer(
    name: str,
    layer: nn.Module,
    scheme: str,
    arguments: dict[str, Any],
    weights: re.Pattern | None,
    bias: str | float,
    generator: torch.Generator | None,
) -> list[InitRecord]:
    tensors = layer_weights(layer)
    chosen = [(weight, tensor) for weight, tensor in tensors if weights is None or weights.search(weight)]
    before = [_std(tensor) for _, tensor in chosen]
    where = name
    try:
        if scheme == DEFAULT:
            _reset_parameters(layer, generator)
        elif not tensors:
            raise ValueError("it has no `weight` tensor")
        else:
            for weight, tensor in chosen:
                where = _weight_name(name, weight)
                _draw(SCHEMES[scheme], tensor, arguments, generator)
            where = name
        # A default reset of a layer without weights still resets its bias.
        paired = [weight for weight, _ in chosen] or (["weight"] if scheme == DEFAULT else [])
        if bias != "keep":
            value = 0.0 if bias == "zeros" else bias
            for layer_bias in _layer_biases(layer, paired):
                if abs(value) > _largest(layer_bias):
                    raise ValueError(f"`bias={bias!r}` is not valid: expected a number within {layer_bias.dtype}")
                layer_bias.fill_(value)
    except ValueError as error:
        layer_type = type(layer).__name__
        message = str(error).rstrip(".")
        raise ValueError(f"Scheme {scheme!r} cannot initialise {where!r} ({layer_type}): {message}.") from None
    if scheme == DEFAULT and not chosen:
        return [InitRecord(name, scheme, dict(arguments), math.nan, math.nan, weight="")]
    return [
        InitRecord(name, scheme, dict(arguments), std_before, _std(tensor), weight=weight)
        for (weight, tensor), std_before in zip(chosen, before)
    ]


def _draw(
    function: Callable[..., torch.Tensor],
    tensor: torch.Tensor,
    arguments: Mapping[str, Any],
    generator: torch.Generator | None,
) -> None:
    if isinstance(tensor, DTensor):
        # A shard (FSDP2): draw the whole tensor as a single process would, so fans, orthogonality and a seed's
        # weights are those of the unsharded model, then hand each rank its piece of rank 0's draw.
        from torch.distributed.tensor import distribute_tensor

        local = tensor.to_local()
        device = generator.device if generator is not None else local.device
        full = function(torch.empty(tensor.shape, dtype=local.dtype, device=device), **arguments, generator=generator)
        tensor.copy_(distribute_tensor(full.to(local.device), tensor.device_mesh, tensor.placements))
    elif generator is None or generator.device == tensor.device:
        function(tensor, **arguments, generator=generator)
    else:
        # Drawing on the generator's device keeps a seed's weights the same wherever the model lives.
        tensor.copy_(function(torch.empty_like(tensor, device=generator.device), **arguments, generator=generator))


def _reset_parameters(layer: nn.Module, generator: torch.Generator | None) -> None:
    reset = getattr(layer, "reset_parameters", None)
    if not callable(reset) and isinstance(layer, nn.MultiheadAttention):
        # MultiheadAttention's own rule (xavier in-projections, zero biases) is only exposed under this name.
        reset = layer._reset_parameters
    if not callable(reset):
        raise ValueError("it has no `reset_parameters`")
    if generator is None:
        reset()
        return
    # reset_parameters draws from the global RNG; seed it from the generator inside a fork, so the global state
    # comes back untouched and each layer still gets its own draw. 2**62 keeps the seed far inside manual_seed's
    # range.
    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    cuda_devices = sorted({p.device.index or 0 for p in layer.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda_devices):
        torch.default_generator.manual_seed(seed)
        for index in cuda_devices:
            torch.cuda.default_generators[index].manual_seed(seed)
        reset()


def _std(weight: Any) -> float:
    if not isinstance(weight, torch.Tensor) or weight.numel() == 0 or weight.is_meta:
        return math.nan
    return weight.detach().float().std(correction=0).item()
