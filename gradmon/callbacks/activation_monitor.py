"""ActivationMonitor: the forward and backward signal through depth, one batch per logging step, and what
:mod:`gradmon.diagnosis` makes of it."""

from __future__ import annotations

import math
from functools import cached_property
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from gradmon._validation import check_bool
from gradmon.activations import ActivationRecorder, ModuleStats
from gradmon.callbacks._activation_capture import Observed, measure, step_loss
from gradmon.callbacks._activation_report import ReportWriter, summary_table
from gradmon.callbacks._activation_structure import ModelStructure
from gradmon.callbacks._diagnosis import diagnosis_board, init_records
from gradmon.callbacks._host_copy import HostCopy
from gradmon.callbacks._schedule import Every, OptimizerSteps
from gradmon.diagnosis import (
    Evidence,
    Finding,
    OptimizerInfo,
    Verdict,
    diagnose,
)
from gradmon.norms import (
    GradientNorms,
    Norms,
    ParamLayout,
    read_host,
    update_ratios,
)


class ActivationMonitor(Callback):
    r"""Log the statistics of every layer's and activation's output and of the gradient flowing back into it, and
    diagnose what they show, on logging steps only.

    Every ``log_every_n_steps`` optimizer steps of the Trainer's first optimizer (its steps 0, n, 2n, ...: it
    observes a whole batch, not one optimizer's step; with one optimizer, the global steps 0, n, 2n, ...; default:
    the Trainer's ``log_every_n_steps``), forward hooks are registered on the observed modules for that step's
    (first) training batch and removed at its end, with them the tensor hooks they put on the outputs to see the
    backward pass; other steps pay nothing. The hooks read and never write: the run is the same, bit for bit, with
    or without the monitor. Observed are the modules that own parameters and the activation modules (``ReLU``,
    ``LeakyReLU``, ``GELU``, ``SiLU``, ``ELU``, ``Sigmoid``, ``Tanh``, ``Hardtanh``, ...; see
    :mod:`gradmon.activations`), under the user's names. An activation called as a function (``F.relu``) is no
    module and cannot be hooked; the layer before it is still observed, so the forward signal through depth still
    shows (not its dead or saturated fraction). Logged at the step (``trainer.global_step``), per module:

    - ``activation_rms/<module>`` and ``activation_rms_log10/<module>``: RMS of the module's output;
    - ``activation_grad_rms/<module>`` and ``activation_grad_rms_log10/<module>``: RMS of the gradient of the loss
      with respect to that output, from the same batch's backward pass;
    - ``dead_fraction/<module>`` (ReLU, ReLU6): the fraction of units (features; channels of a convolution's output)
      that are zero for every example of the batch;
    - ``saturated_fraction/<module>`` and ``activation_slope/<module>`` (Sigmoid, Tanh, Hardtanh, Hardsigmoid,
      Softsign, LogSigmoid): the fraction of outputs where the slope is below 1% of its largest, and the mean slope.

    With ``diagnose`` (the default), the statistics, the per-layer gradient norms, weight scales and update ratios of
    the same step, the step's loss, the optimizer and the records of any :class:`~gradmon.WeightInit` go to
    :func:`gradmon.diagnosis.diagnose`. Its findings are kept in :attr:`findings` (the latest step's) and
    :attr:`found` (the first finding of each cause), written to TensorBoard as text under ``diagnosis/<condition>``
    when a finding appears, changes or clears, and read into the run's verdict (:attr:`verdict`: the root cause,
    found when the condition first showed, and its consequences), which is written under ``diagnosis/verdict`` when
    it changes and printed at the end of fit (``summary``). A :class:`~gradmon.GradHealthMonitor` on the same Trainer
    ends its warnings with the verdict.

    Everything stays on the device until the end of the observed step, then travels to the host as one vector in
    one non-blocking copy, read one step later (or at the end of training), so no step waits on the device. A
    custom-scalars chart per statistic (:data:`gradmon.tags.ACTIVATION_CHARTS`) joins GradNormMonitor's charts.

    Under DDP every rank observes its own batch and rank 0 logs: the statistics are those of rank 0's batch (the
    gradient norms and update ratios, taken after the all-reduce, are the whole batch's). Under ``torch.compile``,
    modules inside compiled code are not hooked (Dynamo does not guard on hooks, so a hook added for one step would
    fire or not depending on when the code was compiled); a compiled submodule (``self.net = torch.compile(net)``)
    is observed as one module under its name (``net``), and a LightningModule compiled as a whole
    (``trainer.fit(torch.compile(model))``) has no module left to observe: a warning says so, and the diagnosis
    works from the weights and gradients alone.

    Example::

        from gradmon import ActivationMonitor, GradHealthMonitor, GradNormMonitor
        trainer = Trainer(callbacks=[GradNormMonitor(), GradHealthMonitor(), ActivationMonitor(log_every_n_steps=50)])

    Args:
        log_every_n_steps: Observe and log every this many optimizer steps of the Trainer's first optimizer; None
            takes the Trainer's ``log_every_n_steps``.
        diagnose: Diagnose each observed step and log the findings.
        summary: Print the findings at the end of fit (one row per cause found).
    """

    def __init__(self, log_every_n_steps: int | None = None, diagnose: bool = True, summary: bool = True) -> None:
        self._every = Every("log_every_n_steps", log_every_n_steps)
        self.log_every_n_steps = self._every.n
        self.diagnose = check_bool("diagnose", diagnose)
        self.summary = check_bool("summary", summary)
        #: The findings of the latest diagnosed step.
        self.findings: list[Finding] = []
        #: The first finding of each cause found in this fit, by cause (a key of :data:`gradmon.diagnosis.CAUSES`).
        self.found: dict[str, Finding] = {}
        self._reset()

    def _reset(self) -> None:
        self.findings = []
        self.found = {}
        self._steps = OptimizerSteps()
        self._recorder: ActivationRecorder | None = None
        self._grad_norms: GradientNorms | None = None
        self._structure: ModelStructure | None = None
        self._current: Observed | None = None
        self._pending: list[Observed] = []
        self._writer = ReportWriter()
        self._board = None

    @cached_property
    def state_key(self) -> str:
        return self._generate_state_key(log_every_n_steps=self.log_every_n_steps)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before Lightning restores callback state: a fresh fit starts from nothing, a resumed one gets its history.
        if stage == "fit":
            self._reset()
            self._board = diagnosis_board(trainer)
            self._board.join(self)
            if self.diagnose:
                self._board.refresh = self.current_findings

    @property
    def verdict(self) -> Verdict | None:
        """The run's verdict so far (:class:`gradmon.diagnosis.Verdict`): the root cause and its consequences."""
        return self._board.diagnosis.verdict if self._board is not None else None

    def state_dict(self) -> dict[str, Any]:
        board = self._board.state_dict() if self._board is not None else {}
        return {"board": board, **self._writer.state_dict(), "optimizer_steps": self._steps.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._board is not None:
            self._board.load_state_dict(state_dict.get("board", {}))
        self._writer.load_state_dict(state_dict)
        self._steps.load_state_dict(state_dict.get("optimizer_steps", {}))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._board is not None:
            self._board.start(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._every.start(trainer)
        if getattr(pl_module, "_compiler_ctx", None) is not None:
            rank_zero_warn(
                "ActivationMonitor: the LightningModule is compiled as a whole (trainer.fit(torch.compile(model))), "
                "so every module runs inside compiled code, where hooks added for one step do not fire reliably; "
                "no activation statistics are logged. Compile submodules instead (self.net = torch.compile(net)): "
                "each is then observed as one module."
            )
            self._recorder = None
        else:
            self._recorder = ActivationRecorder(pl_module)
        module = getattr(trainer.strategy, "model", None) or pl_module
        layout = ParamLayout.from_named_parameters(pl_module.named_parameters(), "layer", module=module)
        self._grad_norms = GradientNorms(layout)
        self._structure = ModelStructure(pl_module, layout.param_names)

    # --- the observed step ---------------------------------------------------------------------------------------

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
                             ) -> None:
        count = self._steps.upcoming(trainer)
        if not self._every.due(count) or self._grad_norms is None:
            return
        if self._current is not None and self._current.count == count:
            return  # a later micro-batch of the same step (gradient accumulation): its first batch was observed
        self._finish_current()
        self._current = Observed(trainer.global_step, count)
        if self._recorder is not None:
            self._recorder.start()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        index, _ = self._steps.advance(trainer, optimizer)
        current = self._current
        if current is None:  # most steps
            return
        if index == 0 and current.snapshot is None:  # the observed step of the first optimizer
            self._measure(pl_module, current)
            current.optimizer = OptimizerInfo.of(optimizer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        current = self._current
        if current is None and not self._pending:  # most batches: nothing observed, nothing on its way
            return
        if current is not None and current.batch is None and self._recorder is not None:
            current.batch = self._recorder.stop()
        if current is not None and current.loss is None and trainer.global_step > current.step:
            current.loss = step_loss(args[0] if args else None)
        if current is not None and current.snapshot is not None and trainer.global_step > current.step:
            self._finish_current()
        # Read one step later: by then the non-blocking copy has long arrived, and reading it stalls nothing.
        self._process(trainer, before=trainer.global_step - 1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish_current()
        self._process(trainer)
        if self.summary and self.found and trainer.is_global_zero:
            rank_zero_info(self.summary_table())
        if self._board is not None and self._board.refresh == self.current_findings:
            self._board.refresh = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._recorder is not None and self._recorder.active:  # an exception inside an observed batch
            self._recorder.stop()

    def summary_table(self) -> str:
        """The verdict, then one row per cause found in this fit: the condition, the first step, the layers, the
        likely cause, and whether the verdict explains it."""
        return summary_table(self.verdict, self.found.values())

    def _measure(self, pl_module: pl.LightningModule, current: Observed) -> None:
        assert self._grad_norms is not None and self._structure is not None
        measure(pl_module, self._grad_norms, self._structure.layers, self._structure.recurrent, current)

    def _finish_current(self) -> None:
        """After the observed step's optimizer step: the update, and one non-blocking copy of everything."""
        current, self._current = self._current, None
        if current is None:
            return
        if self._recorder is not None and self._recorder.active:
            current.batch = self._recorder.stop()
        if current.snapshot is not None:
            _, current.update = current.snapshot.finish()
            current.snapshot = None
        parts = current.device_parts()
        if parts:
            device = parts[0].device
            current.copy = HostCopy(torch.cat([p.double().reshape(-1).to(device) for p in parts]))
        self._pending.append(current)

    # --- from the host: logging and diagnosis --------------------------------------------------------------------

    def _process(self, trainer: pl.Trainer, before: int | None = None) -> None:
        """Log and diagnose the observed steps whose copies have arrived (those before ``before``; all by default)."""
        keep = []
        for observed in self._pending:
            if before is not None and observed.step >= before:
                keep.append(observed)
                continue
            values = observed.copy.values() if observed.copy is not None else []
            stats, evidence = self._evidence(trainer, observed, values)
            self._report(trainer, observed.step, stats, evidence)
        self._pending = keep

    def _evidence(self, trainer: pl.Trainer, observed: Observed, values: list[float]
                  ) -> tuple[list[ModuleStats], Evidence]:
        taken = 0

        def take(n: int) -> list[float]:
            nonlocal taken
            taken += n
            return values[taken - n : taken]

        stats = observed.batch.stats(take(len(observed.batch.values))) if observed.batch is not None else []
        structure = self._structure
        assert structure is not None and self._grad_norms is not None
        if stats and not structure.ordered:
            structure = self._structure = ModelStructure(
                trainer.lightning_module, self._grad_norms.layout.param_names, [s.name for s in stats])
        grad_norms = None
        if observed.grads is not None:
            observed.grads.set_host(take(len(observed.grads.layout)))
            grad_norms = observed.grads.per_layer()[0]
        layers, ratios = list(structure.layers), None
        if observed.weights is not None:
            observed.weights.set_host(take(len(observed.weights.layout)))
            if observed.update is not None:
                observed.update.set_host(take(len(observed.update.layout)))
                ratios = update_ratios(observed.weights, observed.update)
            biases = take(len(structure.layers)) if observed.biases is not None else []
            layers = structure.with_weights(_tensor_norms(observed.weights), observed.weights.layout.params, biases)
        recurrent = []
        if observed.recurrent is not None:
            recurrent = structure.recurrent_info(take(len(structure.recurrent)))
        loss = take(1)[0] if observed.loss is not None else math.nan
        board = self._board or diagnosis_board(trainer)
        evidence = Evidence(
            observed.step, layers, tuple(stats), grad_norms, ratios, init_records(trainer),
            dict(board.initial_weight_rms), dict(board.initial_bias_mean),
            tuple(r for r in board.history if r.step < observed.step), observed.optimizer, loss, tuple(recurrent),
            structure.post_norm,
        )
        return stats, evidence

    def _report(self, trainer: pl.Trainer, step: int, stats: list[ModuleStats], evidence: Evidence) -> None:
        findings = diagnose(evidence) if self.diagnose else []
        self.findings = findings
        for finding in findings:
            self.found.setdefault(finding.cause, finding)
        board = self._board or diagnosis_board(trainer)
        board.observe(evidence, findings)
        verdict = board.diagnosis.verdict
        if not trainer.is_global_zero or not trainer.loggers:
            return
        self._writer.write(trainer, step, stats, findings if self.diagnose else None, verdict)

    # --- now, for a health warning -------------------------------------------------------------------------------

    def current_findings(self, trainer: pl.Trainer) -> list[Finding]:
        """The findings of the most recent observed step, read now: those of a step whose copy is on its way are
        read (and logged) at once, and during an observed step, before its optimizer step, its statistics so far
        are read from the device (one transfer) and diagnosed with its gradients and weights. Empty without an
        observed step."""
        current = self._current
        if current is not None and current.step == trainer.global_step and current.update is None:
            if current.snapshot is None and self._grad_norms is not None:
                self._measure(trainer.lightning_module, current)
            batch = current.batch or (self._recorder.peek() if self._recorder is not None else None)
            observed = Observed(current.step, current.count, batch, current.grads, current.weights, current.biases)
            parts = observed.device_parts()
            values = read_host(torch.cat([p.double().reshape(-1).to(parts[0].device) for p in parts])) if parts else []
            _, evidence = self._evidence(trainer, observed, values)
            findings = diagnose(evidence)
            # Into the verdict at once (the warning reads it); the step's record waits for its update and loss.
            (self._board or diagnosis_board(trainer)).diagnosis.observe(evidence.step, findings)
            return findings
        self._process(trainer)
        return list(self.findings)


def _tensor_norms(norms: Norms) -> list[float]:
    """Per-tensor 2-norms from :class:`Norms` on the host (of the full tensors, also when sharded)."""
    return list(norms.host())

