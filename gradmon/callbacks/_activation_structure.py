"""The model as an :class:`~gradmon.ActivationMonitor`'s diagnosis reads it: its weight layers, where each one's
weight sits in the gradient layout, its recurrent modules, and how the numbers of an observed step attach to them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import lightning.pytorch as pl
import torch

from gradmon.diagnosis import LayerInfo, RecurrentInfo, layer_structure, post_norm
from gradmon.diagnosis.evidence import RECURRENT
from gradmon.naming import clean_name


class ModelStructure:
    """The weight layers of ``pl_module``, each with the activation after it (in ``order``, the forward's call
    order, once one was observed), where each one's ``weight`` sits among ``param_names`` (the gradient layout's),
    the recurrent modules, and whether normalisation comes after the residual (:func:`gradmon.diagnosis.post_norm`).
    """

    def __init__(self, pl_module: pl.LightningModule, param_names: Sequence[str],
                 order: Sequence[str] | None = None) -> None:
        index = {name: i for i, name in enumerate(param_names)}
        self.layers = [info for info in layer_structure(pl_module, order) if f"{info.name}.weight" in index]
        self.weight_index = [index[f"{info.name}.weight"] for info in self.layers]
        self.recurrent: list[tuple[str, torch.nn.Module]] = [
            (n, m) for n, m in pl_module.named_modules() if isinstance(m, RECURRENT)
        ]
        self.post_norm = post_norm(pl_module, order)
        self.ordered = order is not None

    def with_weights(self, weight_norms: Sequence[float], params: Sequence[torch.Tensor], biases: Sequence[float]
                     ) -> list[LayerInfo]:
        """The layers with their weight RMS (from the per-tensor 2-norms of the layout's ``params``) and bias means
        (one per layer, NaN for none)."""
        rms = {
            info.name: weight_norms[i] / math.sqrt(max(params[i].numel(), 1))
            for info, i in zip(self.layers, self.weight_index)
        }
        bias_of = {info.name: b for info, b in zip(self.layers, biases)}
        return [
            replace(info, weight_rms=rms.get(info.name, math.nan),
                    bias_mean=None if math.isnan(bias_of.get(info.name, math.nan)) else bias_of[info.name])
            for info in self.layers
        ]

    def recurrent_info(self, scales: Sequence[float]) -> list[RecurrentInfo]:
        """The recurrent modules with their recurrent weight scales (one per module)."""
        return [RecurrentInfo(clean_name(name), type(m).__name__, m.hidden_size, v)
                for (name, m), v in zip(self.recurrent, scales)]
