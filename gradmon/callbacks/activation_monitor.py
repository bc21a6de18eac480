"""ActivationMonitor: the forward and backward signal through depth, one batch per logging step, and what
:mod:`gradmon.diagnosis` makes of it; and :func:`likely_cause`, the one line a health warning can end with."""

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
from gradmon._validation import check_bool, check_int
from gradmon.activations import ActivationRecorder, ModuleStats, RecordedBatch
from gradmon.callbacks import _logging
from gradmon.callbacks.grad_norm import GradNormMonitor
from gradmon.callbacks.weight_init import WeightInit
from gradmon.diagnosis import (
    CLEARED,
    CONDITIONS,
    Evidence,
    Finding,
    LayerInfo,
    diagnose,
    explain,
    layer_structure,
    measure_layers,
)
from gradmon.health import HealthEvent
from gradmon.init import InitRecord
from gradmon.naming import clean_name
from gradmon.norms import (
    GradientNorms,
    HostCopy,
    Norms,
    ParamLayout,
    WeightSnapshot,
    compute_norms,
    layer_norms,
    read_host,
    update_ratios,
)
from gradmon.sharding import DTensor
from gradmon.tensorboard import markdown_table

#: The total gradient norms of this many earlier observed steps are kept (and checkpointed) to tell a spike.
HISTORY = 100


