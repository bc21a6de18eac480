"""The diagnosis shared by a Trainer's callbacks: one :class:`DiagnosisBoard` per Trainer, so that callbacks ask it
for a verdict instead of asking each other.

An :class:`~gradmon.ActivationMonitor` feeds it the evidence of its observed steps and offers a way to read the
step being observed now (:attr:`DiagnosisBoard.refresh`); a :class:`~gradmon.GradHealthMonitor` asks it to explain
what it flagged. Without an ActivationMonitor, the board diagnoses the model's weights and gradients at the moment
it is asked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from gradmon.callbacks._boards import trainer_board
from gradmon.diagnosis import (
    Diagnosis,
    Evidence,
    Finding,
    OptimizerInfo,
    StepRecord,
    Verdict,
    diagnose,
    layer_structure,
    measure_layers,
    post_norm,
    recurrent_layers,
)
from gradmon.init import InitRecord
from gradmon.norms import layer_norms

#: The observed steps whose records are kept (and checkpointed) to tell a spike or a divergence.
HISTORY = 100


class DiagnosisBoard:
    """One Trainer's diagnosis: the :class:`~gradmon.diagnosis.Diagnosis` (the verdict), the weights' scale at the
    start of fit, the records of the observed steps, and, when an ActivationMonitor is on the Trainer, how to read
    the step it observes now.

    Attributes:
        diagnosis: The run's verdict.
        initial_weight_rms: Each weight layer's weight RMS at the start of fit.
        initial_bias_mean: Each weight layer's bias mean at the start of fit.
        history: The observed steps, oldest first (the latest :data:`HISTORY`).
        refresh: Set by an ActivationMonitor: the findings of its most recent observed step, read now.
    """

    def __init__(self) -> None:
        self.diagnosis = Diagnosis()
        self.initial_weight_rms: dict[str, float] = {}
        self.initial_bias_mean: dict[str, float] = {}
        self.history: list[StepRecord] = []
        self.refresh: Callable[[pl.Trainer], list[Finding]] | None = None
        self._members: set[int] = set()

    def join(self, callback: object) -> None:
        """Called by each callback as a fit is set up: the first callback to join again starts a new fit."""
        if id(callback) in self._members:
            self.__init__()  # type: ignore[misc]
        self._members.add(id(callback))

    def start(self, pl_module: pl.LightningModule) -> None:
        """The weights' scale at the start of fit (after any WeightInit; kept from a checkpoint on resume)."""
        if self.initial_weight_rms:
            return
        for info in measure_layers(pl_module, layer_structure(pl_module)):
            self.initial_weight_rms[info.name] = info.weight_rms
            if info.bias_mean is not None:
                self.initial_bias_mean[info.name] = info.bias_mean

    def observe(self, evidence: Evidence, findings: list[Finding]) -> None:
        """Take an observed step's findings into the verdict, and its record into the history."""
        self.diagnosis.observe(evidence.step, findings)
        if not self.history or self.history[-1].step < evidence.step:
            self.history = [*self.history[-HISTORY + 1:], evidence.record()]

    def explain(self, trainer: pl.Trainer, condition: str, earlier: list[tuple[int, float]] = ()) -> str | None:
        """The line a health warning about ``condition`` ends with (:meth:`gradmon.diagnosis.Diagnosis.explain`),
        with the findings of the step being observed read now, or, without an ActivationMonitor, those of the
        weights and gradients now. ``earlier``: (step, total gradient norm) of earlier flagged steps, as spikes.
        Never raises for a model it cannot read (returns ``None``)."""
        try:
            if self.refresh is not None:
                findings = self.refresh(trainer)
            else:
                evidence = self.static_evidence(trainer, earlier)
                findings = diagnose(evidence)
                self.observe(evidence, findings)
            return self.diagnosis.explain(condition, findings)
        except Exception as error:  # a diagnosis must never break the warning it would annotate
            rank_zero_warn(f"gradmon: the diagnosis failed ({type(error).__name__}: {error}).")
            return None

    def static_evidence(self, trainer: pl.Trainer, earlier: list[tuple[int, float]] = ()) -> Evidence:
        """The evidence of the model as it is now, without activation statistics."""
        pl_module = trainer.lightning_module
        layers = measure_layers(pl_module, layer_structure(pl_module))
        grads, _ = layer_norms(pl_module)
        history = sorted([*self.history, *(StepRecord(s, v) for s, v in earlier)], key=lambda r: r.step)
        optimizer = OptimizerInfo.of(trainer.optimizers[0]) if trainer.optimizers else None
        return Evidence(
            trainer.global_step, layers, (), grads or None, None, init_records(trainer),
            dict(self.initial_weight_rms), dict(self.initial_bias_mean), tuple(history), optimizer,
            recurrent=tuple(recurrent_layers(pl_module)), post_norm=post_norm(pl_module),
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "diagnosis": self.diagnosis.state_dict(),
            "initial_weight_rms": dict(self.initial_weight_rms),
            "initial_bias_mean": dict(self.initial_bias_mean),
            "history": [(r.step, r.grad_norm, r.loss, r.weight_growth, r.lr) for r in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "diagnosis" in state:
            self.diagnosis.load_state_dict(state["diagnosis"])
        self.initial_weight_rms = dict(state.get("initial_weight_rms", {}))
        self.initial_bias_mean = dict(state.get("initial_bias_mean", {}))
        self.history = [StepRecord(int(r[0]), *(float(v) for v in r[1:])) for r in state.get("history", [])]


def diagnosis_board(trainer: pl.Trainer) -> DiagnosisBoard:
    """The Trainer's board, made on first use."""
    return trainer_board(trainer, "_gradmon_diagnosis", DiagnosisBoard)


def init_records(trainer: pl.Trainer) -> dict[str, InitRecord] | None:
    """The last record of each layer's ``weight`` from the Trainer's WeightInit callbacks (a later one overrides),
    found by what they offer (``records`` of :class:`~gradmon.init.InitRecord`)."""
    records = {
        r.layer: r
        for c in trainer.callbacks
        for r in getattr(c, "records", ()) if isinstance(r, InitRecord) and r.weight in ("weight", "")
    }
    return records or None


def verdict(trainer: pl.Trainer) -> Verdict | None:
    """The run's verdict on ``trainer``: the root cause the diagnosis found, with its consequences
    (:class:`gradmon.diagnosis.Verdict`), or ``None`` when nothing was found (or no gradmon monitor diagnosed).

    Example::

        trainer.fit(model)
        if (found := gradmon.verdict(trainer)) is not None:
            print(found.line(), found.finding.fix)
    """
    board = getattr(trainer, "_gradmon_diagnosis", None)
    return board.diagnosis.verdict if board is not None else None
