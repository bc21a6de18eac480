"""Health rules: classify each layer's gradient norm as vanishing, exploding, non-finite or healthy.

Pure Python over the per-layer norms of one step (already on the host), so the rules cost little and can be used
from a plain PyTorch loop::

    tracker = HealthTracker(HealthRules())
    events = tracker.update(step, {"net.0": 3e-9, "net.2": 0.4})

This module never imports Lightning.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass, fields
from itertools import repeat
from typing import Any, Literal, get_args

from gradmon._validation import check_choice, check_float, check_int, invalid
from gradmon.naming import GroupBy, layer_name

Condition = Literal["vanishing", "exploding", "nonfinite"]
#: The conditions in the order they are logged and tabulated.
CONDITIONS: tuple[Condition, ...] = get_args(Condition)
#: The conditions from the most severe, the order in which they are reported and acted on.
BY_SEVERITY: tuple[Condition, ...] = ("nonfinite", "exploding", "vanishing")

Action = Literal["ignore", "warn", "skip", "stop", "raise"]
#: What a monitor can do about a condition.
ACTIONS: tuple[Action, ...] = get_args(Action)
#: Actions for vanishing gradients: skipping a step does not help a gradient that is too small.
VANISHING_ACTIONS: tuple[Action, ...] = tuple(a for a in ACTIONS if a != "skip")
#: Actions that change the run, so every rank must take them together.
COLLECTIVE_ACTIONS: tuple[Action, ...] = ("skip", "stop", "raise")
# Norms at or below this count as this for the log-scale rules, so a dead (all-zero) layer compares as tiny.
_TINY = 1e-45
_LOG_TINY = math.log(_TINY)
_OTHER = {"vanishing": "exploding", "exploding": "vanishing"}
_NONE: frozenset[str] = frozenset()


def _log(value: float) -> float:
    return math.log(value) if value > _TINY else _LOG_TINY


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
      about 10x, and the first steps of training, where norms legitimately move fast, are excluded. A layer whose
      running mean is below ``vanishing_threshold`` is not judged by it: climbing out of vanishing (or out of an
      all-zero gradient) is not an explosion.
      ``history_decay=0.9`` gives the running mean a memory of about ten steps.
    - ``depth_ratio=1e-3`` with ``depth_window=2``: when the geometric mean of the first two layers' norms is a
      thousand times below that of the last two, gradients are dying on their way back through depth (a sigmoid MLP
      with PyTorch's default init loses about 8x per layer); every non-final layer that far below the last ones is
      flagged. Layer-to-layer variation in a healthy (e.g. kaiming-initialised ReLU) net stays within about 10x.
      Needs at least ``depth_min_layers=4`` layers.
    - ``sibling_ratio=1e-2``, with ``group_by="parameter"`` only: a parameter whose norm is more than 100x below
      that of another parameter of its layer (one at or above ``vanishing_threshold``) is not judged vanishing by
      either rule (when the depth rule fires, it is judged again without such parameters in its windows). Gradients
      dying through depth shrink every parameter of a layer together (a weight and its bias stay about 4x apart in a
      sigmoid MLP); a gradient that far below its layer's is cancelled by construction or at its optimum. A bias
      followed by a normalization that subtracts the batch mean (``Linear`` or ``Conv2d`` then ``BatchNorm``) has an
      exact gradient of zero: rounding leaves it at 1e-8 to 1e-4 of its weight's in float32 and up to 5e-3 under
      bfloat16 autocast, while healthy biases' gradients typically lie at 0.015 to 3 times their weight's.
    - ``vanishing_patience=10``: vanishing does no harm in one step; ten consecutive steps rule out a passing dip.
    - ``exploding_patience=1``: an explosion usually turns into NaN weights within a step or two, so it is flagged at
      once, which is what lets a ``"skip"`` action protect the weights. Non-finite is always flagged at once.

    A rule set to ``None`` (``spike_factor``, ``depth_ratio``, ``sibling_ratio``) is off.
    """

    vanishing_threshold: float = 1e-7
    exploding_threshold: float = 1e4
    spike_factor: float | None = 100.0
    warmup_steps: int = 20
    history_decay: float = 0.9
    depth_ratio: float | None = 1e-3
    depth_window: int = 2
    depth_min_layers: int = 4
    sibling_ratio: float | None = 1e-2
    vanishing_patience: int = 10
    exploding_patience: int = 1

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The rules' field names (GradHealthMonitor takes them as one ``rules`` value, nested in a CLI config)."""
        return tuple(f.name for f in fields(cls))

    def __post_init__(self) -> None:
        check_float("vanishing_threshold", self.vanishing_threshold, minimum=0.0, inclusive=True)
        # Stored as a float: an int beyond any float (10**400) means no threshold, and must not overflow later.
        object.__setattr__(
            self, "exploding_threshold", check_float("exploding_threshold", self.exploding_threshold, allow_inf=True)
        )
        if self.vanishing_threshold >= self.exploding_threshold:
            below = f"a value below exploding_threshold={self.exploding_threshold!r}"
            raise invalid("vanishing_threshold", self.vanishing_threshold, below)
        check_float("spike_factor", self.spike_factor, minimum=1.0, allow_none=True)
        check_int("warmup_steps", self.warmup_steps, 0)
        check_float("history_decay", self.history_decay, minimum=0.0, inclusive=True, maximum=1.0, max_inclusive=False)
        check_float("depth_ratio", self.depth_ratio, minimum=0.0, maximum=1.0, max_inclusive=False, allow_none=True)
        check_int("depth_window", self.depth_window, 1)
        check_int("depth_min_layers", self.depth_min_layers, 2)
        if self.depth_min_layers < 2 * self.depth_window:
            both_windows = f"at least 2 * depth_window = {2 * self.depth_window}"
            raise invalid("depth_min_layers", self.depth_min_layers, both_windows)
        check_float("sibling_ratio", self.sibling_ratio, minimum=0.0, maximum=1.0, max_inclusive=False, allow_none=True)
        check_int("vanishing_patience", self.vanishing_patience, 1)
        check_int("exploding_patience", self.exploding_patience, 1)


