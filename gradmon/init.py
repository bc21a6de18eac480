r"""Weight initialisation by scheme name, on any ``nn.Module``, without Lightning.

A scheme is one of :data:`SCHEME_NAMES`, given with its arguments as keywords,
``initialize(model, "normal", std=0.01)``, or as a string, ``initialize(model, "normal(std=0.01)")``, which is how
configs and command lines spell it. Each scheme is one function below, in the style of ``torch/nn/init.py``: in place,
the formula and the paper in its docstring, the fans from :func:`compute_fans` and the gain from :func:`compute_gain`.
``default`` is the layer's own ``reset_parameters``.

:func:`initialize` picks the layers (by type, then by ``include`` / ``exclude`` regular expressions on the qualified
names from ``named_modules``), initialises each weight and bias, and returns one :class:`InitRecord` per layer.

Example::

    records = initialize(model, "kaiming_normal", nonlinearity="relu", generator=torch.Generator().manual_seed(0))
    initialize(model, "normal(std=0.01)", include=r"^head\.")
"""

from __future__ import annotations

import ast
import importlib
import inspect
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradmon._validation import check_choice, check_float
from gradmon.norms import DTensor

#: The layers initialised unless ``types`` says otherwise; subclasses count. Normalisation layers and embeddings
#: are left alone because their weights are not fan-scaled matrices: select them explicitly to initialise them.
DEFAULT_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

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

_ANY_NUMBER = {"minimum": -math.inf, "inclusive": True}


@dataclass(frozen=True)
class InitRecord:
    """What :func:`initialize` did to one layer: its weight's standard deviation before and after."""

    layer: str
    scheme: str
    arguments: dict[str, Any]
    std_before: float
    std_after: float


# ----------------------------------------------------------------------------------------------------------------
# Fans and gains, shared by every scheme
# ----------------------------------------------------------------------------------------------------------------


