"""GradHealthMonitor: flag vanishing, exploding and non-finite gradients per layer, and act on them."""

from __future__ import annotations

from functools import cached_property
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from gradmon import tags
from gradmon._validation import check_bool, check_choice, check_int, check_norm_type
from gradmon.callbacks import _logging, _ranks
from gradmon.callbacks._diagnosis import diagnosis_board
from gradmon.callbacks._grad_source import GradNormSource
from gradmon.callbacks._health_judge import AMP_SCALE_FLOOR, MAX_NAMED, NO_CAUSE, HealthJudge
from gradmon.callbacks._health_ledger import EVENTS_IN_CHECKPOINT, HealthLedger
from gradmon.callbacks._health_modes import HealthMode, Immediate, SyncFree
from gradmon.callbacks._schedule import Every, OptimizerSteps
from gradmon.callbacks._shared import shared_board
from gradmon.health import (
    ACTIONS,
    CONDITIONS,
    VANISHING_ACTIONS,
    Action,
    Condition,
    HealthEvent,
    HealthRules,
    HealthTracker,
)
from gradmon.norms import GroupBy

__all__ = ["AMP_SCALE_FLOOR", "EVENTS_IN_CHECKPOINT", "GradHealthMonitor", "HealthLedger"]


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
      occurrence of each condition is always reported, later ones at most every ``warn_every_n_steps`` optimizer steps
      (of the optimizer whose step it is).
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

    Logged (to ``trainer.loggers``, rank 0) every ``log_every_n_steps`` optimizer steps (each optimizer's steps 0, n,
    2n, ...) and at every step with a flag, at
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
        log_every_n_steps: log the counts every this many optimizer steps, counted per optimizer (and at every
            flagged step); None takes the Trainer's ``log_every_n_steps``.
        warn_every_n_steps: at most one warning per condition every this many optimizer steps, counted per
            optimizer (each optimizer's first is always issued).
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
        actions: dict[Condition, str] = {
            "vanishing": check_choice("on_vanishing", on_vanishing, VANISHING_ACTIONS),
            "exploding": check_choice("on_exploding", on_exploding, ACTIONS),
            "nonfinite": check_choice("on_nonfinite", on_nonfinite, ACTIONS),
        }
        self.actions = actions
        self.norm_type = check_norm_type("norm_type", norm_type)
        self.group_by: GroupBy = check_choice("group_by", group_by, ("layer", "parameter"))
        self._every = Every("log_every_n_steps", log_every_n_steps)
        self.log_every_n_steps = self._every.n
        self.warn_every_n_steps = check_int("warn_every_n_steps", warn_every_n_steps, 1)
        self.max_events = check_int("max_events", max_events, 0)
        self.summary = check_bool("summary", summary)
        self.sync_free = check_bool("sync_free", sync_free)
        self.diagnose = check_bool("diagnose", diagnose)
        self._judge = HealthJudge(
            self.rules, self.group_by, actions, self.warn_every_n_steps, self.max_events, self.diagnose
        )
        # Conditions the device itself must skip in sync-free mode (before optimizer.step, without a host read).
        self._device_skips = {c for c in ("nonfinite", "exploding") if actions[c] == "skip"}
        self._mode: HealthMode = (
            SyncFree(self._judge, self._device_skips) if self.sync_free else Immediate(self._judge)
        )
        self._own_source = GradNormSource(self.norm_type, self.group_by)
        self._steps = OptimizerSteps()

    # --- what the fit found ------------------------------------------------------------------------------------------

    @property
    def tracker(self) -> HealthTracker:
        """The rules' :class:`~gradmon.health.HealthTracker`: each layer's running history and patience counts."""
        return self._judge.tracker

    @property
    def ledger(self) -> HealthLedger:
        """Events and counts of the fit (:class:`~gradmon.callbacks._health_ledger.HealthLedger`)."""
        return self._judge.ledger

    @property
    def events(self) -> list[HealthEvent]:
        """A :class:`~gradmon.health.HealthEvent` for every flag (the first ``max_events``)."""
        return self._judge.ledger.events

    @property
    def flagged_steps(self) -> dict[str, int]:
        """Steps flagged per condition (a ``Counter``)."""
        return self._judge.ledger.flagged_steps

    @property
    def skipped_steps(self) -> int:
        """Steps whose update was discarded."""
        return self._judge.ledger.skipped_steps

    @property
    def amp_overflow_steps(self) -> int:
        """Steps a GradScaler skipped because its scaled gradients overflowed (fp16)."""
        return self._judge.ledger.amp_overflow_steps

    @property
    def first_flagged_steps(self) -> dict[str, int]:
        """The first step each condition was flagged at (only the conditions flagged so far)."""
        return dict(self._judge.ledger.first_step)

    # --- the fit -----------------------------------------------------------------------------------------------------

    @cached_property  # Lightning reads it around every hook call
    def state_key(self) -> str:
        # Thresholds are settings, not part of the identity: a resume with new thresholds keeps the history.
        return self._generate_state_key(norm_type=self.norm_type, group_by=self.group_by)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning calls setup before it restores callback state, so a resumed fit gets its history back and a
        # fresh fit of the same instance starts clean.
        if stage == "fit":
            self._judge.reset()
            self._steps.reset()
            diagnosis_board(trainer).join(self)
            shared_board(trainer).join(self)
            _ranks.check_at_setup(trainer, self)
            self._mode.setup(trainer)

    def _ranks_signature(self) -> str:
        """What must be the same on every rank for the collectives to line up (thresholds may differ)."""
        return f"GradHealthMonitor(sync_free={self.sync_free}, device_skips={sorted(self._device_skips)})"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.diagnose:
            diagnosis_board(trainer).start(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._every.start(trainer)
        # A GradNormMonitor with the same settings on the Trainer offers its norms: computed once per step for both.
        source = shared_board(trainer).norm_source(self.norm_type, self.group_by)
        if source is None:
            source = self._own_source
            source.reset(trainer)
        self._mode.start(trainer, source)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        index, count = self._steps.advance(trainer, optimizer, step)
        self._judge.count_step(step, index, count)
        self._mode.before_optimizer_step(trainer, pl_module, optimizer, step, self._every.due(count))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._mode.finish(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._mode.teardown()

    # --- the summary -------------------------------------------------------------------------------------------------

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.events:
            latest = self.events[-EVENTS_IN_CHECKPOINT:]
            rows = [[e.step, e.layer, e.condition, e.value, e.rule, e.rank] for e in latest]
            columns = ["step", "layer", "condition", "norm", "rule", "rank"]
            _logging.log_table(trainer, tags.WANDB_HEALTH_EVENTS, columns, rows, trainer.global_step)
        if not self.summary:
            return
        lines = []
        if self.flagged_steps or self.skipped_steps or self._judge.overflow_warned:
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
            if self.ledger.layer_counts[c]:
                line = diagnosis.explain(c) or NO_CAUSE
                by_line.setdefault(line, []).append(c)
        return [f"{', '.join(conditions)}: {line}" for line, conditions in by_line.items()]

    def cancelled_note(self) -> str:
        """One line on the parameters the sibling rule spared (``sibling_ratio``, with ``group_by="parameter"``):
        printed at the end of fit, after the summary table when there is one."""
        cancelled = self.tracker.cancelled
        named = ", ".join(f"{name} (from step {step})" for name, step in list(cancelled.items())[:MAX_NAMED])
        more = f" and {len(cancelled) - MAX_NAMED} more" if len(cancelled) > MAX_NAMED else ""
        factor = f"{1 / self.rules.sibling_ratio:g}" if self.rules.sibling_ratio else "many"
        return (
            f"gradmon: not judged vanishing: {named}{more}. Their gradients are over {factor}x below another "
            "parameter of their layer: cancelled by construction, as for a bias followed by a BatchNorm, which "
            "subtracts the batch mean (such a bias has no effect; bias=False drops it), or at an optimum; not "
            "starved through depth."
        )

    def summary_table(self) -> str:
        """Per condition: steps flagged, first step, the layers flagged most often; and skipped steps."""
        return self.ledger.summary_table()

    # --- checkpoints -------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {**self._judge.state_dict(), "optimizer_steps": self._steps.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._judge.load_state_dict(state_dict)
        self._steps.load_state_dict(state_dict.get("optimizer_steps", {}))