@dataclass(frozen=True)
class HealthEvent:
    """One layer flagged at one step. ``rule`` says which rule fired: ``threshold``, ``spike``, ``depth``,
    ``nonfinite``; ``value`` is the layer's gradient norm at that step. ``rank`` is the rank that found it when not
    every rank did (a fault on one rank after DDP's all-reduce); ``None`` when every rank found it, or in a single
    process."""

    step: int
    layer: str
    condition: Condition
    value: float
    rule: str
    rank: int | None = None


class HealthTracker:
    """Applies :class:`HealthRules` step by step, keeping each layer's running history and patience counts.

    ``group_by="parameter"`` says the names given to :meth:`update` are parameters (``net.0.bias``), not layers:
    they belong to layers by :func:`gradmon.naming.layer_name`, and ``sibling_ratio`` applies. :attr:`cancelled`
    then names the parameters that rule spared (a vanishing rule would have flagged them), each with the first step.
    """

    def __init__(self, rules: HealthRules | None = None, group_by: GroupBy = "layer") -> None:
        self.group_by: GroupBy = check_choice("group_by", group_by, ("layer", "parameter"))
        if rules is None:
            rules = HealthRules()
        elif not isinstance(rules, HealthRules):
            hint = f" (pass HealthRules(**{rules!r}))" if isinstance(rules, Mapping) else ""
            raise TypeError(f"`rules={rules!r}` is not valid: expected a HealthRules instance or None{hint}.")
        self.rules = rules
        self._history: dict[str, list[Any]] = {}  # per layer: [running mean of log(norm), finite observations]
        self._streak: dict[tuple[str, str], int] = {}  # consecutive steps in a condition, per (layer, condition)
        #: Parameters the sibling rule spared (``sibling_ratio``), and the first step it did.
        self.cancelled: dict[str, int] = {}
        self._owners: dict[str, str] = {}  # parameter -> its layer, for the sibling rule
        self._owner_max: dict[str, float] | None = None  # per layer, this step's largest norm that is not vanishing

    @property
    def rules(self) -> HealthRules:
        return self._rules

    @rules.setter
    def rules(self, rules: HealthRules) -> None:
        """Also computes what the rules loop needs once per set of rules rather than at every step."""
        self._rules = rules
        self._spike = math.log(rules.spike_factor) if rules.spike_factor is not None else math.inf
        self._log_vanishing = math.log(rules.vanishing_threshold) if rules.vanishing_threshold > 0 else _LOG_TINY
        self._patience = {"vanishing": rules.vanishing_patience, "exploding": rules.exploding_patience}
        # A healthy norm lies in [vanishing_threshold, healthy_max]: finite and not above exploding_threshold.
        self._healthy_max = min(rules.exploding_threshold, sys.float_info.max)
        self._judged_from = max(rules.warmup_steps, 1)  # the spike rule needs a history of at least one step
        self._log_depth_ratio = math.log(rules.depth_ratio) if rules.depth_ratio is not None else 0.0
        self._sibling_ratio = rules.sibling_ratio if self.group_by == "parameter" else None

    def update(
        self,
        step: int,
        norms: Mapping[str, float],
        confirm_nonfinite: Callable[[str], bool] | None = None,
    ) -> list[HealthEvent]:
        """Classify one step's per-layer norms (in the model's registration order) and return what is flagged.

        Non-finite layers come first, then the others in registration order. ``confirm_nonfinite(layer)`` is asked
        only for layers whose norm is inf, to tell a gradient holding inf from a finite one whose norm overflowed
        (that one is exploding). Runs every step inside the training loop, so a healthy layer takes one short pass
        of float arithmetic; anything else takes :meth:`_classify`.
        """
        self._owner_max = None
        depth_starved = self._depth_starved(step, norms)
        history, streak = self._history, self._streak
        lowest, highest, spike, judged_from = (
            self._rules.vanishing_threshold, self._healthy_max, self._spike, self._judged_from
        )
        log_vanishing, decay = self._log_vanishing, self._rules.history_decay
        keep, log, tiny = 1.0 - decay, math.log, _TINY
        events: list[HealthEvent] = []
        for layer, value in norms.items():
            past = history.get(layer)
            if past is not None and lowest <= value <= highest:  # False for NaN
                mean, n = past
                log_value = log(value) if value > tiny else _LOG_TINY
                # Not a spike (before the warm-up, or climbing out of vanishing, or within spike_factor of the
                # running mean), and not starved through depth: healthy.
                if (n < judged_from or mean <= log_vanishing or log_value <= mean + spike) and (
                    not depth_starved or layer not in depth_starved
                ):
                    past[0] = decay * mean + keep * log_value
                    past[1] = n + 1
                    if streak:
                        streak.pop((layer, "vanishing"), None)
                        streak.pop((layer, "exploding"), None)
                    continue
            event = self._classify(step, layer, value, norms, depth_starved, confirm_nonfinite)
            if event is not None:
                events.append(event)
        if len(events) > 1:  # non-finite layers first, the rest in registration order
            events.sort(key=lambda e: e.condition != "nonfinite")
        return events

    def _classify(
        self,
        step: int,
        layer: str,
        value: float,
        norms: Mapping[str, float],
        depth_starved: Set[str],
        confirm_nonfinite: Callable[[str], bool] | None,
    ) -> HealthEvent | None:
        """One layer's norm that is not plainly healthy: update its history and streaks, and the event if flagged."""
        rules, streak = self._rules, self._streak
        if value != value or (value == math.inf and (confirm_nonfinite is None or confirm_nonfinite(layer))):
            streak.pop((layer, "vanishing"), None)
            streak.pop((layer, "exploding"), None)
            return HealthEvent(step, layer, "nonfinite", value, "nonfinite")
        log_value = _log(value)
        past = self._history.get(layer)
        n = past[1] if past is not None else 0
        condition: Condition | None = None
        if value > rules.exploding_threshold:
            condition, rule = "exploding", "threshold"
        elif value < rules.vanishing_threshold and not self._spare(step, layer, value, norms):
            condition, rule = "vanishing", "threshold"
        elif (
            past is not None
            and n >= self._judged_from
            and past[0] > self._log_vanishing  # a layer climbing out of vanishing is not exploding
            and log_value > past[0] + self._spike
        ):
            condition, rule = "exploding", "spike"
        elif layer in depth_starved:
            condition, rule = "vanishing", "depth"
        event = None
        if condition is not None:
            key = (layer, condition)
            count = streak[key] = streak.get(key, 0) + 1
            streak.pop((layer, _OTHER[condition]), None)
            if count >= self._patience[condition]:
                event = HealthEvent(step, layer, condition, value, rule)
        else:
            streak.pop((layer, "vanishing"), None)
            streak.pop((layer, "exploding"), None)
        if value != math.inf:
            if past is None:
                self._history[layer] = [log_value, 1]
            else:
                decay = rules.history_decay
                past[0] = decay * past[0] + (1.0 - decay) * log_value
                past[1] = n + 1
        return event

    def _depth_starved(self, step: int, norms: Mapping[str, float]) -> Set[str]:
        """Layers, other than the last ``depth_window``, far below the last ones when the first ones are. When that
        fires and the sibling rule spares some parameters, it is judged again without them, in both windows."""
        rules = self._rules
        if rules.depth_ratio is None or len(norms) < rules.depth_min_layers:
            return _NONE
        values = list(norms.values())
        # A NaN or an inf among them: no depth rule this step. sum() runs in C, the loop only when it is not finite.
        if not sum(values) < math.inf and not all(v < math.inf for v in values):
            return _NONE
        k = rules.depth_window
        # log(max(v, _TINY)) is _log(v) (a dead layer compares as tiny), taken in C-level maps.
        bound = sum(map(math.log, map(max, values[-k:], repeat(_TINY)))) / k + self._log_depth_ratio
        if sum(map(math.log, map(max, values[:k], repeat(_TINY)))) / k >= bound:  # the usual case: 2k logs a step
            return _NONE
        names = list(norms)
        starved = {names[i] for i in range(len(names) - k) if _log(values[i]) < bound}
        if self._sibling_ratio is None:
            return starved
        # The rule fired: judge it again without the parameters the sibling rule spares, in both windows.
        spared = {n for n, v in zip(names, values) if self._spared(n, v, norms)}
        if not spared:
            return starved
        for name in names:
            if name in spared and name in starved:
                self.cancelled.setdefault(name, step)
        kept = [(n, v) for n, v in zip(names, values) if n not in spared]
        if len(kept) < rules.depth_min_layers:
            return _NONE
        names, values = [n for n, _ in kept], [v for _, v in kept]
        bound = sum(map(_log, values[-k:])) / k + self._log_depth_ratio
        if sum(map(_log, values[:k])) / k >= bound:
            return _NONE
        return {names[i] for i in range(len(names) - k) if _log(values[i]) < bound}

    def _spare(self, step: int, name: str, value: float, norms: Mapping[str, float]) -> bool:
        """:meth:`_spared`, recorded in :attr:`cancelled` when it is."""
        if not self._spared(name, value, norms):
            return False
        self.cancelled.setdefault(name, step)
        return True

    def _spared(self, name: str, value: float, norms: Mapping[str, float]) -> bool:
        """The sibling rule: whether parameter ``name``'s finite norm is more than ``1 / sibling_ratio`` below another
        parameter of its layer that is not vanishing. Only asked when a vanishing rule would fire, so it costs
        nothing at a healthy step."""
        ratio = self._sibling_ratio
        if ratio is None or not value < math.inf:
            return False
        owners, top = self._owners, self._owner_max
        if top is None:  # built once per step, when first needed
            top = self._owner_max = {}
            lowest, highest = self._rules.vanishing_threshold, sys.float_info.max
            for other, v in norms.items():
                owner = owners.get(other)
                if owner is None:
                    owner = owners[other] = layer_name(other)
                if lowest <= v <= highest and v > top.get(owner, 0.0):  # False for NaN
                    top[owner] = v
        return value < ratio * top.get(owners[name], 0.0)  # every name of this step's norms has its owner by now

    def state_dict(self) -> dict[str, Any]:
        """The history (running means, counts, streaks): data, not settings, so a resume with other thresholds keeps
        it and applies the new thresholds. Its size grows with the number of layers, not with the steps."""
        return {
            "mean_log": {layer: past[0] for layer, past in self._history.items()},
            "seen": {layer: past[1] for layer, past in self._history.items()},
            "streak": [[layer, condition, n] for (layer, condition), n in self._streak.items()],
            "cancelled": dict(self.cancelled),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        seen = state["seen"]
        self._history = {layer: [float(mean), int(seen.get(layer, 0))] for layer, mean in state["mean_log"].items()}
        self._streak = {(layer, condition): n for layer, condition, n in state["streak"]}
        self.cancelled = {name: int(step) for name, step in state.get("cancelled", {}).items()}