def compute_fans(tensor: torch.Tensor) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a weight shaped ``(out, in, *kernel)``: ``in * prod(kernel)``, ``out * prod(kernel)``.

    The same convention as ``torch.nn.init``; a transposed convolution's weight is ``(in, out, *kernel)``, so its
    fans come out swapped, as they do in torch.
    """
    if tensor.dim() < 2:
        raise ValueError(f"fans need a weight with at least 2 dimensions, this one has shape {tuple(tensor.shape)}")
    receptive_field = math.prod(tensor.shape[2:])
    return tensor.shape[1] * receptive_field, tensor.shape[0] * receptive_field


def compute_gain(gain: float | None = None, nonlinearity: str | None = None, param: float | None = None) -> float:
    """The factor a scheme scales its spread by: ``gain`` as given, else
    ``torch.nn.init.calculate_gain(nonlinearity, param)`` (``param`` is leaky_relu's negative slope), else 1."""
    if nonlinearity is None:
        return 1.0 if gain is None else check_float("gain", gain)
    if gain is not None:
        raise ValueError(
            f"`gain={gain!r}` and `nonlinearity={nonlinearity!r}` are both given: expected one of them "
            "(the gain is computed from the nonlinearity)."
        )
    check_choice("nonlinearity", nonlinearity, NONLINEARITIES)
    check_float("param", param, **_ANY_NUMBER, allow_none=True)
    return float(nn.init.calculate_gain(nonlinearity, param))


def _fan(tensor: torch.Tensor, mode: str) -> int:
    fan_in, fan_out = compute_fans(tensor)
    return fan_in if check_choice("mode", mode, ("fan_in", "fan_out")) == "fan_in" else fan_out


def _check_range(a: float, b: float) -> None:
    check_float("a", a, **_ANY_NUMBER)
    check_float("b", b, **_ANY_NUMBER)
    if not a < b:
        raise ValueError(f"`b={b!r}` is not valid: expected a number > a={a!r}.")


# ----------------------------------------------------------------------------------------------------------------
# The schemes: each fills ``tensor`` in place, drawing from ``generator`` (the global RNG when None)
# ----------------------------------------------------------------------------------------------------------------


def normal_(
    tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    r""":math:`\mathcal{N}(\text{mean}, \text{std}^2)`."""
    check_float("mean", mean, **_ANY_NUMBER)
    check_float("std", std, inclusive=True)
    return nn.init.normal_(tensor, mean, std, generator=generator)


def uniform_(
    tensor: torch.Tensor, a: float = 0.0, b: float = 1.0, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    r""":math:`\mathcal{U}(a, b)`, with torch's defaults :math:`a = 0, b = 1`."""
    _check_range(a, b)
    return nn.init.uniform_(tensor, a, b, generator=generator)


def constant_(tensor: torch.Tensor, val: float, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Every entry ``val``."""
    return nn.init.constant_(tensor, check_float("val", val, **_ANY_NUMBER))


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
    return nn.init.uniform_(tensor, -bound, bound, generator=generator)


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
    return nn.init.normal_(tensor, 0.0, std, generator=generator)


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
    check_float("a", a, **_ANY_NUMBER)
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
    check_float("a", a, **_ANY_NUMBER)
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
    r"""A (semi-)orthogonal matrix times the gain: :math:`W W^\top = \text{gain}^2 I` for a wide weight, trailing
    dimensions flattened.

    Saxe, A. et al. (2013), *Exact solutions to the nonlinear dynamics of learning in deep linear neural networks*.
    """
    compute_fans(tensor)
    return nn.init.orthogonal_(tensor, compute_gain(gain, nonlinearity, param), generator=generator)


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
    check_float("mean", mean, **_ANY_NUMBER)
    check_float("std", std)
    a = mean - 2.0 * std if a is None else a
    b = mean + 2.0 * std if b is None else b
    _check_range(a, b)
    return nn.init.trunc_normal_(tensor, mean, std, a, b, generator=generator)


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
    except SyntaxError:
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
    except ValueError:
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

    Raises ``ValueError`` for an unknown name, an unknown or missing keyword, a keyword given twice, or a value
    the scheme rejects; the checks run on a small scratch tensor with a private generator, so they cost nothing
    and leave the global RNG alone.
    """
    name, parsed = parse_scheme(scheme)
    check_choice("scheme", name, SCHEME_NAMES)
    arguments = dict(arguments or {})
    twice = sorted(parsed.keys() & arguments.keys())
    if twice:
        raise ValueError(f"`{twice[0]}` is given both in `scheme={scheme!r}` and as a keyword: expected it once.")
    arguments = {**parsed, **arguments}
    if name == DEFAULT:
        if arguments:
            raise ValueError(f"Scheme 'default' takes no arguments, got {sorted(arguments)}.")
        return name, arguments
    function = SCHEMES[name]
    accepted = scheme_keywords(name)
    unknown = sorted(arguments.keys() - set(accepted))
    required = [p.name for p in inspect.signature(function).parameters.values() if p.default is p.empty]
    missing = [keyword for keyword in required if keyword != "tensor" and keyword not in arguments]
    if unknown or missing:
        problem = f"unknown keywords {unknown}" if unknown else f"no {missing[0]!r}"
        raise ValueError(
            f"Scheme {name!r} got {problem}: it accepts {', '.join(accepted) if accepted else 'no keywords'}."
        )
    try:
        function(torch.empty(4, 4), **arguments, generator=torch.Generator())
    except ValueError as error:
        raise ValueError(f"Scheme {name!r}: {error}") from None
    return name, arguments


def resolve_types(types: LayerType | Sequence[LayerType]) -> tuple[type[nn.Module], ...]:
    """Layer types from classes or names: ``"Linear"`` is looked up in ``torch.nn``, ``"pkg.module.Class"`` imported."""
    entries = (types,) if isinstance(types, (str, type)) else tuple(types)
    if not entries:
        raise ValueError("`types=()` is not valid: expected at least one nn.Module subclass or its name.")
    return tuple(_resolve_type(entry) for entry in entries)


def _resolve_type(entry: LayerType) -> type[nn.Module]:
    layer_type: Any = entry
    if isinstance(entry, str):
        module_name, _, class_name = entry.rpartition(".")
        try:
            layer_type = getattr(importlib.import_module(module_name or "torch.nn"), class_name)
        except (ImportError, AttributeError):
            layer_type = None
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise ValueError(
            f"`types` entry {entry!r} is not valid: expected an nn.Module subclass or its name, "
            "such as 'Linear' or 'torch.nn.Embedding'."
        )
    return layer_type


def compile_pattern(name: str, pattern: str | re.Pattern | None) -> re.Pattern | None:
    if pattern is None or isinstance(pattern, re.Pattern):
        return pattern
    try:
        return re.compile(pattern)
    except (re.error, TypeError):
        raise ValueError(f"`{name}={pattern!r}` is not valid: expected a regular expression.") from None


def check_bias(bias: str | float) -> str | float:
    """``"zeros"``, ``"keep"`` or a constant."""
    if isinstance(bias, (int, float)) and not isinstance(bias, bool) and math.isfinite(bias):
        return float(bias)
    if isinstance(bias, str) and bias in BIAS_CHOICES:
        return bias
    raise ValueError(f"`bias={bias!r}` is not valid: expected 'zeros', 'keep' or a finite number.")


# ----------------------------------------------------------------------------------------------------------------
# Selecting and initialising layers
# ----------------------------------------------------------------------------------------------------------------


def select_layers(
    module: nn.Module,
    types: LayerType | Sequence[LayerType] = DEFAULT_TYPES,
    include: str | re.Pattern | None = None,
    exclude: str | re.Pattern | None = None,
) -> list[tuple[str, nn.Module]]:
    """``(qualified name, layer)`` for every layer that is an instance of ``types``, whose name ``include`` finds
    (``re.search``) and ``exclude`` does not. Warns when a pattern matches none of the layers of those types, or
    when nothing is selected, since either is almost always a typo."""
    types = resolve_types(types)
    include, exclude = compile_pattern("include", include), compile_pattern("exclude", exclude)
    typed = [(name, layer) for name, layer in module.named_modules() if isinstance(layer, types)]
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


def initialize(
    module: nn.Module,
    scheme: str,
    *,
    types: LayerType | Sequence[LayerType] = DEFAULT_TYPES,
    include: str | re.Pattern | None = None,
    exclude: str | re.Pattern | None = None,
    bias: str | float = "zeros",
    generator: torch.Generator | None = None,
    **arguments: Any,
) -> list[InitRecord]:
    """Initialise the weights of the layers :func:`select_layers` picks with ``scheme``, and their biases by
    ``bias``: ``"zeros"``, ``"keep"`` (left as the scheme leaves it: untouched, except that ``default`` resets it
    with the layer's own rule) or a constant.

    With a ``generator`` the global RNG is untouched and the same seed gives bit-identical weights on any device
    (values are drawn on the generator's device and copied). Without one, draws come from the global RNG, as
    ``torch.nn.init`` does.

    Raises ``ValueError`` for bad arguments (before touching any layer) and for a scheme that cannot apply to a
    selected layer, naming both, e.g. ``xavier_uniform`` on a 1-d weight.
    """
    scheme, arguments = resolve_scheme(scheme, arguments)
    bias = check_bias(bias)
    with torch.no_grad():
        return [
            _initialize_layer(name, layer, scheme, arguments, bias, generator)
            for name, layer in select_layers(module, types, include, exclude)
        ]


def _initialize_layer(
    name: str,
    layer: nn.Module,
    scheme: str,
    arguments: dict[str, Any],
    bias: str | float,
    generator: torch.Generator | None,
) -> InitRecord:
    weight = getattr(layer, "weight", None)
    std_before = _std(weight)
    try:
        if scheme == DEFAULT:
            _reset_parameters(layer, generator)
        elif isinstance(weight, torch.Tensor):
            _draw(SCHEMES[scheme], weight, arguments, generator)
        else:
            raise ValueError("it has no `weight` tensor")
    except ValueError as error:
        layer_type = type(layer).__name__
        raise ValueError(f"Scheme {scheme!r} cannot initialise layer {name!r} ({layer_type}): {error}.") from None
    layer_bias = getattr(layer, "bias", None)
    if isinstance(layer_bias, torch.Tensor) and bias != "keep":
        layer_bias.fill_(0.0 if bias == "zeros" else bias)
    return InitRecord(name, scheme, dict(arguments), std_before, _std(weight))


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
    if not callable(getattr(layer, "reset_parameters", None)):
        raise ValueError("it has no `reset_parameters`")
    if generator is None:
        layer.reset_parameters()
        return
    # reset_parameters draws from the global RNG; seed it from the generator inside a fork, so the global state
    # comes back untouched and each layer still gets its own draw.
    seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    cuda_devices = sorted({p.device.index or 0 for p in layer.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda_devices):
        torch.default_generator.manual_seed(seed)
        for index in cuda_devices:
            torch.cuda.default_generators[index].manual_seed(seed)
        layer.reset_parameters()


def _std(weight: Any) -> float:
    if not isinstance(weight, torch.Tensor) or weight.numel() == 0 or weight.is_meta:
        return math.nan
    return weight.detach().float().std(correction=0).item()
