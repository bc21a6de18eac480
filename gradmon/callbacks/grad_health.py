"""GradHealthMonitor: flag vanishing, exploding and non-finite gradients per layer, and act on them."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from gradmon import tags
from gradmon._validation import check_bool, check_choice, check_int, check_norm_type
from gradmon.callbacks import _logging, _ranks
from gradmon.callbacks._diagnosis import diagnosis_board
from gradmon.callbacks._grad_source import (
    GradNormSource,
    OptimizerSteps,
    enabled_scaler,
    global_step,
    pending_loss_scale,
    step_reader,
)
from gradmon.callbacks.grad_norm import GradNormMonitor
from gradmon.errors import GradientHealthError, warn_health
from gradmon.health import (
    ACTIONS,
    BY_SEVERITY,
    CONDITIONS,
    VANISHING_ACTIONS,
    Action,
    Condition,
    HealthEvent,
    HealthRules,
    HealthTracker,
)
from gradmon.norms import GroupBy, HostCopy, Norms, read_host
from gradmon.sharding import local_tensor
from gradmon.tensorboard import markdown_table

_MAX_NAMED = 5
#: Events kept in a checkpoint: the latest ones. The per-step counts are in the logs, so a checkpoint's size does
#: not grow with the length of the run.
EVENTS_IN_CHECKPOINT = 100
#: A GradScaler whose scale is below this when it overflows again is shrinking the loss, not just fitting it to fp16:
#: the gradients overflow unscaled, or are NaN/inf at any scale. Healthy runs overflow only at scales far above 1
#: (routinely at the start, from the default 65536 or a larger ``init_scale``, and when the scale grows again).
AMP_SCALE_FLOOR = 1.0


class GradHealthMonitor(Callback):
    r"""Classify every layer's gradient each optimizer step as vanishing, exploding, non-finite or healthy, and act.

    Runs in ``on_before_optimizer_step`` (after AMP unscaling and accumulation, before clipping) on every step. It
    reuses the norms of a :class:`~gradmon.GradNormMonitor` with the same ``norm_type`` and ``group_by`` on the same
    Trainer, else computes its own (one fused kernel per device/dtype group), and makes one host transfer per step.
    The rules and the reasons for their defaults are those of :class:`gradmon.health.HealthRules`: absolute
    thresholds, a spike rule against each layer's own running history after a warm-up, and a depth rule comparing
    the first layers with the last; vanishing and exploding need ``*_patience`` consecutive steps, non-finite is
    flagged at once and names the first layer, in registration order, whose gradient holds a NaN or inf. With
    ``group_by="parameter"``, a parameter more than ``1 / sibling_ratio`` (100) times below another parameter of its
    layer is cancelled by construction (a bias followed by BatchNorm has a zero gradient) or at an optimum, not
    starved through depth, so it is not judged vanishing; the end-of-fit summary names the parameters this spared
    (:meth:`cancelled_note`; ``tracker.cancelled``).

    Actions, per condition (``on_vanishing``, ``on_exploding``, ``on_nonfinite``):

    - ``"ignore"``: recorded in ``events`` and the logged counts only.
    - ``"warn"``: a :class:`~gradmon.GradientHealthWarning` naming the step, the layers and their norms. The first
      occurrence of each condition is always reported, later ones at most every ``warn_every_n_steps`` steps.
    - ``"skip"`` (not for vanishing): the same warning, and the step's update is discarded (all gradients of the
      optimizer set to ``None`` before ``optimizer.step``), so weights and optimizer state are exactly as before.
    - ``"stop"``: the same warning, and ``trainer.should_stop = True`` (checkpoints and loggers finish normally).
    - ``"raise"``: :class:`~gradmon.GradientHealthError` with the same details.

    Under DDP and FSDP the decision to skip, stop or raise is reduced across ranks, so all ranks act together.

    ``sync_free=True`` (off by default) never stalls the device: on a GPU every host read (``.item()``, ``.tolist()``)
    waits for the device to drain its queue, and the default mode makes one per step. In sync-free mode the decision
    that must come before ``optimizer.step`` (a non-finite layer, or a layer above ``exploding_threshold`` for
    ``exploding_patience`` steps, for the conditions whose action is ``"skip"``) is computed on the device, combined
    across ranks with one device collective, and handed to the optimizer as ``found_inf``: fused optimizers (``Adam``,
    ``AdamW``, ``SGD`` with ``fused=True``, on CUDA and CPU) then leave weights, moments and step counts untouched; it
    is OR-ed with a GradScaler's own flag, never replacing it. An optimizer that cannot take the flag gets a host read
    of it instead (one sync per step, said once in a warning). Everything else (the spike and depth rules, patience,
    warnings, ``events``, stop, raise and logging) reads the step's numbers one step later, from a non-blocking copy
    into pinned memory: warnings, ``"stop"`` and ``"raise"`` come one step late, so the flagged step's update has been
    applied (and with ``"stop"`` one more step runs) unless a device skip discarded it; only ``"skip"`` protects the
    weights at the flagged step. The spike rule's ``"skip"`` cannot act in time and is reported as not skipped. A
    rank-local fault (written after the all-reduce) is still skipped on every rank through the combined device flag.

    Under DDP every rank shares what it found at every step (one all-reduce of a few integers per rank; the events
    themselves are gathered only when the ranks disagree; in sync-free mode over a gloo group, from numbers already on
    the host, so that it waits for no device): a fault on one rank only is warned about and logged by rank 0, naming
    that rank (:attr:`HealthEvent.rank <gradmon.health.HealthEvent.rank>`), and every rank skips, stops or raises
    together. Every rank must have the same gradmon callbacks; at setup a mismatch, or a rank without them, is a
    ``RuntimeError`` (see :data:`gradmon.callbacks._ranks.SETUP_CHECK_TIMEOUT_S`) instead of a hang.

    In both modes an infinite norm counts as non-finite, even when the gradient's entries are finite (entries of
    1e30 overflow a float32 norm): such a gradient is beyond what float32 arithmetic on it survives (Adam's second
    moment, ``clip_grad_norm_``, which calls it non-finite too), and sync-free mode has no gradient left to inspect
    when it judges.

    With ``diagnose`` (the default) each warning and the end-of-fit summary end with one line from
    :mod:`gradmon.diagnosis`, "likely cause: ...; try: ...", from an :class:`~gradmon.ActivationMonitor` on the same
    Trainer when there is one, else from the weights and gradients (computed only when a warning is issued).

    Several optimizers (a GAN under manual optimization): each optimizer's step is judged on the layers it updates;
    a layer's patience streak changes only at steps where that layer has a gradient, and ``log_every_n_steps`` counts
    each optimizer's own steps.

    fp16 with a ``GradScaler`` (``precision="16-mixed"``): a step the scaler skips because its scaled gradients
    overflowed is the scaler's business. It is counted in :attr:`amp_overflow_steps` (logged as
    ``grad_health/amp_overflow_steps``), not judged, never flagged non-finite and never acted on. When the scaler
    overflows with its scale already below :data:`AMP_SCALE_FLOOR` (1), overflowing has driven the scale ever down
    (from the default 65536 that takes 17 overflows in a row): the gradients are non-finite or too large for fp16
    even unscaled. One warning says so, once per fit.

    Logged (to ``trainer.loggers``, rank 0) every ``log_every_n_steps`` steps and at every step with a flag, at
    ``trainer.global_step``: ``grad_health/vanishing``, ``grad_health/exploding``, ``grad_health/nonfinite`` (layers
    flagged that step) and ``grad_health/skipped_steps`` (cumulative), and ``grad_health/amp_overflow_steps``
    (cumulative) when a GradScaler is in use; at flagged steps, ``grad_health_flag/<layer>`` for each flagged layer: 1
    vanishing, 2 exploding, 3 non-finite (tag names in :mod:`gradmon.tags`). ``events`` holds a
    :class:`~gradmon.health.HealthEvent` (step, layer, condition, value, rule) for every flag (the first
    ``max_events``); a summary table is printed at the end of fit.

    Checkpoints keep the running history, the counts and the latest :data:`EVENTS_IN_CHECKPOINT` events (a few KB
    whatever the run's length); a resume restores them even when thresholds changed (history is data, thresholds are
    settings: the new thresholds apply). A new ``fit`` without ``ckpt_path`` starts from a clean history.

    Example::

        from gradmon import GradHealthMonitor, HealthRules
        trainer = Trainer(callbacks=[GradHealthMonitor(on_exploding="skip", on_nonfinite="skip")])
        strict = GradHealthMonitor(HealthRules(vanishing_threshold=1e-6, vanishing_patience=5), on_vanishing="stop")

    Args:
        rules: the thresholds, a :class:`~gradmon.HealthRules` (None: ``HealthRules()``, whose defaults it explains):
            ``vanishing_threshold``, ``exploding_threshold``, ``spike_factor``, ``warmup_steps``, ``history_decay``,
            ``depth_ratio``, ``depth_window``, ``depth_min_layers``, ``sibling_ratio``, ``vanishing_patience``,
            ``exploding_patience``. In a LightningCLI config: ``init_args: {rules: {vanishing_threshold: 1e-6}}``.
        on_vanishing: ``"ignore"``, ``"warn"``, ``"stop"`` or ``"raise"``.
        on_exploding: ``"ignore"``, ``"warn"``, ``"skip"``, ``"stop"`` or ``"raise"``.
        on_nonfinite: ``"ignore"``, ``"warn"``, ``"skip"``, ``"stop"`` or ``"raise"``.
        norm_type: order p of the norm: any number p > 0, or ``"inf"``.
        group_by: ``"layer"`` or ``"parameter"``, as :class:`~gradmon.GradNormMonitor` takes it.
        log_every_n_steps: log the counts every this many optimizer steps (and at every flagged step); None takes
            the Trainer's ``log_every_n_steps``.
        warn_every_n_steps: at most one warning per condition every this many steps; the first is always issued.
        max_events: how many events :attr:`events` keeps (the first ones).
        summary: print a summary table at the end of fit.
        sync_free: never stall the device to read the norms (see above).
        diagnose: end each warning and the summary with the likely cause.

    Raises:
        ValueError: naming the argument, for a value out of its range or not among its choices (``on_vanishing=
            "skip"`` included); :class:`~gradmon.HealthRules` raises it for its own fields where it is written.
        TypeError: for ``rules`` other than a ``HealthRules`` or None; for ``summary``, ``sync_free`` or
            ``diagnose`` other than ``True`` or ``False``.
    """

    def __init__(
        self,
        rules: HealthRules | None = None,
        *,
        on_vanishing: Action = "warn",
        on_exploding: Action = "warn",
        on_nonfinite: Action = "warn",
        norm_type: float | str = 2.0,
        group_by: GroupBy = "layer",
        log_every_n_steps: int | None = None,
        warn_every_n_steps: int = 100,
        max_events: int = 100_000,
        summary: bool = True,
        sync_free: bool = False,
        diagnose: bool = True,
    ) -> None:
        if rules is not None and not isinstance(rules, HealthRules):
            raise TypeError(
                f"`rules={rules!r}` is not valid: expected a gradmon.HealthRules (the thresholds, e.g. "
                "HealthRules(vanishing_threshold=1e-6)) or None for the defaults."
            )
        self.rules = rules if rules is not None else HealthRules()
        self.actions: dict[Condition, str] = {
            "vanishing": check_choice("on_vanishing", on_vanishing, VANISHING_ACTIONS),
            "exploding": check_choice("on_exploding", on_exploding, ACTIONS),
            "nonfinite": check_choice("on_nonfinite", on_nonfinite, ACTIONS),
        }
        self.norm_type = check_norm_type("norm_type", norm_type)
        self.group_by: GroupBy = check_choice("group_by", group_by, ("layer", "parameter"))
        self.log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps, 1, allow_none=True)
        self.warn_every_n_steps = check_int("warn_every_n_steps", warn_every_n_steps, 1)
        self.max_events = check_int("max_events", max_events, 0)
        self.summary = check_bool("summary", summary)
        self.sync_free = check_bool("sync_free", sync_free)
        self.diagnose = check_bool("diagnose", diagnose)
        # Conditions the device itself must skip in sync-free mode (before optimizer.step, without a host read).
        self._device_skips = {c for c in ("nonfinite", "exploding") if self.actions[c] == "skip"}
        self._own_source = GradNormSource(self.norm_type, self.group_by)
        self._source = self._own_source
        self._every = self.log_every_n_steps or 50
        self._reset()

    def _reset(self) -> None:
        """A clean history: at construction and at the start of every fit (a resume then loads its state)."""
        self.tracker = HealthTracker(self.rules, self.group_by)
        self.events: list[HealthEvent] = []
        self.skipped_steps = 0
        #: Steps a GradScaler skipped because its scaled gradients overflowed (fp16).
        self.amp_overflow_steps = 0
        self.flagged_steps: Counter[str] = Counter()
        self._last_report: dict[str, int] = {}
        self._unreported: Counter[str] = Counter()
        self._layer_counts: dict[str, Counter[str]] = {c: Counter() for c in CONDITIONS}
        self._first_step: dict[str, int] = {}
        self._steps = OptimizerSteps()
        self._global_step = global_step
        self._overflow_run = 0
        self._overflow_warned = False
        self._in_flight: list[_Measured] = []
        self._device_streaks: dict[tuple[str, ...], torch.Tensor] = {}
        self._handed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._hooked: dict[int, list[Any]] = {}
        self._warned_host_skip = False
        self._scaled = False
        self._collective = False
        self._group: Any = None

    @cached_property  # Lightning reads it around every hook call
    def state_key(self) -> str:
        # Thresholds are settings, not part of the identity: a resume with new thresholds keeps the history.
        return self._generate_state_key(norm_type=self.norm_type, group_by=self.group_by)

    @property
    def first_flagged_steps(self) -> dict[str, int]:
        """The first step each condition was flagged at (only the conditions flagged so far)."""
        return dict(self._first_step)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning calls setup before it restores callback state, so a resumed fit gets its history back and a
        # fresh fit of the same instance starts clean.
        if stage == "fit":
            self._reset()
            diagnosis_board(trainer).join(self)
            _ranks.check_at_setup(trainer, self)
            if self.sync_free and _ranks.distributed(trainer):
                # Host decisions are shared one step late, from numbers already on the host: over gloo, so that
                # sharing them waits for no device.
                self._group = _ranks.host_group()

    def _ranks_signature(self) -> str:
        """What must be the same on every rank for the collectives to line up (thresholds may differ)."""
        return f"GradHealthMonitor(sync_free={self.sync_free}, device_skips={sorted(self._device_skips)})"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.diagnose:
            diagnosis_board(trainer).start(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._every = self.log_every_n_steps or trainer.log_every_n_steps
        shared = next(
            (
                cb for cb in trainer.callbacks
                if isinstance(cb, GradNormMonitor) and cb.norm_type == self.norm_type and cb.group_by == self.group_by
            ),
            None,
        )
        self._source = shared.source if shared is not None else self._own_source
        if shared is None:
            self._own_source.reset(trainer)
        self._scaled = enabled_scaler(trainer) is not None  # the precision plugin does not change during a fit
        self._global_step = step_reader(trainer)
        # Every rank shares what it found at every step, whatever the actions: a fault on one rank after DDP's
        # all-reduce is then warned about, logged and acted on by every rank.
        self._collective = _ranks.distributed(trainer)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = self._global_step(trainer)
        _, count = self._steps.advance(trainer, optimizer, step)
        log_now = count % self._every == 0
        if self.sync_free:
            self._judge_in_flight(trainer)  # the earlier steps' numbers, surely on the host by now
            self._measure_on_device(trainer, pl_module, optimizer, step, log_now)
            return
        overflow = _amp_overflow(trainer, optimizer) if self._scaled else None
        per_layer, confirm, events = None, None, None
        if not overflow:
            norms = self._source.grad_norms(step, pl_module, optimizer)
            if norms is not None:
                per_layer, _ = norms.per_layer()  # the step's one host transfer
                # An inf norm is non-finite, as in sync-free mode, which cannot look at the gradient: a finite
                # gradient whose norm overflows is beyond what float32 arithmetic on it (an optimizer's moments,
                # clip_grad_norm_) survives.
                events = self.tracker.update(step, per_layer, None)
                if not events and not log_now and overflow is None and not self._collective:
                    return  # most steps: nothing flagged, nothing to log, count or agree on with other ranks

        def skip() -> bool:
            self._skip(trainer, pl_module, optimizer)
            return True

        self._judge(trainer, step, log_now, overflow, per_layer, confirm, skip, events=events)

    def _judge(
        self,
        trainer: pl.Trainer,
        step: int,
        log_now: bool,
        overflow: bool | None,
        per_layer: dict[str, float] | None,
        confirm_nonfinite: Any,
        skip: Any,
        events: list[HealthEvent] | None = None,
    ) -> None:
        """Apply the rules to one step's numbers on the host (unless ``events`` says what they found), record, act
        and log. ``skip()`` discards the step's update if it still can and says whether the update was discarded."""
        if overflow:
            # The scaler skips this step and lowers its scale: its gradients are not the model's.
            self._count_overflow(step, trainer)
        else:
            if overflow is not None:
                self._overflow_run = 0
            if events is None and per_layer is not None:
                events = self.tracker.update(step, per_layer, confirm_nonfinite)
        events = events or []
        if self._collective:
            events = self._share(trainer, events)
        flagged = {e.condition for e in events}
        if flagged:
            self._record(step, events, flagged)
            self._act(trainer, step, flagged, events, skip)
        if (flagged or log_now) and trainer.is_global_zero and trainer.loggers:
            counts = {tags.health_count(c): float(sum(e.condition == c for e in events)) for c in CONDITIONS}
            counts[tags.tag(tags.GRAD_HEALTH, tags.SKIPPED_STEPS)] = float(self.skipped_steps)
            if overflow is not None:
                counts[tags.tag(tags.GRAD_HEALTH, tags.AMP_OVERFLOW_STEPS)] = float(self.amp_overflow_steps)
            # Which layers, so that `gradmon report` can mark them: the most severe condition of each layer.
            for e in reversed(events):
                counts[tags.tag(tags.GRAD_HEALTH_FLAG, e.layer)] = float(1 + CONDITIONS.index(e.condition))
            _logging.log_scalars(trainer, counts, step)

    # --- sync-free mode -------------------------------------------------------------------------------------------

    def _measure_on_device(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        step: int,
        log_now: bool,
    ) -> None:
        """Everything that must happen before ``optimizer.step`` without a host read: per-layer norms, the skip
        decision (one device collective across ranks) handed to the optimizer, and a non-blocking copy of the
        numbers for the host to judge one step later."""
        self._take_back_flag(optimizer)
        overflow = _amp_overflow_on_device(trainer, optimizer) if self._scaled else None
        norms = self._source.grad_norms(step, pl_module, optimizer)
        layer_names: tuple[str, ...] = ()
        parts: list[torch.Tensor] = []
        skip_flag = None
        later = None
        if norms is not None and self._device_skips:
            # The skip decision is taken on the device, from per-layer norms made there.
            layer_names = tuple(norms.layout.layer_names)
            parts = [norms.device_layer_norms()]
            skip_flag = self._device_skip_flag(layer_names, parts[0][:-1])
            skip_flag = self._max_over_ranks(trainer, skip_flag)
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
        bad = torch.zeros((), dtype=torch.bool, device=layers.device)
        if "nonfinite" in self._device_skips:
            bad = bad | ~torch.isfinite(layers).all()
        if "exploding" in self._device_skips:
            above = layers > self.rules.exploding_threshold
            if self.rules.exploding_patience > 1:
                streak = self._device_streaks.get(layer_names)
                streak = (streak if streak is not None else torch.zeros_like(layers)) + 1
                streak = streak * above
                self._device_streaks[layer_names] = streak
                above = streak >= self.rules.exploding_patience
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
            self._skip(trainer, pl_module, optimizer)

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

    def _judge_in_flight(self, trainer: pl.Trainer) -> None:
        in_flight, self._in_flight = self._in_flight, []
        for measured in in_flight:
            values = measured.copy.values() if measured.copy is not None else []
            norms = measured.norms
            if norms is not None:  # per-tensor norms: the layers' norms are made here, on the host
                if measured.copy is not None:
                    norms.set_host(values[: len(norms.layout)])
                    extra = values[len(norms.layout) :]
                else:
                    extra = values
                per_layer: dict[str, float] | None = norms.per_layer()[0]
            else:
                n = len(measured.layer_names)
                per_layer = dict(zip(measured.layer_names, values[:n])) if n else None
                extra = values[n + 1 :] if n else values
            skipped = bool(measured.has_skip_flag and extra.pop(0) > 0)
            overflow = bool(extra.pop(0) > 0) if measured.has_overflow else None
            events = None
            if per_layer is not None and not overflow:
                events = self.tracker.update(measured.step, per_layer, None)
                if not events and not measured.log_now and not skipped and overflow is None and not self._collective:
                    continue  # most steps: nothing flagged, skipped, logged or shared with other ranks
            counted = self.skipped_steps
            self._judge(
                trainer, measured.step, measured.log_now, overflow, per_layer, None, lambda s=skipped: s, events=events,
            )
            if skipped and self.skipped_steps == counted and not overflow:
                # The device flag is combined across ranks: another rank's gradients made every rank skip.
                self.skipped_steps += 1
                warn_health(
                    f"gradmon: the update of step {measured.step} was skipped: another rank found non-finite or "
                    "exploding gradients."
                )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._in_flight:
            self._judge_in_flight(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handles in self._hooked.values():
            for handle in handles:
                handle.remove()
        self._hooked = {}

    def _count_overflow(self, step: int, trainer: pl.Trainer) -> None:
        self.amp_overflow_steps += 1
        self._overflow_run += 1
        scale = _amp_scale(trainer)
        if scale < AMP_SCALE_FLOOR and not self._overflow_warned:
            self._overflow_warned = True
            warn_health(
                f"gradmon: the fp16 GradScaler skipped step {step} for overflowing gradients with its scale already "
                f"down to {scale:.3g} ({self._overflow_run} overflows in a row, {self.amp_overflow_steps} in all): "
                "the gradients are non-finite or beyond fp16's range even unscaled, and every step is being skipped. "
                "Look for a NaN or inf in the loss or the forward pass (a log or division of zero, an overflowing "
                "exp), or train with bf16-mixed."
            )

    def _share(self, trainer: pl.Trainer, events: list[HealthEvent]) -> list[HealthEvent]:
        """Every rank's events of the step, on every rank (:func:`gradmon.callbacks._ranks.share_events`): in the
        default mode over the default group; in sync-free mode over a host (gloo) group."""
        if self.sync_free or dist.get_backend() == "gloo":
            device = torch.device("cpu")
        else:
            device = trainer.strategy.root_device
        return _ranks.share_events(events, self._group, device)

    def _record(self, step: int, events: list[HealthEvent], flagged: set[str]) -> None:
        room = self.max_events - len(self.events)
        if room > 0:
            self.events.extend(events[:room])
        for e in events:
            self._layer_counts[e.condition][e.layer] += 1
        for c in flagged:
            self.flagged_steps[c] += 1
            self._first_step.setdefault(c, step)

    def _act(self, trainer: pl.Trainer, step: int, flagged: set[str], events: list[HealthEvent], skip: Any) -> None:
        events_of = {c: [e for e in events if e.condition == c] for c in flagged}
        by_severity = [c for c in BY_SEVERITY if c in flagged]
        raising = [c for c in by_severity if self.actions[c] == "raise"]
        if raising:
            raise GradientHealthError("\n".join(_describe(c, step, events_of[c]) for c in raising))
        skipped = None
        if any(self.actions[c] == "skip" for c in by_severity):
            skipped = skip()
            self.skipped_steps += int(skipped)
        for c in by_severity:
            if self.actions[c] in ("warn", "skip", "stop"):
                self._warn(trainer, c, step, events_of[c], skipped)
        if any(self.actions[c] == "stop" for c in by_severity):
            trainer.should_stop = True

    def _skip(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        """Discard the step's update: every gradient of the optimizer set to ``None`` (optimizers leave such
        parameters, and their state, alone). A GradNormMonitor listed after this callback takes its numbers of the
        step first, so what it logs does not depend on the order of the callbacks."""
        for callback in trainer.callbacks:
            if isinstance(callback, GradNormMonitor):
                callback.on_before_optimizer_step(trainer, pl_module, optimizer)
        optimizer.zero_grad(set_to_none=True)

    def _warn(
        self,
        trainer: pl.Trainer,
        condition: str,
        step: int,
        events: list[HealthEvent],
        skipped: bool | None = None,
    ) -> None:
        last = self._last_report.get(condition)
        if last is not None and step - last < self.warn_every_n_steps:
            self._unreported[condition] += 1
            return
        self._last_report[condition] = step
        message = _describe(condition, step, events)
        action = self.actions[condition]
        if action == "skip":
            if skipped:
                message += " The step's update was skipped."
            else:  # sync-free: only the absolute threshold and non-finite values are judged before the step
                message += " The step's update was not skipped (this rule is judged a step later in sync-free mode)."
        elif action == "stop":
            message += " Stopping the run."
        suppressed = self._unreported.pop(condition, 0)
        if suppressed:
            message += f" ({suppressed} more {condition} steps since the last report.)"
        if self.diagnose and events:
            cause = diagnosis_board(trainer).explain(trainer, condition, self._exploding_before(step))
            message += f" {cause[0].upper()}{cause[1:]}." if cause else f" {NO_CAUSE[0].upper()}{NO_CAUSE[1:]}."
        warn_health(message)

    def _exploding_before(self, step: int) -> list[tuple[int, float]]:
        """(step, norm) of the exploding layers flagged before ``step``: spikes the diagnosis can point back to."""
        return [(e.step, e.value) for e in self.events if e.condition == "exploding" and e.step < step]

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.summary:
            return
        lines = []
        if self.flagged_steps or self.skipped_steps or self._overflow_warned:
            lines.append(self.summary_table())
            if self.diagnose:
                lines += self._verdict_lines(trainer)
        if self.tracker.cancelled:
            lines.append(self.cancelled_note())
        if lines:
            rank_zero_info("\n".join(lines))

    def _verdict_lines(self, trainer: pl.Trainer) -> list[str]:
        """Per flagged condition, the run's verdict when it explains it (the root cause found when it first showed,
        not the latest step's), else that no cause was established; conditions with the same line share it."""
        diagnosis = diagnosis_board(trainer).diagnosis
        by_line: dict[str, list[str]] = {}
        for c in CONDITIONS:
            if self._layer_counts[c]:
                line = diagnosis.explain(c) or NO_CAUSE
                by_line.setdefault(line, []).append(c)
        return [f"{', '.join(conditions)}: {line}" for line, conditions in by_line.items()]

    def cancelled_note(self) -> str:
        """One line on the parameters the sibling rule spared (``sibling_ratio``, with ``group_by="parameter"``):
        printed at the end of fit, after the summary table when there is one."""
        cancelled = self.tracker.cancelled
        named = ", ".join(f"{name} (from step {step})" for name, step in list(cancelled.items())[:_MAX_NAMED])
        more = f" and {len(cancelled) - _MAX_NAMED} more" if len(cancelled) > _MAX_NAMED else ""
        factor = f"{1 / self.rules.sibling_ratio:g}" if self.rules.sibling_ratio else "many"
        return (
            f"gradmon: not judged vanishing: {named}{more}. Their gradients are over {factor}x below another "
            "parameter of their layer: cancelled by construction, as for a bias followed by a BatchNorm, which "
            "subtracts the batch mean (such a bias has no effect; bias=False drops it), or at an optimum; not "
            "starved through depth."
        )

    def summary_table(self) -> str:
        """Per condition: steps flagged, first step, the layers flagged most often; and skipped steps."""
        rows = []
        for c in CONDITIONS:
            if self.flagged_steps[c]:
                top = ", ".join(f"{layer} ({n})" for layer, n in self._layer_counts[c].most_common(3))
                rows.append((c, self.flagged_steps[c], self._first_step[c], top or "(on another rank)"))
        header = ("condition", "steps", "first step", "layers (times flagged)")
        lines = ["GradHealthMonitor summary", markdown_table(header, rows), f"skipped steps: {self.skipped_steps}"]
        if self.amp_overflow_steps:
            lines.append(f"steps the GradScaler skipped for overflow (not flagged): {self.amp_overflow_steps}")
        return "\n".join(lines)

    def state_dict(self) -> dict[str, Any]:
        return {
            "tracker": self.tracker.state_dict(),
            "skipped_steps": self.skipped_steps,
            "amp_overflow_steps": self.amp_overflow_steps,
            "optimizer_steps": self._steps.state_dict(),
            "flagged_steps": dict(self.flagged_steps),
            "first_step": dict(self._first_step),
            "layer_counts": {c: dict(n) for c, n in self._layer_counts.items()},
            "last_report": dict(self._last_report),
            "events": [asdict(e) for e in self.events[-EVENTS_IN_CHECKPOINT:]],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state_dict["tracker"])
        self.skipped_steps = int(state_dict["skipped_steps"])
        self.amp_overflow_steps = int(state_dict.get("amp_overflow_steps", 0))
        self._steps.load_state_dict(state_dict.get("optimizer_steps", {}))
        self.flagged_steps = Counter(state_dict["flagged_steps"])
        self._first_step = dict(state_dict["first_step"])
        self._layer_counts = {c: Counter(state_dict["layer_counts"].get(c, {})) for c in CONDITIONS}
        self._last_report = dict(state_dict["last_report"])
        self.events = [HealthEvent(**e) for e in state_dict["events"]]


#: What a warning and the summary say when the diagnosis established no cause.
NO_CAUSE = "no cause established from the weights, gradients and activations measured so far"


def _describe(condition: str, step: int, events: list[HealthEvent]) -> str:
    if not events:
        return f"gradmon: {condition} gradients at step {step} (found on another rank)."
    named = ", ".join(f"{e.layer} (norm {e.value:.3g}, {e.rule} rule)" for e in events[:_MAX_NAMED])
    more = f" and {len(events) - _MAX_NAMED} more" if len(events) > _MAX_NAMED else ""
    ranks = sorted({e.rank for e in events if e.rank is not None})
    # A fault found by some ranks only (written into one rank's gradients after DDP's all-reduce): say where.
    where = f" on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}" if ranks else ""
    if condition == "nonfinite":
        return (f"gradmon: non-finite gradients at step {step}{where}, first in layer {events[0].layer}; "
                f"layers: {named}{more}.")
    return f"gradmon: {condition} gradients at step {step}{where} in {len(events)} layer(s): {named}{more}."



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


def _amp_overflow_on_device(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
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


def _amp_overflow(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> bool | None:
    """:func:`_amp_overflow_on_device`, read on the host."""
    flag = _amp_overflow_on_device(trainer, optimizer)
    return None if flag is None else read_host(flag.reshape(1))[0] > 0


def _amp_scale(trainer: pl.Trainer) -> float:
    scaler = enabled_scaler(trainer)
    return float(scaler.get_scale()) if scaler is not None else float("nan")
