r"""Weight initialisation by scheme name, on any ``nn.Module``, without Lightning: the entry point.

A scheme is one of :data:`SCHEME_NAMES`, given with its arguments as keywords,
``initialize(model, "normal", std=0.01)``, or as a string, ``initialize(model, "normal(std=0.01)")``, which is how
configs and command lines spell it. The schemes themselves, one function each in the style of ``torch/nn/init.py``,
are in :mod:`gradmon.init_schemes`; the string form is read and checked by :mod:`gradmon.init_spec`. Both are
re-exported here. ``default`` is the layer's own ``reset_parameters``.

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

import importlib
import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from gradmon._random import forked_rng, reseed
from gradmon._validation import FLOAT32_MAX, check_float, invalid
from gradmon.init_schemes import (
    DEFAULT,
    FLOAT32_RANGE,
    NONLINEARITIES,
    SCHEME_NAMES,
    SCHEMES,
    apply_scheme,
    compute_fans,
    compute_gain,
    constant_,
    kaiming_normal_,
    kaiming_uniform_,
    largest_value,
    lecun_normal_,
    lecun_uniform_,
    normal_,
    ones_,
    orthogonal_,
    trunc_normal_,
    uniform_,
    xavier_normal_,
    xavier_uniform_,
    zeros_,
)
from gradmon.init_spec import format_scheme, parse_scheme, resolve_scheme, scheme_keywords
from gradmon.naming import clean_name
from gradmon.sharding import DTensor

__all__ = [
    "BIAS_CHOICES",
    "DEFAULT",
    "DEFAULT_TYPES",
    "NONLINEARITIES",
    "SCHEMES",
    "SCHEME_NAMES",
    "SUPPORTED_TYPES",
    "InitRecord",
    "LayerType",
    "check_bias",
    "check_weights",
    "compile_pattern",
    "compute_fans",
    "compute_gain",
    "constant_",
    "format_scheme",
    "initialize",
    "kaiming_normal_",
    "kaiming_uniform_",
    "layer_weights",
    "lecun_normal_",
    "lecun_uniform_",
    "normal_",
    "ones_",
    "orthogonal_",
    "parse_scheme",
    "resolve_scheme",
    "resolve_types",
    "scheme_keywords",
    "select_layers",
    "trunc_normal_",
    "uniform_",
    "xavier_normal_",
    "xavier_uniform_",
    "zeros_",
]

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

BIAS_CHOICES = ("zeros", "keep")

#: A layer type, or its name: ``"Linear"`` (from ``torch.nn``) or a dotted path such as ``"torch.nn.Embedding"``.
LayerType = str | type


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
# Checking the selection arguments
# ----------------------------------------------------------------------------------------------------------------


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
        raise invalid("types", types, f"a layer type, its name, or a list of them: {_ACCEPTED_TYPES}")
    if not entries:
        raise invalid("types", types, f"at least one of the {_ACCEPTED_TYPES}")
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
        raise invalid("types", types, f"{_ACCEPTED_TYPES}; {entry!r} is not an nn.Module subclass or the name of one")
    in_torch = layer_type.__module__ == "torch" or layer_type.__module__.startswith("torch.")
    if in_torch and not issubclass(layer_type, SUPPORTED_TYPES):
        class_name = f"{layer_type.__module__}.{layer_type.__qualname__}"
        raise invalid("types", types, f"{_ACCEPTED_TYPES}; {class_name} has no weights gradmon can initialise")
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
    raise invalid(name, pattern, "a regular expression (a string) or None")


def check_weights(weights: str | re.Pattern | None, scheme: str) -> re.Pattern | None:
    """The ``weights`` pattern, compiled; refused with ``default``, which resets a whole layer at once."""
    pattern = compile_pattern("weights", weights)
    if pattern is not None and scheme == DEFAULT:
        raise invalid(
            "weights",
            weights,
            "None with scheme 'default', since the layer's own reset_parameters resets all its weights",
        )
    return pattern


def check_bias(bias: str | float) -> str | float:
    """``"zeros"``, ``"keep"`` or a constant within float32's range."""
    if isinstance(bias, str) and bias in BIAS_CHOICES:
        return bias
    if not isinstance(bias, str):
        try:
            return check_float("bias", bias, **FLOAT32_RANGE)
        except ValueError:
            pass
    raise invalid(
        "bias",
        bias,
        f"'zeros', 'keep' or a finite number within float32's range (at most {FLOAT32_MAX:g} in magnitude)",
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
    of_types = [(clean_name(name), layer) for name, layer in module.named_modules() if isinstance(layer, types)]
    type_names = ", ".join(t.__qualname__ for t in types)
    warned_about_a_pattern = False
    for argument, pattern in (("include", include), ("exclude", exclude)):
        if pattern is not None and not any(pattern.search(name) for name, _ in of_types):
            warnings.warn(f"`{argument}={pattern.pattern!r}` matches no layer of types {type_names}.", stacklevel=3)
            warned_about_a_pattern = True
    selected = [
        (name, layer)
        for name, layer in of_types
        if (include is None or include.search(name)) and not (exclude is not None and exclude.search(name))
    ]
    if not selected and not warned_about_a_pattern:
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
    attributes = [(name, getattr(layer, name, None)) for name in names]
    return [(name, tensor) for name, tensor in attributes if isinstance(tensor, torch.Tensor)]


def _layer_biases(layer: nn.Module, weight_names: Iterable[str]) -> list[tuple[str, torch.Tensor]]:
    # Each bias goes with its weight (bias_ih_l0 with weight_ih_l0), so a callback restricted to some weights by
    # `weights` leaves the biases of the others to the callback that initialises them; attention's one in_proj_bias
    # serves q, k and v alike.
    weight_names = list(weight_names)
    if isinstance(layer, nn.MultiheadAttention):
        names = ["in_proj_bias"] if weight_names else []
    else:
        names = [name.replace("weight", "bias", 1) for name in weight_names]
    attributes = [(name, getattr(layer, name, None)) for name in dict.fromkeys(names)]
    return [(name, tensor) for name, tensor in attributes if isinstance(tensor, torch.Tensor)]


def _write(layer: nn.Module, name: str, tensor: torch.Tensor, fill: Any) -> None:
    """``fill(t)`` writes into ``t`` in place. A tensor computed by a parametrization (``torch.nn.utils.parametrize``:
    ``weight_norm``, ``orthogonal``, ``spectral_norm`` and the like) is a fresh result at each access, so writing into
    it changes nothing: the value is drawn into a new tensor and assigned, which the parametrization turns into its
    underlying parameters through its ``right_inverse``."""
    if not parametrize.is_parametrized(layer, name):
        fill(tensor)
        return
    value = torch.empty_like(tensor)
    fill(value)
    try:
        setattr(layer, name, value)
    except (NotImplementedError, RuntimeError) as error:
        kinds = ", ".join(type(p).__name__ for p in layer.parametrizations[name])
        raise ValueError(
            f"its {name!r} is computed by a parametrization ({kinds}) that cannot take a value back "
            f"(no right_inverse: {error})"
        ) from None


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
        raise TypeError(*invalid("module", module, "an nn.Module").args)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(*invalid("generator", generator, "a torch.Generator or None").args)
    scheme, arguments = resolve_scheme(scheme, arguments)
    types = resolve_types(types)
    include, exclude = compile_pattern("include", include), compile_pattern("exclude", exclude)
    weights, bias = check_weights(weights, scheme), check_bias(bias)
    layers = select_layers(module, types, include, exclude)
    if weights is not None and layers and not any(weights.search(n) for _, m in layers for n, _ in layer_weights(m)):
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
    selected = [(weight, tensor) for weight, tensor in tensors if weights is None or weights.search(weight)]
    stds_before = [_std(tensor) for _, tensor in selected]
    target = name  # what the error names if initialising fails: the layer, or the weight being drawn
    try:
        if scheme == DEFAULT:
            parametrized = [w for w, _ in tensors if parametrize.is_parametrized(layer, w)]
            if parametrized:
                # reset_parameters writes into the computed tensor, a fresh result that is then thrown away.
                raise ValueError(
                    f"its {parametrized[0]!r} is computed by a parametrization, which its reset_parameters cannot "
                    "reach; pick a scheme (xavier_uniform, kaiming_normal, orthogonal, ...), which gradmon writes "
                    "through the parametrization"
                )
            _reset_parameters(layer, generator)
        elif not tensors:
            raise ValueError("it has no `weight` tensor")
        else:
            for weight, tensor in selected:
                target = _weight_name(name, weight)
                _write(layer, weight, tensor, lambda t: _draw(scheme, t, arguments, generator))
            target = name
        # A default reset of a layer without weights still resets its bias.
        bias_owners = [weight for weight, _ in selected] or (["weight"] if scheme == DEFAULT else [])
        if bias != "keep":
            bias_value = 0.0 if bias == "zeros" else bias
            for bias_name, layer_bias in _layer_biases(layer, bias_owners):
                if abs(bias_value) > largest_value(layer_bias):
                    raise invalid("bias", bias, f"a number within {layer_bias.dtype}")
                _write(layer, bias_name, layer_bias, lambda t: t.fill_(bias_value))
    except ValueError as error:
        layer_type = type(layer).__name__
        message = str(error).rstrip(".")
        raise ValueError(f"Scheme {scheme!r} cannot initialise {target!r} ({layer_type}): {message}.") from None
    if scheme == DEFAULT and not selected:
        return [InitRecord(name, scheme, dict(arguments), math.nan, math.nan, weight="")]
    return [  # read again: a parametrized weight is a new tensor, computed from what was written
        InitRecord(name, scheme, dict(arguments), std_before, _std(getattr(layer, weight)), weight=weight)
        for (weight, _), std_before in zip(selected, stds_before)
    ]


def _draw(
    scheme: str,
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
        whole = apply_scheme(scheme, torch.empty(tensor.shape, dtype=local.dtype, device=device), arguments, generator)
        tensor.copy_(distribute_tensor(whole.to(local.device), tensor.device_mesh, tensor.placements))
    elif generator is None or generator.device == tensor.device:
        apply_scheme(scheme, tensor, arguments, generator)
    else:
        # Drawing on the generator's device keeps a seed's weights the same wherever the model lives.
        tensor.copy_(apply_scheme(scheme, torch.empty_like(tensor, device=generator.device), arguments, generator))


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
    with forked_rng(layer) as cuda_devices:
        reseed(seed, cuda_devices)
        reset()


def _std(weight: Any) -> float:
    if not isinstance(weight, torch.Tensor) or weight.numel() == 0 or weight.is_meta:
        return math.nan
    return weight.detach().float().std(correction=0).item()
