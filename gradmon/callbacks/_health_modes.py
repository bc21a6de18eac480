"""GradHealthMonitor's two execution modes, one interface (:class:`HealthMode`):

- :class:`Immediate` (the default): the step's norms are read on the host (one host transfer) and judged before
  ``optimizer.step``, so every action acts on the flagged step;
- :class:`SyncFree` (``sync_free=True``): nothing waits for the device; the skip decision is taken on the device and
  handed to the optimizer, everything else is judged one step later from a non-blocking copy.

Both hand what the rules found to the same :class:`~gradmon.callbacks._health_judge.HealthJudge`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from gradmon.callbacks import _ranks
from gradmon.callbacks._grad_source import amp_overflow, amp_overflow_on_device, enabled_scaler
from gradmon.callbacks._health_judge import HealthJudge, Skip
from gradmon.callbacks._host_copy import HostCopy
from gradmon.callbacks._shared import shared_board
from gradmon.errors import warn_health
from gradmon.health import HealthEvent
from gradmon.norms import Norms, read_host


class HealthMode:
    """How a step's numbers reach the judge. ``source`` gives the step's gradient norms (``grad_norms(step,
    pl_module, optimizer)``), shared with a GradNormMonitor of the same settings when there is one."""

    def __init__(self, judge: HealthJudge) -> None:
        self.judge = judge
        self.source: Any = None
        self._scaled = False
        self._collective = False
        self._group: Any = None

    def setup(self, trainer: pl.Trainer) -> None:
        """At setup of a fit, on every rank."""

    def start(self, trainer: pl.Trainer, source: Any) -> None:
        """At the start of a fit."""
        self.source = source
        self._scaled = enabled_scaler(trainer) is not None  # the precision plugin does not change during a fit
        # Every rank shares what it found at every step, whatever the actions: a fault on one rank after DDP's
        # all-reduce is then warned about, logged and acted on by every rank.
        self._collective = _ranks.distributed(trainer)

    def before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer, step: int,
        log_now: bool,
    ) -> None:
        raise NotImplementedError

    def finish(self, trainer: pl.Trainer) -> None:
        """At the end of training: judge what is still to be judged."""

    def teardown(self) -> None:
        """Remove what the mode attached to optimizers."""

    def _judge(
        self, trainer: pl.Trainer, step: int, log_now: bool, overflow: bool | None, events: list[HealthEvent] | None,
        skip: Skip,
    ) -> None:
        events = events or []
        if self._collective:
            events = _ranks.share_events(events, self._group, self._share_device(trainer))
        self.judge.judge(trainer, step, log_now, overflow, events, skip)

    def _share_device(self, trainer: pl.Trainer) -> torch.device:
        return torch.device("cpu") if dist.get_backend() == "gloo" else trainer.strategy.root_device


def discard_update(trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
    """Discard the step's update: every gradient of the optimizer set to ``None`` (optimizers leave such parameters,
    and their state, alone). The Trainer's before-discard hooks run first (a GradNormMonitor listed after the
    GradHealthMonitor takes its numbers of the step), so what they log does not depend on the order of callbacks."""
    shared_board(trainer).discarding(trainer, pl_module, optimizer)
    optimizer.zero_grad(set_to_none=True)


class Immediate(HealthMode):
    """The default mode: one host read of the step's norms, judged before ``optimizer.step``."""

    def before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer, step: int,
        log_now: bool,
    ) -> None:
        overflow = amp_overflow(trainer, optimizer) if self._scaled else None
        events = None
        if not overflow:
            norms = self.source.grad_norms(step, pl_module, optimizer)
            if norms is not None:
                per_layer, _ = norms.per_layer()  # the step's one host transfer
                # An inf norm is non-finite, as in sync-free mode, which cannot look at the gradient: a finite
                # gradient whose norm overflows is beyond what float32 arithmetic on it (an optimizer's moments,
                # clip_grad_norm_) survives.
                events = self.judge.tracker.update(step, per_layer, None)
                if not events and not log_now and overflow is None and not self._collective:
                    return  # most steps: nothing flagged, nothing to log, count or agree on with other ranks

        def skip() -> bool:
            discard_update(trainer, pl_module, optimizer)
            return True

        self._judge(trainer, step, log_now, overflow, events, skip)


