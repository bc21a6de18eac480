"""GradHealthMonitor's ledger: what a fit flagged, skipped and counted, and its checkpointed form."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from typing import Any

from gradmon.health import CONDITIONS, HealthEvent
from gradmon.tensorboard import markdown_table

#: Events kept in a checkpoint: the latest ones. The per-step counts are in the logs, so a checkpoint's size does
#: not grow with the length of the run.
EVENTS_IN_CHECKPOINT = 100


class HealthLedger:
    """Events (the first ``max_events``), steps flagged and the first step per condition, times each layer was
    flagged, skipped steps and steps a GradScaler skipped for overflow. Its :meth:`state_dict` keys are those
    GradHealthMonitor's checkpoints have always had, so older checkpoints load."""

    def __init__(self, max_events: int) -> None:
        self.max_events = max_events
        self.events: list[HealthEvent] = []
        self.flagged_steps: Counter[str] = Counter()
        self.first_step: dict[str, int] = {}
        self.layer_counts: dict[str, Counter[str]] = {c: Counter() for c in CONDITIONS}
        self.skipped_steps = 0
        #: Steps a GradScaler skipped because its scaled gradients overflowed (fp16).
        self.amp_overflow_steps = 0

    def record(self, step: int, events: list[HealthEvent], flagged: set[str]) -> None:
        room = self.max_events - len(self.events)
        if room > 0:
            self.events.extend(events[:room])
        for e in events:
            self.layer_counts[e.condition][e.layer] += 1
        for c in flagged:
            self.flagged_steps[c] += 1
            self.first_step.setdefault(c, step)

    def exploding_before(self, step: int) -> list[tuple[int, float]]:
        """(step, norm) of the exploding layers flagged before ``step``: spikes the diagnosis can point back to."""
        return [(e.step, e.value) for e in self.events if e.condition == "exploding" and e.step < step]

    def summary_table(self) -> str:
        """Per condition: steps flagged, first step, the layers flagged most often; and skipped steps."""
        rows = []
        for c in CONDITIONS:
            if self.flagged_steps[c]:
                top = ", ".join(f"{layer} ({n})" for layer, n in self.layer_counts[c].most_common(3))
                rows.append((c, self.flagged_steps[c], self.first_step[c], top or "(on another rank)"))
        header = ("condition", "steps", "first step", "layers (times flagged)")
        lines = ["GradHealthMonitor summary", markdown_table(header, rows), f"skipped steps: {self.skipped_steps}"]
        if self.amp_overflow_steps:
            lines.append(f"steps the GradScaler skipped for overflow (not flagged): {self.amp_overflow_steps}")
        return "\n".join(lines)

    def state_dict(self) -> dict[str, Any]:
        return {
            "skipped_steps": self.skipped_steps,
            "amp_overflow_steps": self.amp_overflow_steps,
            "flagged_steps": dict(self.flagged_steps),
            "first_step": dict(self.first_step),
            "layer_counts": {c: dict(n) for c, n in self.layer_counts.items()},
            "events": [asdict(e) for e in self.events[-EVENTS_IN_CHECKPOINT:]],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict["skipped_steps"])
        self.amp_overflow_steps = int(state_dict.get("amp_overflow_steps", 0))
        self.flagged_steps = Counter(state_dict["flagged_steps"])
        self.first_step = dict(state_dict["first_step"])
        self.layer_counts = {c: Counter(state_dict["layer_counts"].get(c, {})) for c in CONDITIONS}
        self.events = [HealthEvent(**e) for e in state_dict["events"]]
