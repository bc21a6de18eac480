"""An :class:`~gradmon.ActivationMonitor`'s observed step on the device: what it holds from its batch's hooks until
its numbers reach the host, and what is measured before its optimizer step."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch

from gradmon.activations import RecordedBatch
from gradmon.diagnosis import LayerInfo, OptimizerInfo
from gradmon.diagnosis.evidence import weight_rms
from gradmon.naming import clean_name
from gradmon.norms import GradientNorms, Norms, WeightSnapshot, compute_norms
from gradmon.sharding import DTensor


@dataclass(eq=False)
class Observed:
    """One observed step, from its batch's hooks to the host: the recorded batch, the gradient and weight norms
    taken before the optimizer step, the update after it, and the one host copy of all of them.

    ``step`` is ``trainer.global_step`` at the start of the observed batch (the step logged at); ``count`` the first
    optimizer's step count there (the schedule's)."""

    step: int
    count: int = -1
    batch: RecordedBatch | None = None
    grads: Norms | None = None
    weights: Norms | None = None
    biases: torch.Tensor | None = None
    snapshot: WeightSnapshot | None = None
    update: Norms | None = None
    copy: Any = None  # the host copy of device_parts(), once sent
    recurrent: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    optimizer: OptimizerInfo | None = None

    def device_parts(self) -> list[torch.Tensor]:
        """Every number of the step still on the device, in the order the host reads them back."""
        parts = [self.batch.values] if self.batch is not None else []
        parts += [n.device_values for n in (self.grads, self.weights, self.update) if n is not None]
        parts += [t.reshape(-1) for t in (self.biases, self.recurrent, self.loss) if t is not None]
        return parts


@torch.no_grad()
def measure(pl_module: pl.LightningModule, grad_norms: GradientNorms, structure: Sequence[LayerInfo],
            recurrent: Sequence[tuple[str, torch.nn.Module]], current: Observed) -> None:
    """Before the optimizer step: gradient norms, weight norms, bias means, recurrent weight scales and a copy of
    the weights for the update ratio (all on the device)."""
    layout = grad_norms.layout
    current.grads = grad_norms.compute()
    current.weights = compute_norms(layout, [p.detach() for p in layout.params], grad_norms.order)
    modules = dict(pl_module.named_modules())
    biases = [getattr(_module(modules, info.name), "bias", None) for info in structure]
    device = layout.params[0].device if layout.params else torch.device("cpu")
    # A shard's mean is not the bias's: sharded biases are left out (NaN).
    current.biases = torch.stack([
        b.detach().float().mean().to(device)
        if isinstance(b, torch.Tensor) and b.numel() and not isinstance(b, DTensor)
        else torch.full((), math.nan, device=device)
        for b in biases
    ]) if biases else torch.zeros(0, device=device)
    current.recurrent = torch.stack([weight_rms(m.weight_hh_l0).to(device) for _, m in recurrent]
                                    ) if recurrent else None
    current.snapshot = WeightSnapshot(layout, grad_norms.order)


def step_loss(outputs: Any) -> torch.Tensor | None:
    """The training step's loss from what it returned (a tensor, or a dict with ``"loss"``), detached."""
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        return loss.detach().float().reshape(1)
    return None


def _module(modules: dict[str, torch.nn.Module], name: str) -> torch.nn.Module | None:
    return modules.get(name) or next((m for n, m in modules.items() if clean_name(n) == name), None)