@dataclass(eq=False)
class _Measured:
    """One step's numbers on their way to the host, in sync-free mode: per-layer norms and their total, then the
    device's skip flag, or (``norms``: no device skip) the per-tensor norms of ``norms``; then the GradScaler's
    overflow flag when there is one. On the CPU, with no overflow flag, nothing is copied (``copy`` is ``None``) and
    ``norms`` is read as it is."""

    step: int
    log_now: bool
    layer_names: tuple[str, ...]
    copy: HostCopy | None
    has_skip_flag: bool
    has_overflow: bool
    norms: Norms | None = None

    def read(self) -> tuple[dict[str, float] | None, bool, bool | None]:
        """On the host: the per-layer norms (``None`` when the step had no gradients), whether the device skipped
        the step, and whether the GradScaler overflowed (``None``: no scaler)."""
        values = self.copy.values() if self.copy is not None else []
        norms = self.norms
        if norms is not None:  # per-tensor norms: the layers' norms are made here, on the host
            if self.copy is not None:
                norms.set_host(values[: len(norms.layout)])
                extra = values[len(norms.layout) :]
            else:
                extra = values
            per_layer: dict[str, float] | None = norms.per_layer()[0]
        else:
            n = len(self.layer_names)
            per_layer = dict(zip(self.layer_names, values[:n])) if n else None
            extra = values[n + 1 :] if n else values
        skipped = bool(self.has_skip_flag and extra.pop(0) > 0)
        overflow = bool(extra.pop(0) > 0) if self.has_overflow else None
        return per_layer, skipped, overflow


