"""ActivationMonitor: the forward and backward signal through depth, one batch per logging step, and what
:mod:`gradmon.diagnosis` makes of it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from gradmon import tags
from gradmon._validation import check_bool
from gradmon.activations import ActivationRecorder, ModuleStats, RecordedBatch
from gradmon.callbacks import _logging, _shared
from gradmon.callbacks._diagnosis import diagnosis_board, init_records
from gradmon.callbacks._schedule import Every, OptimizerSteps
from gradmon.diagnosis import (
    CLEARED,
    CONDITIONS,
    Evidence,
    Finding,
    LayerInfo,
    OptimizerInfo,
    RecurrentInfo,
    Verdict,
    diagnose,
    layer_structure,
    post_norm,
)
from gradmon.diagnosis.evidence import RECURRENT, weight_rms
from gradmon.naming import clean_name
from gradmon.norms import (
    GradientNorms,
    HostCopy,
    Norms,
    ParamLayout,
    WeightSnapshot,
    compute_norms,
    read_host,
    update_ratios,
)
from gradmon.sharding import DTensor
from gradmon.tensorboard import markdown_table


@dataclass(eq=False)
class _Observed:
    """One observed step, from its batch's hooks to the host: the recorded batch, the gradient and weight norms
    taken before the optimizer step, the update after it, and the one host copy of all of them."""

    step: int
    count: int = -1
    batch: RecordedBatch | None = None
    grads: Norms | None = None
    weights: Norms | None = None
    biases: torch.Tensor | None = None
    snapshot: WeightSnapshot | None = None
    update: Norms | None = None
    copy: HostCopy | None = None
    recurrent: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    optimizer: OptimizerInfo | None = None


class ActivationMonitor(Callback):
    r"""Log the statistics of every layer's and activation's output and of the gradient flowing back into it, and
    diagnose what they show, on logging steps only.

    Every ``log_every_n_steps`` optimizer steps (steps 0, n, 2n, ...; default: the Trainer's ``log_every_n_steps``),
    forward hooks are registered on the observed modules for that step's (first) training batch and removed at its
    end, with them the tensor hooks they put on the outputs to see the backward pass; other steps pay nothing. The
    hooks read and never write: the run is the same, bit for bit, with or without the monitor. Observed are the
    modules that own parameters and the activation modules (``ReLU``, ``LeakyReLU``, ``GELU``, ``SiLU``, ``ELU``,
    ``Sigmoid``, ``Tanh``, ``Hardtanh``, ...; see :mod:`gradmon.activations`), under the user's names. An activation
    called as a function (``F.relu``) is no module and cannot be hooked; the layer before it is still observed, so
    the forward signal through depth still shows (not its dead or saturated fraction). Logged at the step
    (``trainer.global_step``), per module:

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
        log_every_n_steps: Observe and log every this many optimizer steps (default: the Trainer's).
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
        self._structure: list[LayerInfo] = []
        self._weight_index: list[int] = []
        self._recurrent: list[tuple[str, torch.nn.Module]] = []
        self._post_norm: bool | None = None
        self._ordered = False
        self._current: _Observed | None = None
        self._pending: list[_Observed] = []
        self._written: dict[str, str] = {}
        self._verdict_written = ""
        self._board = None
        self._layout_written = False

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
        return {"board": self._board.state_dict() if self._board is not None else {}, "written": dict(self._written),
                "verdict_written": self._verdict_written, "optimizer_steps": self._steps.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._board is not None:
            self._board.load_state_dict(state_dict.get("board", {}))
        self._written = dict(state_dict.get("written", {}))
        self._verdict_written = str(state_dict.get("verdict_written", ""))
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
        self._set_structure(pl_module)

    def _set_structure(self, pl_module: pl.LightningModule, order: Sequence[str] | None = None) -> None:
        """The weight layers, each with the activation after it (in ``order``, the forward's call order, once one
        was observed), and where each one's ``weight`` sits in the layout."""
        assert self._grad_norms is not None
        index = {name: i for i, name in enumerate(self._grad_norms.layout.param_names)}
        self._structure = [info for info in layer_structure(pl_module, order) if f"{info.name}.weight" in index]
        self._weight_index = [index[f"{info.name}.weight"] for info in self._structure]
        self._recurrent = [(n, m) for n, m in pl_module.named_modules() if isinstance(m, RECURRENT)]
        self._post_norm = post_norm(pl_module, order)
        self._ordered = order is not None

    # --- the observed step ---------------------------------------------------------------------------------------

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
                             ) -> None:
        count = self._steps.upcoming(trainer)
        if not self._every.due(count) or self._grad_norms is None:
            return
        if self._current is not None and self._current.count == count:
            return  # a later micro-batch of the same step (gradient accumulation): its first batch was observed
        self._finish_current()
        self._current = _Observed(trainer.global_step, count)
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
            current.loss = _loss(args[0] if args else None)
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
        verdict = self.verdict
        roles = {}
        if verdict is not None:
            roles = {c: "consequence" for c in verdict.consequences} | {verdict.cause: "root cause"}
        rows = [
            (CONDITIONS[f.condition], f.step, _span(f.layers), roles.get(f.cause, ""), f.line().replace("|", "/"))
            for f in self.found.values()
        ]
        head = f"verdict: {verdict.line()}\n" if verdict is not None else ""
        return "ActivationMonitor diagnosis\n" + head + markdown_table(
            ("condition", "first step", "layers", "role", "diagnosis"), rows)

    @torch.no_grad()
    def _measure(self, pl_module: pl.LightningModule, current: _Observed) -> None:
        """Before the optimizer step: gradient norms, weight norms, bias means and a copy of the weights for the
        update ratio (all on the device)."""
        assert self._grad_norms is not None
        layout = self._grad_norms.layout
        current.grads = self._grad_norms.compute()
        current.weights = compute_norms(layout, [p.detach() for p in layout.params], 2.0)
        modules = dict(pl_module.named_modules())
        biases = [getattr(_module(modules, info.name), "bias", None) for info in self._structure]
        device = layout.params[0].device if layout.params else torch.device("cpu")
        # A shard's mean is not the bias's: sharded biases are left out (NaN).
        current.biases = torch.stack([
            b.detach().float().mean().to(device)
            if isinstance(b, torch.Tensor) and b.numel() and not isinstance(b, DTensor)
            else torch.full((), math.nan, device=device)
            for b in biases
        ]) if biases else torch.zeros(0, device=device)
        current.recurrent = torch.stack([weight_rms(m.weight_hh_l0).to(device) for _, m in self._recurrent]
                                        ) if self._recurrent else None
        current.snapshot = WeightSnapshot(layout)

    def _finish_current(self) -> None:
        """After the observed step's optimizer step: the update, and one non-blocking copy of everything."""
        current, self._current = self._current, None
        if current is None:
            return
        if self._recorder is not None and self._recorder.active:
            current.batch = self._recorder.stop()
        if current.snapshot is not None:
            _, current.update = current.snapshot.finish(2.0)
            current.snapshot = None
        parts = self._device_parts(current)
        if parts:
            device = parts[0].device
            current.copy = HostCopy(torch.cat([p.double().reshape(-1).to(device) for p in parts]))
        self._pending.append(current)

    @staticmethod
    def _device_parts(observed: _Observed) -> list[torch.Tensor]:
        parts = [observed.batch.values] if observed.batch is not None else []
        parts += [n.device_values for n in (observed.grads, observed.weights, observed.update) if n is not None]
        parts += [t.reshape(-1) for t in (observed.biases, observed.recurrent, observed.loss) if t is not None]
        return parts

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

    def _evidence(self, trainer: pl.Trainer, observed: _Observed, values: list[float]
                  ) -> tuple[list[ModuleStats], Evidence]:
        taken = 0

        def take(n: int) -> list[float]:
            nonlocal taken
            taken += n
            return values[taken - n : taken]

        stats = observed.batch.stats(take(len(observed.batch.values))) if observed.batch is not None else []
        if stats and not self._ordered:
            self._set_structure(trainer.lightning_module, [s.name for s in stats])
        grad_norms = None
        if observed.grads is not None:
            observed.grads.set_host(take(len(observed.grads.layout)))
            grad_norms = observed.grads.per_layer()[0]
        layers = list(self._structure)
        ratios = None
        if observed.weights is not None:
            observed.weights.set_host(take(len(observed.weights.layout)))
            weight = _tensor_norms(observed.weights)
            params = observed.weights.layout.params
            rms = {
                info.name: weight[i] / math.sqrt(max(params[i].numel(), 1))
                for info, i in zip(self._structure, self._weight_index)
            }
            if observed.update is not None:
                observed.update.set_host(take(len(observed.update.layout)))
                ratios = update_ratios(observed.weights, observed.update)
            biases = take(len(self._structure)) if observed.biases is not None else []
            bias_of = {info.name: b for info, b in zip(self._structure, biases)}
            layers = [
                replace(info, weight_rms=rms.get(info.name, math.nan),
                        bias_mean=None if math.isnan(bias_of.get(info.name, math.nan)) else bias_of[info.name])
                for info in layers
            ]
        recurrent = []
        if observed.recurrent is not None:
            recurrent = [RecurrentInfo(clean_name(name), type(m).__name__, m.hidden_size, v)
                         for (name, m), v in zip(self._recurrent, take(len(self._recurrent)))]
        loss = take(1)[0] if observed.loss is not None else math.nan
        board = self._board or diagnosis_board(trainer)
        evidence = Evidence(
            observed.step, layers, tuple(stats), grad_norms, ratios, init_records(trainer),
            dict(board.initial_weight_rms), dict(board.initial_bias_mean),
            tuple(r for r in board.history if r.step < observed.step), observed.optimizer, loss, tuple(recurrent),
            self._post_norm,
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
        if not self._layout_written:
            self._write_layout(trainer, list(_scalars(stats)))
            self._layout_written = True
        _logging.log_scalars(trainer, _scalars(stats), step)
        if self.diagnose:
            self._write_findings(trainer, step, findings)
            # Written when it is set or replaced, whoever formed it (a health warning may have, before this step's
            # report): the key names it by cause and step.
            key = f"{verdict.cause}@{verdict.finding.step}" if verdict is not None else ""
            if key and key != self._verdict_written:
                _logging.log_text(trainer, tags.tag(tags.DIAGNOSIS, tags.VERDICT), verdict.markdown(), step)
                self._verdict_written = key

    def _write_findings(self, trainer: pl.Trainer, step: int, findings: list[Finding]) -> None:
        """Text under ``diagnosis/<condition>`` when a finding appears, changes its cause, or clears: a few entries
        per run, however long, rather than one per logging step."""
        now = {f.condition: f for f in findings}
        for condition in list(self._written) + [c for c in now if c not in self._written]:
            finding = now.get(condition)
            key = finding.cause if finding is not None else ""
            if self._written.get(condition, "") == key:
                continue
            text = finding.markdown() if finding is not None else f"**{CONDITIONS[condition]}**: {CLEARED}"
            _logging.log_text(trainer, tags.tag(tags.DIAGNOSIS, condition), text, step)
            if key:
                self._written[condition] = key
            else:
                del self._written[condition]

    def _write_layout(self, trainer: pl.Trainer, logged: list[str]) -> None:
        """This monitor's charts for the statistics it logs (none for a statistic without data, a dozen lines at
        most each) with every chart the Trainer's other callbacks registered, as one layout: TensorBoard shows only
        the last layout a run wrote."""
        _shared.write_layout(trainer, tags.banded_charts(tags.ACTIVATION_CHARTS, logged))

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
            observed = _Observed(current.step, current.count, batch, current.grads, current.weights, current.biases)
            parts = self._device_parts(observed)
            values = read_host(torch.cat([p.double().reshape(-1).to(parts[0].device) for p in parts])) if parts else []
            _, evidence = self._evidence(trainer, observed, values)
            findings = diagnose(evidence)
            # Into the verdict at once (the warning reads it); the step's record waits for its update and loss.
            (self._board or diagnosis_board(trainer)).diagnosis.observe(evidence.step, findings)
            return findings
        self._process(trainer)
        return list(self.findings)


def _tensor_norms(norms: Norms) -> list[float]:
    """Per-tensor 2-norms from :class:`Norms` on the host (square roots of power sums when sharded)."""
    return [math.sqrt(v) for v in norms.host()] if norms.power_sums else list(norms.host())


def _loss(outputs: Any) -> torch.Tensor | None:
    """The training step's loss from what it returned (a tensor, or a dict with ``"loss"``), detached."""
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        return loss.detach().float().reshape(1)
    return None


def _module(modules: dict[str, torch.nn.Module], name: str) -> torch.nn.Module | None:
    return modules.get(name) or next((m for n, m in modules.items() if clean_name(n) == name), None)


def _scalars(stats: Sequence[ModuleStats]) -> dict[str, float]:
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

