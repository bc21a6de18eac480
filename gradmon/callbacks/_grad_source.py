"""Per-step gradient norms shared by the callbacks of one Trainer, computed at most once per optimizer step; the
optimizers' names both monitors use when a module has several; and what a GradScaler did at the step (its pending
scale, whether it overflowed)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from operator import itemgetter
from typing import Any

import lightning.pytorch as pl
import torch

from gradmon.norms import GradientNorms, GroupBy, Norms, ParamLayout, read_host
from gradmon.sharding import local_tensor


def optimizer_layout(pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer, group_by: GroupBy) -> ParamLayout:
    """Every parameter of the module that ``optimizer`` holds, in registration order, trainable or not.

    Frozen parameters are in the layout but have no gradient, so they drop out at each step (see
    :meth:`GradNormSource.grad_norms`); a parameter unfrozen later is then monitored from its first gradient without
    a rebuild.
    """
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    # The strategy's model is the outermost wrapper (FSDP1 may wrap the LightningModule itself): the layout finds
    # the FSDP1 instances that own the parameters there.
    module = getattr(pl_module.trainer.strategy, "model", None) or pl_module
    return ParamLayout.from_named_parameters(
        ((n, p) for n, p in pl_module.named_parameters() if id(p) in in_optimizer), group_by, module=module
    )


def optimizer_signature(optimizer: torch.optim.Optimizer) -> tuple[int, ...]:
    """Changes when parameters are added to or removed from ``optimizer`` (``add_param_group``, as Lightning's
    ``BackboneFinetuning`` does): the size of each parameter group. A few integers, so it is checked every step (in
    C-level maps: no Python frame per group)."""
    return tuple(map(len, map(_PARAMS, optimizer.param_groups)))


_PARAMS = itemgetter("params")


def optimizer_names(optimizers: Sequence[Any]) -> list[str]:
    """Names as Lightning's ``LearningRateMonitor`` gives them: the class name, and ``-1``, ``-2``, ... for the
    second, third, ... optimizer of the same class (``["Adam", "Adam-1", "SGD"]``)."""
    seen: defaultdict[type, int] = defaultdict(int)
    names = []
    for optimizer in optimizers:
        cls = type(optimizer)
        seen[cls] += 1
        names.append(cls.__name__ if seen[cls] == 1 else f"{cls.__name__}-{seen[cls] - 1}")
    return names


class GradNormSource:
    """Gradient norms of the parameters an optimizer is about to update, cached for the current step so that a
    :class:`~gradmon.GradNormMonitor` and a :class:`~gradmon.GradHealthMonitor` on the same Trainer share them."""

    def __init__(self, norm_type: float, group_by: GroupBy) -> None:
        self.norm_type = norm_type
        self.group_by = group_by
        self.reset()

    def reset(self, trainer: pl.Trainer | None = None) -> None:
        """Forget layouts and cached norms (a new fit may bring new optimizers and parameters), and note whether the
        fit's precision plugin has a GradScaler (it does not change during a fit)."""
        self._per_optimizer: dict[int, tuple[tuple[int, ...], GradientNorms]] = {}
        self._key: tuple[int, int] | None = None
        self._norms: Norms | None = None
        self._scaled = trainer is not None and enabled_scaler(trainer) is not None

    def layout(self, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> ParamLayout:
        """The layout of every parameter ``optimizer`` holds, rebuilt only when its parameter groups change."""
        return self._gradient_norms(pl_module, optimizer).layout

    def _gradient_norms(self, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> GradientNorms:
        cached = self._per_optimizer.get(id(optimizer))
        signature = optimizer_signature(optimizer)
        if cached is None or cached[0] != signature:
            layout = optimizer_layout(pl_module, optimizer, self.group_by)
            cached = self._per_optimizer[id(optimizer)] = (signature, GradientNorms(layout, self.norm_type))
        return cached[1]

    def grad_norms(
        self, step: int, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> Norms | None:
        """Norms of the gradients at optimizer step ``step`` (``trainer.global_step``), over every parameter of the
        optimizer that has a gradient now (``None`` when none has). No host sync."""
        key = (id(optimizer), step)
        if key != self._key:
            norms = self._gradient_norms(pl_module, optimizer).compute()
            scale = pending_loss_scale(pl_module.trainer, optimizer) if self._scaled else None
            self._norms = norms.divided_by(scale) if norms is not None and scale is not None else norms
            self._key = key
        return self._norms


def pending_loss_scale(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """The GradScaler's scale when the gradients are still scaled at ``on_before_optimizer_step``, else ``None``.

    Lightning unscales before that hook, except for optimizers that unscale inside their own step (fused Adam, AdamW
    and SGD, which take the scale from the scaler): their gradients still carry the loss scale there, and norms of
    them would be the scale (65536 by default) times too large.
    """
    scaler = enabled_scaler(trainer)
    if scaler is None or not getattr(optimizer, "_step_supports_amp_scaling", False):
        return None
    from torch.amp.grad_scaler import OptState

    if scaler._per_optimizer_states.get(id(optimizer), {}).get("stage") is OptState.UNSCALED:
        return None
    return scaler._scale


def enabled_scaler(trainer: pl.Trainer) -> Any:
    """The precision plugin's GradScaler when it has an enabled one (fp16 mixed precision), else ``None``."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def amp_overflow_on_device(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """Whether the precision plugin's GradScaler found inf/NaN when it unscaled this step's gradients (it then skips
    ``optimizer.step`` and lowers its scale), as a device scalar (nonzero: yes); ``None`` when no enabled scaler has
    unscaled this optimizer."""
    scaler = enabled_scaler(trainer)
    if scaler is None:
        return None
    # Lightning unscales before on_before_optimizer_step; the scaler keeps what it found per optimizer until update().
    found_inf = scaler._per_optimizer_states.get(id(optimizer), {}).get("found_inf_per_device")
    if not found_inf:
        if pending_loss_scale(trainer, optimizer) is not None:
            # An optimizer that unscales inside its step: the scaler has not looked yet, and will skip the step iff
            # a gradient is non-finite, which is what an overflow is.
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            return (~torch.stack([torch.isfinite(local_tensor(g)).all() for g in grads]).all()).float()
        return None
    values = list(found_inf.values())
    return torch.stack([v.reshape(()).to(values[0].device) for v in values]).sum()


def amp_overflow(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> bool | None:
    """:func:`amp_overflow_on_device`, read on the host."""
    flag = amp_overflow_on_device(trainer, optimizer)
    return None if flag is None else read_host(flag.reshape(1))[0] > 0