class SyncFree(HealthMode):
    """``sync_free=True``: the skip decision for the conditions in ``device_skips`` (a non-finite layer; a layer
    above ``exploding_threshold`` for ``exploding_patience`` steps) is taken on the device, combined across ranks
    with one device collective and handed to the optimizer as ``found_inf``; the rest is judged one step later."""

    def __init__(self, judge: HealthJudge, device_skips: set[str]) -> None:
        super().__init__(judge)
        self.device_skips = device_skips
        self._in_flight: list[_Measured] = []
        self._device_streaks: dict[tuple[str, ...], torch.Tensor] = {}
        self._handed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._hooked: dict[int, list[Any]] = {}
        self._warned_host_skip = False

    def setup(self, trainer: pl.Trainer) -> None:
        self._in_flight, self._device_streaks, self._handed, self._hooked = [], {}, {}, {}
        self._warned_host_skip = False
        self._group = None
        if _ranks.distributed(trainer):
            # Host decisions are shared one step late, from numbers already on the host: over gloo, so that
            # sharing them waits for no device.
            self._group = _ranks.host_group()

    def _share_device(self, trainer: pl.Trainer) -> torch.device:
        return torch.device("cpu")

    def before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer, step: int,
        log_now: bool,
    ) -> None:
        self.finish(trainer)  # the earlier steps' numbers, surely on the host by now
        self._measure_on_device(trainer, pl_module, optimizer, step, log_now)

    def _measure_on_device(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer, step: int,
        log_now: bool,
    ) -> None:
        """Everything that must happen before ``optimizer.step`` without a host read: per-layer norms, the skip
        decision (one device collective across ranks) handed to the optimizer, and a non-blocking copy of the
        numbers for the host to judge one step later."""
        self._take_back_flag(optimizer)
        overflow = amp_overflow_on_device(trainer, optimizer) if self._scaled else None
        norms = self.source.grad_norms(step, pl_module, optimizer)
        layer_names: tuple[str, ...] = ()
        parts: list[torch.Tensor] = []
        skip_flag = None
        later = None
        if norms is not None and self.device_skips:
            # The skip decision is taken on the device, from per-layer norms made there.
            layer_names = tuple(norms.layout.layer_names)
            parts = [norms.device_layer_norms()]
            skip_flag = self._max_over_ranks(trainer, self._device_skip_flag(layer_names, parts[0][:-1]))
            self._hand_over(trainer, pl_module, optimizer, skip_flag)
            parts.append(skip_flag.reshape(1).double())
        elif norms is not None:
            # Nothing to decide on the device: only the per-tensor norms travel, and the host makes the layers'
            # norms a step later, as the default mode does (fewer kernels: on a GPU each one is a launch).
            later = norms
            if overflow is not None or norms.device.type != "cpu":
                parts = [norms.device_values]  # float32 or float64; torch.cat widens it beside the overflow flag
        if overflow is not None:
            parts.append(overflow.reshape(1).double().to(parts[0].device if parts else overflow.device))
        copy = HostCopy(torch.cat(parts) if len(parts) > 1 else parts[0]) if parts else None
        self._in_flight.append(
            _Measured(step, log_now, layer_names, copy, skip_flag is not None, overflow is not None, later)
        )

    def _device_skip_flag(self, layer_names: tuple[str, ...], layers: torch.Tensor) -> torch.Tensor:
        """1.0 when this step must be skipped (a non-finite layer; a layer above ``exploding_threshold`` for
        ``exploding_patience`` steps in a row), else 0.0: on the device, from the layers' norms."""
        rules = self.judge.rules
        bad = torch.zeros((), dtype=torch.bool, device=layers.device)
        if "nonfinite" in self.device_skips:
            bad = bad | ~torch.isfinite(layers).all()
        if "exploding" in self.device_skips:
            above = layers > rules.exploding_threshold
            if rules.exploding_patience > 1:
                streak = self._device_streaks.get(layer_names)
                streak = (streak if streak is not None else torch.zeros_like(layers)) + 1
                streak = streak * above
                self._device_streaks[layer_names] = streak
                above = streak >= rules.exploding_patience
            bad = bad | above.any()
        return bad.float()

    def _max_over_ranks(self, trainer: pl.Trainer, flag: torch.Tensor) -> torch.Tensor:
        if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return flag
        flag = flag.to(trainer.strategy.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # a device collective: no host read
        return flag

    def _hand_over(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer, flag: torch.Tensor
    ) -> None:
        """Give the optimizer the skip flag: as ``found_inf`` for optimizers that take one (fused Adam, AdamW, SGD:
        they then leave weights, moments and step counts untouched), OR-ed with a GradScaler's own flag; for the
        others, a host read of the flag (one sync per step), said once."""
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            self._hook_optimizer(optimizer)
            device = next((p.device for g in optimizer.param_groups for p in g["params"]), flag.device)
            flag = flag.to(device)
            existing = getattr(optimizer, "found_inf", None)
            ours = flag if existing is None else torch.maximum(existing, flag.to(existing.device))
            optimizer.found_inf = ours
            self._handed[id(optimizer)] = (flag, ours)
            return
        if not self._warned_host_skip:
            self._warned_host_skip = True
            rank_zero_warn(
                f"GradHealthMonitor(sync_free=True): {type(optimizer).__name__} cannot take a device-side skip flag "
                "(fused=True Adam, AdamW and SGD can), so the skip decision is read on the host every step for it, "
                "which waits for the device. Pass fused=True to the optimizer to keep the step sync-free."
            )
        if read_host(flag.reshape(1))[0] > 0:
            discard_update(trainer, pl_module, optimizer)

    def _hook_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        if id(optimizer) in self._hooked:
            return

        def before_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            # A GradScaler sets its own found_inf right before step (after this callback ran): OR ours into it.
            handed = self._handed.get(id(opt))
            current = getattr(opt, "found_inf", None)
            if handed is not None and current is not None and current is not handed[1]:
                opt.found_inf = torch.maximum(current, handed[0].to(current.device))

        def after_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self._take_back_flag(opt)

        self._hooked[id(optimizer)] = [
            optimizer.register_step_pre_hook(before_step),
            optimizer.register_step_post_hook(after_step),
        ]

    def _take_back_flag(self, optimizer: torch.optim.Optimizer) -> None:
        """Remove the flag handed over for a step (also when that step never called ``optimizer.step``); a flag a
        GradScaler set is the scaler's to remove."""
        handed = self._handed.pop(id(optimizer), None)
        if handed is not None and getattr(optimizer, "found_inf", None) is handed[1]:
            del optimizer.found_inf

    def teardown(self) -> None:
        for handles in self._hooked.values():
            for handle in handles:
                handle.remove()
        self._hooked = {}

    def finish(self, trainer: pl.Trainer) -> None:
        """Judge the steps whose numbers are on their way to the host."""
        in_flight, self._in_flight = self._in_flight, []
        for measured in in_flight:
            per_layer, skipped, overflow = measured.read()
            events = None
            if per_layer is not None and not overflow:
                events = self.judge.tracker.update(measured.step, per_layer, None)
                if not events and not measured.log_now and not skipped and overflow is None and not self._collective:
                    continue  # most steps: nothing flagged, skipped, logged or shared with other ranks
            ledger = self.judge.ledger
            counted = ledger.skipped_steps
            self._judge(trainer, measured.step, measured.log_now, overflow, events, lambda s=skipped: s)
            if skipped and ledger.skipped_steps == counted and not overflow:
                # The device flag is combined across ranks: another rank's gradients made every rank skip.
                ledger.skipped_steps += 1
                warn_health(
                    f"gradmon: the update of step {measured.step} was skipped: another rank found non-finite or "
                    "exploding gradients."
                )
