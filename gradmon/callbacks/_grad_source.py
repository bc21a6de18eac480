"""Per-step gradient norms shared by the callbacks of one Trainer, computed at most once per optimizer step."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from gradmon.norms import GroupBy, Norms, ParamLayout, compute_norms


def optimizer_layout(pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer, group_by: GroupBy) -> ParamLayout:
    """The module's trainable parameters that ``optimizer`` updates, in registration order."""
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return ParamLayout.from_named_parameters(
        ((n, p) for n, p in pl_module.named_parameters() if p.requires_grad and id(p) in in_optimizer), group_by
    )


class GradNormSource:
    """Gradient norms of the parameters an optimizer is about to update, cached for the current step so that a
    :class:`~gradmon.GradNormMonitor` and a :class:`~gradmon.GradHealthMonitor` on the same Trainer share them."""

    def __init__(self, norm_type: float, group_by: GroupBy) -> None:
        self.norm_type = norm_type
        self.group_by = group_by
        self.reset()

    def reset(self) -> None:
        """Forget layouts and cached norms (a new fit may bring new optimizers and parameters)."""
        self._layouts: dict[int, ParamLayout] = {}
        self._subsets: dict[tuple[int, tuple[int, ...]], ParamLayout] = {}
        self._key: tuple[int, int] | None = None
        self._norms: Norms | None = None

    def layout(self, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> ParamLayout:
        layout = self._layouts.get(id(optimizer))
        if layout is None:
            layout = self._layouts[id(optimizer)] = optimizer_layout(pl_module, optimizer, self.group_by)
        return layout

    def grad_norms(
        self, step: int, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> Norms | None:
        """Norms of the gradients at optimizer step ``step`` (``trainer.global_step``; ``None`` when no parameter
        has one). No host sync."""
        key = (id(optimizer), step)
        if key == self._key:
            return self._norms
        layout = self.layout(pl_module, optimizer)
        grads = [p.grad for p in layout.params]
        if any(g is None for g in grads):
            # Frozen or unused this step: norms over the parameters that do have a gradient.
            keep = tuple(i for i, g in enumerate(grads) if g is not None)
            sub_key = (id(optimizer), keep)
            if sub_key not in self._subsets:
                self._subsets[sub_key] = layout.subset(keep)
            layout = self._subsets[sub_key]
            grads = [grads[i] for i in keep]
        self._key = key
        self._norms = compute_norms(layout, grads, self.norm_type) if grads else None
        return self._norms
