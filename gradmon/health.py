"""Health rules: classify each layer's gradient norm as vanishing, exploding, non-finite or healthy.

Pure Python over the per-layer norms of one step (already on the host), so the rules cost microseconds and can be
used from a plain PyTorch loop::

    tracker = HealthTracker(HealthRules())
    events = tracker.update(step, {"net.0": 3e-9, "net.2": 0.4})

This module never imports Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from gradmon._validation import check_float, check_int

Condition = Literal["vanishing", "exploding", "nonfinite"]
CONDITIONS: tuple[Condition, ...] = ("vanishing", "exploding", "nonfinite")
# Norms at or below this count as this for the log-scale rules, so a dead (all-zero) layer compares as tiny.
_TINY = 1e-45


@dataclass(frozen=True)
class HealthRules:
    """Thresholds of the health rules. Defaults and the reasons for them:

    - ``vanishing_threshold=1e-7``: a per-layer gradient norm below this moves weights by nothing measurable in float32
      at any usual learning rate (an update of lr * 1e-7 is below float32's resolution for weights of order 1e-2..1).
    - ``exploding_threshold=1e4``: with normalised inputs and a mean-reduced loss, healthy per-layer norms sit within
      a few orders of magnitude of 1; 1e4 leaves room for unusual losses while a deep ReLU net initialised N(0, 1)
      (norms of 1e6 and up) is caught at its first step. Raise it for losses with very large targets.
    - ``spike_factor=100`` after ``warmup_steps=20``: a layer whose norm jumps 100x above its own running
      (geometric) mean within one step is exploding whatever the loss's scale; ordinary training noise stays within
      about 10x, and the first steps of training, where norms legitimately move fast, are excluded.
      ``history_decay=0.9`` gives the running mean a memory of about ten steps.
    - ``depth_ratio=1e-3`` with ``depth_window=2``: when the geometric mean of the first two layers' norms is a
      thousand times below that of the last two, gradients are dying on their way back through depth (a sigmoid MLP
      with PyTorch's default init loses about 8x per layer); every non-final layer that far below the last ones is
      flagged. Layer-to-layer variation in a healthy (e.g. kaiming-initialised ReLU) net stays within about 10x.
      Needs at least ``depth_min_layers=4`` layers.
    - ``vanishing_patience=10``: vanishing does no harm in one step; ten consecutive steps rule out a passing dip.
    - ``exploding_patience=1``: an explosion usually turns into NaN weights within a step or two, so it is flagged at
      once, which is what lets a ``"skip"`` action protect the weights. Non-finite is always flagged at once.

    A rule set to ``None`` (``spike_factor``, ``depth_ratio``) is off.
    """

    vanishing_threshold: float = 1e-7
    exploding_threshold: float = 1e4
    spike_factor: float | None = 100.0
    warmup_steps: int = 20
    history_decay: float = 0.9
    depth_ratio: float | None = 1e-3
    depth_window: int = 2
    depth_min_layers: int = 4
    vanishing_patience: int = 10
    exploding_patience: int = 1

    def __post_init__(self) -> None:
        check_float("vanishing_threshold", self.vanishing_threshold, minimum=0.0, inclusive=True)
        check_float("exploding_threshold", self.exploding_threshold, minimum=0.0, allow_inf=True)
        if self.vanishing_threshold >= self.exploding_threshold:
            raise ValueError(
                f"`vanishing_threshold={self.vanishing_threshold!r}` is not valid: expected a value below "
                f"`exploding_threshold={self.exploding_threshold!r}`."
            )
        check_float("spike_factor", self.spike_factor, minimum=1.0, allow_none=True)
        check_int("warmup_steps", self.warmup_steps, 0)
        check_float("history_decay", self.history_decay, minimum=0.0, inclusive=True)
        if self.history_decay >= 1.0:
            raise ValueError(f"`history_decay={self.history_decay!r}` is not valid: expected a number in [0, 1).")
        if self.depth_ratio is not None:
            check_float("depth_ratio", self.depth_ratio, minimum=0.0)
            if self.depth_ratio >= 1.0:
                raise ValueError(f"`depth_ratio={self.depth_ratio!r}` is not valid: expected a number in (0, 1) or None.")
        check_int("depth_window", self.depth_window, 1)
        check_int("depth_min_layers", self.depth_min_layers, 2)
        if self.depth_min_layers < 2 * self.depth_window:
            raise ValueError(
                f"`depth_min_layers={self.depth_min_layers!r}` is not valid: expected at least "
                f"2 * depth_window = {2 * self.depth_window}."
            )
        check_int("vanishing_patience", self.vanishing_patience, 1)
        check_int("exploding_patience", self.exploding_patience, 1)


@dataclass(frozen=True)
class HealthEvent:
    """One layer flagged at one step. ``rule`` says which rule fired: ``threshold``, ``spike``, ``depth``,
    ``nonfinite``; ``value`` is the layer's gradient norm at that step."""

    step: int
    layer: str
    condition: Condition
    value: float
    rule: str


class HealthTracker:
    """Applies :class:`HealthRules` step by step, keeping each layer's running history and patience counts."""

    def __init__(self, rules: HealthRules | None = None) -> None:
        self.rules = rules or HealthRules()
        self._mean_log: dict[str, float] = {}  # running mean of log(norm) per layer
        self._seen: dict[str, int] = {}  # finite observations per layer
        self._streak: dict[tuple[str, str], int] = {}  # consecutive steps in a condition, per (layer, condition)

    def update(
        self,
        step: int,
        norms: Mapping[str, float],
        confirm_nonfinite: Callable[[str], bool] | None = None,
    ) -> list[HealthEvent]:
        """Classify one step's per-layer norms (in the model's registration order) and return what is flagged.

        Non-finite layers come first, in registration order. ``confirm_nonfinite(layer)`` is asked only for layers
        whose norm is inf, to tell a gradient holding inf from a finite one whose norm overflowed (that one is
        exploding).
        """
        rules = self.rules
        candidates: dict[str, tuple[Condition, str]] = {}
        nonfinite: list[HealthEvent] = []
        for layer, value in norms.items():
            if math.isnan(value) or (math.isinf(value) and (confirm_nonfinite is None or confirm_nonfinite(layer))):
                nonfinite.append(HealthEvent(step, layer, "nonfinite", value, "nonfinite"))
            elif value > rules.exploding_threshold:
                candidates[layer] = ("exploding", "threshold")
            elif rules.spike_factor is not None and self._seen.get(layer, 0) >= rules.warmup_steps and (
                math.log(max(value, _TINY)) > self._mean_log[layer] + math.log(rules.spike_factor)
            ):
                candidates[layer] = ("exploding", "spike")
            elif value < rules.vanishing_threshold:
                candidates[layer] = ("vanishing", "threshold")
        for layer in self._depth_starved(norms):
            candidates.setdefault(layer, ("vanishing", "depth"))

        events = list(nonfinite)
        for layer, value in norms.items():
            for condition in ("vanishing", "exploding"):
                key = (layer, condition)
                if layer in candidates and candidates[layer][0] == condition:
                    self._streak[key] = self._streak.get(key, 0) + 1
                    patience = rules.vanishing_patience if condition == "vanishing" else rules.exploding_patience
                    if self._streak[key] >= patience:
                        events.append(HealthEvent(step, layer, condition, value, candidates[layer][1]))
                else:
                    self._streak.pop(key, None)
            if math.isfinite(value):
                self._observe(layer, value)
        return events

    def _depth_starved(self, norms: Mapping[str, float]) -> list[str]:
        """Layers, other than the last ``depth_window``, far below the last ones when the first ones are."""
        rules = self.rules
        values = [v for v in norms.values() if math.isfinite(v)]
        if rules.depth_ratio is None or len(values) != len(norms) or len(values) < rules.depth_min_layers:
            return []
        k = rules.depth_window
        logs = [math.log(max(v, _TINY)) for v in values]
        last = sum(logs[-k:]) / k
        bound = last + math.log(rules.depth_ratio)
        if sum(logs[:k]) / k >= bound:
            return []
        names = list(norms)
        return [names[i] for i in range(len(names) - k) if logs[i] < bound]

    def _observe(self, layer: str, value: float) -> None:
        log_value = math.log(max(value, _TINY))
        seen = self._seen.get(layer, 0)
        if seen == 0:
            self._mean_log[layer] = log_value
        else:
            decay = self.rules.history_decay
            self._mean_log[layer] = decay * self._mean_log[layer] + (1.0 - decay) * log_value
        self._seen[layer] = seen + 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "rules": asdict(self.rules),
            "mean_log": dict(self._mean_log),
            "seen": dict(self._seen),
            "streak": [[layer, condition, n] for (layer, condition), n in self._streak.items()],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._mean_log = dict(state["mean_log"])
        self._seen = dict(state["seen"])
        self._streak = {(layer, condition): n for layer, condition, n in state["streak"]}
