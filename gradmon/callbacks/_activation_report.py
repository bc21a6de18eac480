"""What an :class:`~gradmon.ActivationMonitor` writes: the statistics of an observed step as scalars, the diagnosis's
findings and the run's verdict as text when they change, and the end-of-fit summary table."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl

from gradmon import tags
from gradmon.activations import ModuleStats
from gradmon.callbacks import _logging, _shared
from gradmon.diagnosis import CLEARED, CONDITIONS, Finding, Verdict
from gradmon.tensorboard import markdown_table


class ReportWriter:
    """Writes one monitor's observed steps to the Trainer's loggers, and remembers which findings and verdict it
    wrote (kept in checkpoints: a resumed run does not write again what the run already shows)."""

    def __init__(self) -> None:
        #: The cause last written under ``diagnosis/<condition>``, per condition with a finding.
        self.written: dict[str, str] = {}
        #: The verdict last written under ``diagnosis/verdict``, as ``cause@step`` ("" for none).
        self.verdict_written = ""
        self._layout_written = False

    def state_dict(self) -> dict[str, Any]:
        return {"written": dict(self.written), "verdict_written": self.verdict_written}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.written = dict(state_dict.get("written", {}))
        self.verdict_written = str(state_dict.get("verdict_written", ""))

    def write(self, trainer: pl.Trainer, step: int, stats: Sequence[ModuleStats],
              findings: list[Finding] | None, verdict: Verdict | None) -> None:
        """Log an observed step's statistics, and with ``findings`` (``None``: not diagnosed) the findings that
        changed and the verdict when it changed."""
        values = scalars(stats)
        if not self._layout_written:
            # This monitor's charts for the statistics it logs (none for a statistic without data, a dozen lines at
            # most each) with every chart the Trainer's other callbacks registered, as one layout: TensorBoard shows
            # only the last layout a run wrote.
            _shared.write_layout(trainer, tags.banded_charts(tags.ACTIVATION_CHARTS, list(values)))
            self._layout_written = True
        _logging.log_scalars(trainer, values, step)
        if findings is None:
            return
        self._write_findings(trainer, step, findings)
        # Written when it is set or replaced, whoever formed it (a health warning may have, before this step's
        # report): the key names it by cause and step.
        key = f"{verdict.cause}@{verdict.finding.step}" if verdict is not None else ""
        if key and key != self.verdict_written:
            _logging.log_text(trainer, tags.tag(tags.DIAGNOSIS, tags.VERDICT), verdict.markdown(), step)
            self.verdict_written = key

    def _write_findings(self, trainer: pl.Trainer, step: int, findings: list[Finding]) -> None:
        """Text under ``diagnosis/<condition>`` when a finding appears, changes its cause, or clears: a few entries
        per run, however long, rather than one per logging step."""
        now = {f.condition: f for f in findings}
        for condition in list(self.written) + [c for c in now if c not in self.written]:
            finding = now.get(condition)
            key = finding.cause if finding is not None else ""
            if self.written.get(condition, "") == key:
                continue
            text = finding.markdown() if finding is not None else f"**{CONDITIONS[condition]}**: {CLEARED}"
            _logging.log_text(trainer, tags.tag(tags.DIAGNOSIS, condition), text, step)
            if key:
                self.written[condition] = key
            else:
                del self.written[condition]


def summary_table(verdict: Verdict | None, found: Iterable[Finding]) -> str:
    """The verdict, then one row per cause found: the condition, the first step, the layers, the likely cause, and
    whether the verdict explains it."""
    roles = {}
    if verdict is not None:
        roles = {c: "consequence" for c in verdict.consequences} | {verdict.cause: "root cause"}
    rows = [
        (CONDITIONS[f.condition], f.step, _span(f.layers), roles.get(f.cause, ""), f.line().replace("|", "/"))
        for f in found
    ]
    head = f"verdict: {verdict.line()}\n" if verdict is not None else ""
    return "ActivationMonitor diagnosis\n" + head + markdown_table(
        ("condition", "first step", "layers", "role", "diagnosis"), rows)


def scalars(stats: Sequence[ModuleStats]) -> dict[str, float]:
    """The tags and values an observed step logs, per module."""
    values: dict[str, float] = {}
    for s in stats:
        values[tags.tag(tags.ACTIVATION_RMS, s.name)] = s.rms
        _log10(values, tags.ACTIVATION_RMS_LOG10, s.name, s.rms)
        if s.grad_rms is not None:
            values[tags.tag(tags.ACTIVATION_GRAD_RMS, s.name)] = s.grad_rms
            _log10(values, tags.ACTIVATION_GRAD_RMS_LOG10, s.name, s.grad_rms)
        for metric, value in ((tags.DEAD_FRACTION, s.dead_fraction), (tags.SATURATED_FRACTION, s.saturated_fraction),
                              (tags.ACTIVATION_SLOPE, s.slope)):
            if value is not None:
                values[tags.tag(metric, s.name)] = value
    return values


def _log10(values: dict[str, float], metric: str, name: str, value: float) -> None:
    if value > 0 and math.isfinite(value):
        values[tags.tag(metric, name)] = math.log10(value)


def _span(layers: Sequence[str]) -> str:
    return ", ".join(layers) if len(layers) <= 3 else f"{layers[0]} to {layers[-1]} ({len(layers)})"
