"""GradHealthMonitor's judging, the same in every execution mode: one step's events (already found by the rules and
shared across ranks) are recorded in the ledger, acted on, warned about and logged."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl

from gradmon import tags
from gradmon.callbacks import _logging
from gradmon.callbacks._diagnosis import diagnosis_board
from gradmon.callbacks._grad_source import enabled_scaler
from gradmon.callbacks._health_ledger import HealthLedger
from gradmon.errors import GradientHealthError, warn_health
from gradmon.health import BY_SEVERITY, CONDITIONS, Condition, HealthEvent, HealthRules, HealthTracker
from gradmon.naming import GroupBy

#: How many layers a warning or note names before "and N more".
MAX_NAMED = 5
#: A GradScaler whose scale is below this when it overflows again is shrinking the loss, not just fitting it to fp16:
#: the gradients overflow unscaled, or are NaN/inf at any scale. Healthy runs overflow only at scales far above 1
#: (routinely at the start, from the default 65536 or a larger ``init_scale``, and when the scale grows again).
AMP_SCALE_FLOOR = 1.0
#: What a warning and the summary say when the diagnosis established no cause.
NO_CAUSE = "no cause established from the weights, gradients and activations measured so far"
#: Discards a step's update if it still can and says whether it was discarded.
Skip = Callable[[], bool]


class HealthJudge:
    """The rules' tracker, the ledger, and what is done about a flagged step: act (raise, skip, warn, stop), warn at
    most every ``warn_every_n_steps`` per condition and optimizer (on that optimizer's own steps, as the schedules
    count them: :mod:`gradmon.callbacks._schedule`), and log the step's counts."""

    def __init__(
        self,
        rules: HealthRules,
        group_by: GroupBy,
        actions: dict[Condition, str],
        warn_every_n_steps: int,
        max_events: int,
        diagnose: bool,
    ) -> None:
        self.rules, self.group_by, self.actions = rules, group_by, actions
        self.warn_every_n_steps, self.max_events, self.diagnose = warn_every_n_steps, max_events, diagnose
        self.reset()

    def reset(self) -> None:
        self.tracker = HealthTracker(self.rules, self.group_by)
        self.ledger = HealthLedger(self.max_events)
        #: The optimizer step count of the latest warning, per condition (``"<condition>-<i>"`` for the optimizer of
        #: index i > 0).
        self.last_report: dict[str, int] = {}
        self._counts: dict[int, tuple[int, int]] = {}
        self._unreported: Counter[str] = Counter()
        self._overflow_run = 0
        self.overflow_warned = False

    def count_step(self, step: int, index: int, count: int) -> None:
        """Note that global step ``step`` is step ``count`` of the optimizer of index ``index``; kept for the few
        steps a judgement may come late (sync-free mode judges a step later)."""
        counts = self._counts
        counts[step] = (index, count)
        if len(counts) > 8:
            del counts[next(iter(counts))]

    def judge(
        self,
        trainer: pl.Trainer,
        step: int,
        log_now: bool,
        overflow: bool | None,
        events: list[HealthEvent],
        skip: Skip,
    ) -> None:
        """Record, act on and log one step's ``events``. ``overflow``: whether a GradScaler skipped the step for
        overflowing (``None``: no scaler); such a step's gradients are not the model's and have no events."""
        if overflow:
            self._count_overflow(step, trainer)
        elif overflow is not None:
            self._overflow_run = 0
        flagged = {e.condition for e in events}
        if flagged:
            self.ledger.record(step, events, flagged)
            self._act(trainer, step, flagged, events, skip)
        if (flagged or log_now) and trainer.is_global_zero and trainer.loggers:
            self._log(trainer, step, overflow, events)

    def _log(self, trainer: pl.Trainer, step: int, overflow: bool | None, events: list[HealthEvent]) -> None:
        counts = {tags.health_count(c): float(sum(e.condition == c for e in events)) for c in CONDITIONS}
        counts[tags.tag(tags.GRAD_HEALTH, tags.SKIPPED_STEPS)] = float(self.ledger.skipped_steps)
        if overflow is not None:
            counts[tags.tag(tags.GRAD_HEALTH, tags.AMP_OVERFLOW_STEPS)] = float(self.ledger.amp_overflow_steps)
        # Which layers, so that `gradmon report` can mark them: the most severe condition of each layer.
        for e in reversed(events):
            counts[tags.tag(tags.GRAD_HEALTH_FLAG, e.layer)] = float(1 + CONDITIONS.index(e.condition))
        _logging.log_scalars(trainer, counts, step)

    def _count_overflow(self, step: int, trainer: pl.Trainer) -> None:
        ledger = self.ledger
        ledger.amp_overflow_steps += 1
        self._overflow_run += 1
        scaler = enabled_scaler(trainer)
        scale = float(scaler.get_scale()) if scaler is not None else float("nan")
        if scale < AMP_SCALE_FLOOR and not self.overflow_warned:
            self.overflow_warned = True
            warn_health(
                f"gradmon: the fp16 GradScaler skipped step {step} for overflowing gradients with its scale already "
                f"down to {scale:.3g} ({self._overflow_run} overflows in a row, {ledger.amp_overflow_steps} in all): "
                "the gradients are non-finite or beyond fp16's range even unscaled, and every step is being skipped. "
                "Look for a NaN or inf in the loss or the forward pass (a log or division of zero, an overflowing "
                "exp), or train with bf16-mixed."
            )

    def _act(self, trainer: pl.Trainer, step: int, flagged: set[str], events: list[HealthEvent], skip: Skip) -> None:
        events_of = {c: [e for e in events if e.condition == c] for c in flagged}
        by_severity = [c for c in BY_SEVERITY if c in flagged]
        raising = [c for c in by_severity if self.actions[c] == "raise"]
        if raising:
            raise GradientHealthError("\n".join(describe(c, step, events_of[c]) for c in raising))
        skipped = None
        if any(self.actions[c] == "skip" for c in by_severity):
            skipped = skip()
            self.ledger.skipped_steps += int(skipped)
        for c in by_severity:
            if self.actions[c] in ("warn", "skip", "stop"):
                self._warn(trainer, c, step, events_of[c], skipped)
        if any(self.actions[c] == "stop" for c in by_severity):
            trainer.should_stop = True

    def _warn(
        self, trainer: pl.Trainer, condition: str, step: int, events: list[HealthEvent], skipped: bool | None
    ) -> None:
        index, count = self._counts.get(step, (0, step))
        key = condition if index == 0 else f"{condition}-{index}"
        last = self.last_report.get(key)
        if last is not None and count - last < self.warn_every_n_steps:
            self._unreported[condition] += 1
            return
        self.last_report[key] = count
        message = describe(condition, step, events)
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
            cause = diagnosis_board(trainer).explain(trainer, condition, self.ledger.exploding_before(step))
            message += f" {cause[0].upper()}{cause[1:]}." if cause else f" {NO_CAUSE[0].upper()}{NO_CAUSE[1:]}."
        warn_health(message)

    def state_dict(self) -> dict[str, Any]:
        return {"tracker": self.tracker.state_dict(), "last_report": dict(self.last_report), **self.ledger.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state_dict["tracker"])
        self.last_report = dict(state_dict["last_report"])
        self.ledger.load_state_dict(state_dict)


def describe(condition: str, step: int, events: list[HealthEvent]) -> str:
    if not events:
        return f"gradmon: {condition} gradients at step {step} (found on another rank)."
    named = ", ".join(f"{e.layer} (norm {e.value:.3g}, {e.rule} rule)" for e in events[:MAX_NAMED])
    more = f" and {len(events) - MAX_NAMED} more" if len(events) > MAX_NAMED else ""
    ranks = sorted({e.rank for e in events if e.rank is not None})
    # A fault found by some ranks only (written into one rank's gradients after DDP's all-reduce): say where.
    where = f" on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}" if ranks else ""
    if condition == "nonfinite":
        return (f"gradmon: non-finite gradients at step {step}{where}, first in layer {events[0].layer}; "
                f"layers: {named}{more}.")
    return f"gradmon: {condition} gradients at step {step}{where} in {len(events)} layer(s): {named}{more}."
