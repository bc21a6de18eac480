"""The names gradmon shows: the user's module and parameter names, with the wrappers' pieces taken out.

``torch.compile`` (``_orig_mod.``), FSDP1 (``_fsdp_wrapped_module.``), activation checkpointing
(``_checkpoint_wrapped_module.``) and ``DistributedDataParallel`` (``module.``, only on a wrapper the user never
sees) insert pieces into ``named_parameters`` / ``named_modules``. Tags, records, events and ``include`` / ``exclude``
patterns all use the cleaned names, so ``net.0`` stays ``net.0`` however the model is wrapped.

This module never imports Lightning.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

GroupBy = Literal["layer", "parameter"]

#: Name pieces inserted by wrappers; each is dropped wherever it occurs in a dotted name.
WRAPPER_PIECES = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def clean_name(name: str) -> str:
    """``name`` without wrapper pieces: ``net._orig_mod.0.weight`` -> ``net.0.weight``."""
    if "_" not in name or not any(piece in name for piece in WRAPPER_PIECES):
        return name
    return ".".join(part for part in name.split(".") if part not in WRAPPER_PIECES)


def layer_name(param_name: str, group_by: GroupBy = "layer") -> str:
    """The layer a parameter belongs to: the module that owns it (``net.0`` for ``net.0.weight``), by its cleaned
    name.

    A parameter registered directly on the root module is its own layer; ``group_by="parameter"`` keeps every
    parameter separate. The tensors behind a parametrized weight (``torch.nn.utils.parametrize``: weight norm's
    ``net.0.parametrizations.weight.original0`` and ``original1``, spectral norm's ``original``) belong to the
    parametrized layer, ``net.0``, with its bias.
    """
    param_name = clean_name(param_name)
    if group_by == "parameter" or "." not in param_name:
        return param_name
    owner = param_name.rsplit(".", 1)[0]
    if "parametrizations" in owner:
        parts = owner.split(".")
        if len(parts) >= 2 and parts[-2] == "parametrizations":  # <layer>.parametrizations.<tensor>
            return ".".join(parts[:-2]) or parts[-1]  # a parametrized tensor of the root module: its own layer
    return owner


def model_label(named_parameters: Iterable[tuple[str, object]], class_name: str) -> str:
    """``"<class name>, <n> layers"``: a model told apart from others by its class and its number of layers (the
    modules owning parameters, by :func:`layer_name`)."""
    layers = dict.fromkeys(layer_name(clean_name(name)) for name, _ in named_parameters)
    return f"{class_name}, {len(layers)} layer{'s' if len(layers) != 1 else ''}"