@dataclass(eq=False)
class _Observed:
    """One observed step, from its batch's hooks to the host: the recorded batch, the gradient and weight norms
    taken before the optimizer step, the update after it, and the one host copy of all of them."""

    step: int
    batch: RecordedBatch | None = None
    grads: Norms | None = None
    weights: Norms | None = None
    biases: torch.Tensor | None = None
    snapshot: WeightSnapshot | None = None
    update: Norms | None = None
    copy: HostCopy | None = None


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
    the same step, and the records of any :class:`~gradmon.WeightInit` go to :func:`gradmon.diagnosis.diagnose`. Its
    findings are kept in :attr:`findings` (the latest step's) and :attr:`found` (the first finding of each cause),
    written to TensorBoard as text under ``diagnosis/<condition>`` when a finding appears, changes or clears, and
    printed at the end of fit (``summary``). :func:`likely_cause` turns them into the one line a
    :class:`~gradmon.GradHealthMonitor` warning ends with.

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
        self.log_every_n_steps = check_int("log_every_n_steps", log_every_n_steps, 1, allow_none=True)
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
        self._every = self.log_every_n_steps or 50
        self._recorder: ActivationRecorder | None = None
        self._grad_norms: GradientNorms | None = None
        self._structure: list[LayerInfo] = []
        self._weight_index: list[int] = []
        self._ordered = False
        self._current: _Observed | None = None
        self._pending: list[_Observed] = []
        self._history: list[tuple[int, float]] = []
        self._initial_rms: dict[str, float] = {}
        self._written: dict[str, str] = {}
        self._layout_written = False

    @cached_property
    def state_key(self) -> str:
        return self._generate_state_key(log_every_n_steps=self.log_every_n_steps)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before Lightning restores callback state: a fresh fit starts from nothing, a resumed one gets its history.
        if stage == "fit":
            self._reset()

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self._history), "initial_weight_rms": dict(self._initial_rms),
                "written": dict(self._written)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._history = [(int(s), float(v)) for s, v in state_dict.get("history", [])]
        self._initial_rms = dict(state_dict.get("initial_weight_rms", {}))
        self._written = dict(state_dict.get("written", {}))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._every = self.log_every_n_steps or trainer.log_every_n_steps
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
        self._ordered = order is not None

    # --- the observed step ---------------------------------------------------------------------------------------

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
                             ) -> None:
        step = trainer.global_step
        if step % self._every or self._grad_norms is None:
            return
        if self._current is not None and self._current.step == step:
            return  # a later micro-batch of the same step (gradient accumulation): its first batch was observed
        self._finish_current()
        self._current = _Observed(step)
        if self._recorder is not None:
            self._recorder.start()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        current = self._current
        if current is None:  # most steps
            return
        if current.step == trainer.global_step and current.snapshot is None:
            self._measure(pl_module, current)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        current = self._current
        if current is None and not self._pending:  # most batches: nothing observed, nothing on its way
            return
        if current is not None and current.batch is None and self._recorder is not None:
            current.batch = self._recorder.stop()
        if current is not None and current.snapshot is not None and trainer.global_step > current.step:
            self._finish_current()
        # Read one step later: by then the non-blocking copy has long arrived, and reading it stalls nothing.
        self._process(trainer, before=trainer.global_step - 1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish_current()
        self._process(trainer)
        if self.summary and self.found and trainer.is_global_zero:
            rank_zero_info(self.summary_table())

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._recorder is not None and self._recorder.active:  # an exception inside an observed batch
            self._recorder.stop()

    def summary_table(self) -> str:
        """One row per cause found in this fit: the condition, the first step, the layers and the likely cause."""
        rows = [
            (CONDITIONS[f.condition], f.step, _span(f.layers), f.line().replace("|", "/"))
            for f in self.found.values()
        ]
        return "ActivationMonitor diagnosis\n" + markdown_table(("condition", "first step", "layers", "diagnosis"),
                                                                rows)

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
        if observed.biases is not None:
            parts.append(observed.biases)
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
            for info in layers:
                self._initial_rms.setdefault(info.name, info.weight_rms)
        evidence = Evidence(
            observed.step, layers, tuple(stats), grad_norms, ratios, _init_records(trainer),
            dict(self._initial_rms), tuple(self._history),
        )
        if grad_norms is not None:
            total = math.sqrt(sum(v * v for v in grad_norms.values()))
            self._history = [*self._history[-HISTORY + 1 :], (observed.step, total)]
        return stats, evidence

    def _report(self, trainer: pl.Trainer, step: int, stats: list[ModuleStats], evidence: Evidence) -> None:
        findings = diagnose(evidence) if self.diagnose else []
        self.findings = findings
        for finding in findings:
            self.found.setdefault(finding.cause, finding)
        if not trainer.is_global_zero or not trainer.loggers:
            return
        if not self._layout_written:
            self._write_layout(trainer)
            self._layout_written = True
        _logging.log_scalars(trainer, _scalars(stats), step)
        if self.diagnose:
            self._write_findings(trainer, step, findings)

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

    def _write_layout(self, trainer: pl.Trainer) -> None:
        """GradNormMonitor's charts (when it is on the Trainer) and this monitor's, as one layout: TensorBoard shows
        only the last layout a run wrote, and this one comes after GradNormMonitor's."""
        charts = dict(tags.ACTIVATION_CHARTS)
        if any(isinstance(c, GradNormMonitor) for c in trainer.callbacks):
            charts = {**tags.LAYOUT_CHARTS, **charts}
        _logging.write_layout(trainer, charts)

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
            observed = _Observed(current.step, batch, current.grads, current.weights, current.biases)
            parts = self._device_parts(observed)
            values = read_host(torch.cat([p.double().reshape(-1).to(parts[0].device) for p in parts])) if parts else []
            history = list(self._history)
            _, evidence = self._evidence(trainer, observed, values)
            self._history = history  # the step is recorded when it is processed, after its optimizer step
            return diagnose(evidence)
        self._process(trainer)
        return list(self.findings)


def likely_cause(trainer: pl.Trainer, condition: str, layers: list[str]) -> str | None:
    """One line, ``"likely cause: <cause>: <why, with numbers>; try: <what to change>"``, for a GradHealthMonitor
    warning about ``condition`` (``"vanishing"``, ``"exploding"`` or ``"nonfinite"``) in ``layers`` (layer names as
    its events give them), or ``None`` when nothing explains it.

    The evidence is that of the :class:`ActivationMonitor` on ``trainer``, if there is one
    (:meth:`ActivationMonitor.current_findings`: the most recent observed step, or the current one when it is being
    observed); without one, the model's weights and structure now, its current gradient norms and, for non-finite
    gradients, the exploding steps GradHealthMonitor flagged before (what the diagnosis predicts from the weights,
    without measuring the signal). Reads from the device: call it where a warning is issued, not every step. Pure
    host logic otherwise; never raises for a model it cannot read (returns ``None``).
    """
    monitor = next((c for c in trainer.callbacks if isinstance(c, ActivationMonitor)), None)
    try:
        if monitor is not None and monitor._grad_norms is not None:
            findings = monitor.current_findings(trainer)
        else:
            findings = diagnose(_static_evidence(trainer))
    except Exception as error:  # a diagnosis must never break the warning it would annotate
        rank_zero_warn(f"gradmon: the diagnosis failed ({type(error).__name__}: {error}).")
        return None
    if condition == "nonfinite" and not any(f.condition == "nonfinite" for f in findings):
        findings = diagnose(_static_evidence(trainer)) + findings
    finding = explain(findings, condition, layers)
    return finding.line() if finding is not None else None


def _static_evidence(trainer: pl.Trainer) -> Evidence:
    pl_module = trainer.lightning_module
    layers = measure_layers(pl_module, layer_structure(pl_module))
    grads, _ = layer_norms(pl_module)
    earlier = [
        (e.step, e.value)
        for c in trainer.callbacks
        for e in getattr(c, "events", ())
        if isinstance(e, HealthEvent) and e.condition == "exploding" and e.step < trainer.global_step
    ]
    return Evidence(trainer.global_step, layers, (), grads or None, None, _init_records(trainer), None,
                    tuple(earlier))


def _init_records(trainer: pl.Trainer) -> dict[str, InitRecord] | None:
    """The last record of each layer's ``weight`` from the Trainer's WeightInit callbacks (a later one overrides)."""
    records = {
        r.layer: r
        for c in trainer.callbacks if isinstance(c, WeightInit)
        for r in c.records if r.weight in ("weight", "")
    }
    return records or None


def _tensor_norms(norms: Norms) -> list[float]:
    """Per-tensor 2-norms from :class:`Norms` on the host (square roots of power sums when sharded)."""
    return [math.sqrt(v) for v in norms.host()] if norms.power_sums else list(norms.host())


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

