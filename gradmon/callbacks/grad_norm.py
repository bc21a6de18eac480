"""GradNormMonitor: per-layer gradient norms, weight norms and update/weight ratios, logged cheaply."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from gradmon import tags
from gradmon._validation import check_bool, check_choice, check_int, check_norm_type
from gradmon.callbacks import _logging, _shared
from gradmon.callbacks._grad_source import GradNormSource, optimizer_names
from gradmon.callbacks._host_copy import HostCopy
from gradmon.callbacks._images import figure_board
from gradmon.callbacks._schedule import Every, OptimizerSteps
from gradmon.norms import GroupBy, Norms, WeightSnapshot, compute_norms, concatenated, hand_out, update_ratios
from gradmon.sharding import full_grads_and_weights


@dataclass(eq=False)
class _Pending:
    """What one logging step captured before the optimizer step, completed after it."""

    step: int
    total_tag: str
    grads: Norms
    weights: Norms | None
    snapshot: WeightSnapshot | None


@dataclass(eq=False)
class _Sent:
    """Logging steps whose numbers are on their way to the host."""

    records: list[_Pending]
    updates: list[Norms | None]
    norms: list[Norms]
    copy: HostCopy | None  # None when every number was already on the host


class GradNormMonitor(Callback):
    r"""Log per-layer gradient norms, weight norms and update-to-weight ratios to every logger of the Trainer.

    Computed in ``on_before_optimizer_step``: after AMP unscaling and gradient accumulation, before gradient
    clipping, once per optimizer step. Gradients are grouped by (device, dtype) and reduced with one fused
    ``torch._foreach_norm`` per group; steps that do not log cost nothing, and a logging step sends all its values to
    the host in one non-blocking copy, read (and written to the loggers) at the end of the next batch, so no step
    waits for the device (whole tensors of one dtype in host memory have no device to wait for: their norms are read
    as they are taken, and written at the same point).

    A *layer* is the module that owns the parameters (``net.0`` for ``net.0.weight`` and ``net.0.bias``); a parameter
    registered on the root module is its own layer; ``group_by="parameter"`` logs every parameter separately.
    Names are the user's: pieces inserted by ``torch.compile`` (``_orig_mod``), FSDP and activation checkpointing
    are dropped. Tied weights count once. Parameters without a gradient at a step (frozen, or unused) are left out of
    that step; a parameter unfrozen during training (``requires_grad`` flipped, or a parameter group added, as
    Lightning's ``BackboneFinetuning`` does) is monitored from its first gradient on.

    Logged every ``log_every_n_steps`` optimizer steps, counted per optimizer (each optimizer's steps 0, n, 2n, ...;
    with one optimizer the global steps 0, n, 2n, ...; default: the Trainer's ``log_every_n_steps``), with
    ``trainer.global_step`` of the step being taken as the step axis:

    - ``grad_norm/<layer>`` and ``grad_norm/total``: p-norm of the gradients (``norm_type``, default 2), the total
      over every gradient the optimizer is about to apply. With several optimizers each has its own total,
      ``grad_norm/total-<optimizer>``, named as Lightning's ``LearningRateMonitor`` names them (``Adam``,
      ``Adam-1``, ...), and ``log_every_n_steps`` counts each optimizer's own steps.
    - ``grad_norm_log10/<layer>``: its log10, for charts where layers span many orders of magnitude (left out for a
      zero or non-finite norm).
    - ``weight_norm/<layer>``: p-norm of the weights the gradient was computed at (``log_weight_norms``).
    - ``update_ratio/<layer>`` and ``update_ratio_log10/<layer>``: ||w_after - w_before|| / ||w_before|| of the step
      just taken, whatever the optimizer (``log_update_ratios``; the weights are copied on logging steps only).
    - ``grad_hist/<layer>`` and ``weight_hist/<layer>``: histograms, every ``histogram_every_n_steps`` steps (off by
      default), to TensorBoard loggers only; other loggers get their scalars and one message. Non-finite values are
      left out of a histogram and counted in ``grad_hist_nonfinite/<layer>`` / ``weight_hist_nonfinite/<layer>``
      (logged only when there are any).

    A TensorBoard custom-scalars layout is written once per run so that every layer of a metric shows as one multi-line
    chart (see :data:`gradmon.tags.LAYOUT_CHARTS`; every tag's name is in :mod:`gradmon.tags`). Values go straight to
    ``trainer.loggers`` (TensorBoard ones as a single summary per step), never through ``LightningModule.log``.

    Under DDP every rank computes and rank 0 logs. Under FSDP2 (``ModelParallelStrategy``, DTensor gradients) each
    layer's norm is that of the full gradient, combined across ranks with one collective per logging step.

    Example::

        from gradmon import GradNormMonitor
        trainer = Trainer(callbacks=[GradNormMonitor(log_every_n_steps=50)])

    Args:
        norm_type: order p of the norm: any number p > 0, or ``"inf"`` (``float("inf")``).
        group_by: ``"layer"`` (one value per module that owns parameters) or ``"parameter"`` (one per parameter).
        log_every_n_steps: log every this many optimizer steps, counted per optimizer; None takes the Trainer's
            ``log_every_n_steps``.
        histogram_every_n_steps: write gradient and weight histograms every this many optimizer steps, counted per
            optimizer; None (the default) writes none.
        log_weight_norms: log ``weight_norm/<layer>``.
        log_update_ratios: log ``update_ratio/<layer>`` and ``update_ratio_log10/<layer>``.

    Raises:
        ValueError: naming the argument, for a ``norm_type`` that is not a number p > 0 or ``"inf"``, a ``group_by``
            other than ``"layer"`` or ``"parameter"``, or an interval that is not an integer of at least 1.
        TypeError: for ``log_weight_norms`` or ``log_update_ratios`` other than ``True`` or ``False``.
    """

    def __init__(
        self,
        norm_type: float | str = 2.0,
        group_by: GroupBy = "layer",
        log_every_n_steps: int | None = None,
        histogram_every_n_steps: int | None = None,
        log_weight_norms: bool = True,
        log_update_ratios: bool = True,
        images_every_n_logs: int | None = 10,
    ) -> None:
        self.norm_type = check_norm_type("norm_type", norm_type)
        self.group_by: GroupBy = check_choice("group_by", group_by, ("layer", "parameter"))
        self._every = Every("log_every_n_steps", log_every_n_steps)
        self._histograms = Every("histogram_every_n_steps", histogram_every_n_steps, none="never")
        self.log_every_n_steps, self.histogram_every_n_steps = self._every.n, self._histograms.n
        self.log_weight_norms = check_bool("log_weight_norms", log_weight_norms)
        self.log_update_ratios = check_bool("log_update_ratios", log_update_ratios)
        self.images_every_n_logs = check_int("images_every_n_logs", images_every_n_logs, 1, allow_none=True)
        self._logs = 0
        self.source = GradNormSource(self.norm_type, self.group_by)
        self._steps = OptimizerSteps()
        self._done: tuple[int, int] | None = None
        self._pending: list[_Pending] = []
        self._in_flight: list[_Sent] = []
        self._layout_written = False
        self._no_histograms: set[int] = set()

    @cached_property  # Lightning reads it around every hook call
    def state_key(self) -> str:
        return self._generate_state_key(norm_type=self.norm_type, group_by=self.group_by)

    def grad_norms(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
                   ) -> Norms | None:
        """This step's gradient norms for ``optimizer``'s parameters, computed once and shared (no host sync)."""
        return self.source.grad_norms(trainer.global_step, pl_module, optimizer)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before Lightning restores callback state: a fresh fit counts from zero, a resumed one gets its counts back.
        if stage == "fit":
            self._steps.reset()
            # Offered to the Trainer's other callbacks: the norms (a GradHealthMonitor with the same settings reuses
            # them), a look at the gradients before a GradHealthMonitor discards them, and the layout's charts.
            board = _shared.shared_board(trainer)
            board.join(self)
            board.offer_norms(self.source)
            board.before_discard.append(self.on_before_optimizer_step)
            board.charts.update(tags.LAYOUT_CHARTS)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer_steps": self._steps.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._steps.load_state_dict(state_dict.get("optimizer_steps", {}))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.source.reset(trainer)
        self._done = None
        self._every.start(trainer)
        self._pending = []
        self._in_flight = []
        self._layout_written = False
        self._logs = 0
        figure_board(trainer).enabled = self.images_every_n_logs is not None
        if not any(p.requires_grad for p in pl_module.parameters()):
            rank_zero_warn("GradNormMonitor: the model has no trainable parameters; there are no gradients to log.")

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        done = (id(optimizer), step)
        if done == self._done:  # already taken, before a GradHealthMonitor discarded the gradients
            return
        self._done = done
        index, count = self._steps.advance(trainer, optimizer, step)  # counted even unlogged: a resume may add a logger
        log, hist = self._every.due(count), self._histograms.due(count)
        if not (log or hist) or not trainer.loggers:
            return
        grads = self.grad_norms(trainer, pl_module, optimizer)
        if grads is None:
            return
        if hist:
            self._log_histograms(trainer, grads, step)
        if not log:
            return
        weights = snapshot = None
        if self.log_update_ratios:
            # The weights before the step: their norms and the update are taken from this copy after the step.
            snapshot = WeightSnapshot(grads.layout, grads.order)
        elif self.log_weight_norms:
            weights = compute_norms(grads.layout, [p.detach() for p in grads.layout.params], grads.order)
        optimizers = trainer.optimizers
        total_tag = tags.total_tag(optimizer_names(optimizers)[index] if len(optimizers) > 1 else None)
        self._pending.append(_Pending(step, total_tag, grads, weights, snapshot))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # Numbers sent at the end of the last logging batch are surely on the host by now: log them, then send
        # this batch's. Reading them at once would make the host wait for the device.
        if not self._in_flight and not self._pending:  # most batches
            return
        arrived, self._in_flight = self._in_flight, []
        if self._pending:
            self._in_flight.append(self._send())
        for sent in arrived:
            self._log(trainer, sent)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # A run that ends in an exception (a GradientHealthError, say) still gets the numbers it measured.
        self.on_train_end(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending:
            self._in_flight.append(self._send())
        arrived, self._in_flight = self._in_flight, []
        for sent in arrived:
            self._log(trainer, sent)
        if self.images_every_n_logs is not None and trainer.is_global_zero:
            board = figure_board(trainer)
            board.draw(trainer, trainer.global_step)
            board.finish()

    def _send(self) -> _Sent:
        """Finish the captured steps on the device (weight and update norms) and start one non-blocking copy of all
        their numbers to the host (none when they are all there already: read as taken in host memory, or read by a
        GradHealthMonitor)."""
        pending, self._pending = self._pending, []
        updates: list[Norms | None] = []
        for record in pending:
            if record.snapshot is None:
                updates.append(None)
                continue
            record.weights, update = record.snapshot.finish()
            updates.append(update)
        norms = [n for r, u in zip(pending, updates) for n in (r.grads, r.weights, u) if n is not None]
        if all(n.on_host for n in norms):  # already read: nothing to copy
            return _Sent(pending, updates, norms, None)
        return _Sent(pending, updates, norms, HostCopy(concatenated(norms)))

    def _log(self, trainer: pl.Trainer, sent: _Sent) -> None:
        if sent.copy is not None:
            hand_out(sent.norms, sent.copy.values())
        if not trainer.is_global_zero:
            return
        for record, update in zip(sent.records, sent.updates):
            values = self._metrics(record, update)
            if not self._layout_written:  # the charts of the layers this run logs, a dozen lines at most each
                _shared.write_layout(trainer, tags.banded_charts(tags.LAYOUT_CHARTS, list(values)))
                self._layout_written = True
            _logging.log_scalars(trainer, values, record.step)
            self._logs += 1
            if self.images_every_n_logs is not None and self._logs % self.images_every_n_logs == 0:
                figure_board(trainer).draw(trainer, record.step)

    def _metrics(self, record: _Pending, update: Norms | None) -> dict[str, float]:
        grad_layers, total = record.grads.per_layer()
        values: dict[str, float] = {}
        for layer, norm in grad_layers.items():
            values[tags.tag(tags.GRAD_NORM, layer)] = norm
        values[record.total_tag] = total
        _add_log10(values, tags.GRAD_NORM_LOG10, grad_layers)
        if record.weights is not None:
            weight_layers, _ = record.weights.per_layer()
            if self.log_weight_norms:
                values.update({tags.tag(tags.WEIGHT_NORM, layer): norm for layer, norm in weight_layers.items()})
            if update is not None:
                ratios = update_ratios(record.weights, update)
                values.update({tags.tag(tags.UPDATE_RATIO, layer): r for layer, r in ratios.items()})
                _add_log10(values, tags.UPDATE_RATIO_LOG10, ratios)
        return values

    def _log_histograms(self, trainer: pl.Trainer, grads: Norms, step: int) -> None:
        layout = grads.layout
        # Whole tensors on every rank (a collective under FSDP1 and FSDP2: every rank takes part, rank 0 writes).
        full_grads, full_weights = full_grads_and_weights(layout)
        if not trainer.is_global_zero:
            return
        grad_parts: dict[str, list[torch.Tensor]] = {}
        weight_parts: dict[str, list[torch.Tensor]] = {}
        for p, layer, grad, weight in zip(layout.params, layout.param_layers, full_grads, full_weights):
            if p.grad is not None or layout.sharded:
                grad_parts.setdefault(layer, []).append(grad)
            weight_parts.setdefault(layer, []).append(weight)
        tensors = {tags.tag(tags.GRAD_HIST, layer): torch.cat(parts) for layer, parts in grad_parts.items()}
        tensors.update({tags.tag(tags.WEIGHT_HIST, layer): torch.cat(parts) for layer, parts in weight_parts.items()})
        _logging.log_histograms(trainer, tensors, step, self._no_histograms)


def _add_log10(values: dict[str, float], prefix: str, per_layer: dict[str, float]) -> None:
    for layer, v in per_layer.items():
        if v > 0 and math.isfinite(v):
            values[tags.tag(prefix, layer)] = math.log10(v)

