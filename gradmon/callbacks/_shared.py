"""What the gradmon callbacks of one Trainer offer each other, without importing each other.

A board per Trainer (``trainer._gradmon_shared``, made on first use, as :mod:`gradmon.callbacks._diagnosis` keeps
its board), on which callbacks register what others may use:

- norm sources, by ``(norm_type, group_by)``: a :class:`~gradmon.GradNormMonitor` offers its per-step gradient norms,
  and a :class:`~gradmon.GradHealthMonitor` with the same settings reuses them instead of computing its own;
- "before the gradients are discarded" hooks, ``hook(trainer, pl_module, optimizer)``: whoever discards a step's
  gradients (GradHealthMonitor's ``"skip"``) calls them first, so that a callback that reads the gradients in
  ``on_before_optimizer_step`` and runs after it (GradNormMonitor) takes its numbers of the step anyway;
- TensorBoard custom-scalars charts: TensorBoard shows only the last layout a run wrote, so every callback that writes
  one writes every chart registered so far (:func:`write_layout`), and whichever writes last has them all; their
  categories are titled for the model (:func:`gradmon.tags.for_model`), as TensorBoard merges the layouts of a logdir.

Callbacks join at ``setup`` of every fit: the first to join again starts a new fit with an empty board.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch

from gradmon import tags
from gradmon.callbacks import _logging
from gradmon.callbacks._boards import trainer_board
from gradmon.naming import model_label

#: Called with ``(trainer, pl_module, optimizer)`` before a step's gradients are discarded.
BeforeDiscard = Callable[[pl.Trainer, pl.LightningModule, torch.optim.Optimizer], None]
Charts = Mapping[str, list[tuple[str, str]]]


class SharedBoard:
    """One Trainer's registry of norm sources, before-discard hooks and layout charts."""

    def __init__(self) -> None:
        self.norm_sources: dict[tuple[float, str], Any] = {}
        self.before_discard: list[BeforeDiscard] = []
        self.charts: dict[str, list[tuple[str, str]]] = {}
        self._members: set[int] = set()

    def join(self, callback: object) -> None:
        """Called by each callback as a fit is set up: the first callback to join again starts a new fit."""
        if id(callback) in self._members:
            self.__init__()  # type: ignore[misc]
        self._members.add(id(callback))

    def offer_norms(self, source: Any) -> None:
        """Offer a norm source (``norm_type``, ``group_by``, ``grad_norms(step, pl_module, optimizer)``); the first
        one offered for its settings is the one used."""
        self.norm_sources.setdefault((source.norm_type, source.group_by), source)

    def norm_source(self, norm_type: float, group_by: str) -> Any:
        """The source offered for these settings, or ``None``."""
        return self.norm_sources.get((norm_type, group_by))

    def discarding(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        """Call every before-discard hook: the step's gradients are about to be discarded."""
        for hook in self.before_discard:
            hook(trainer, pl_module, optimizer)


def shared_board(trainer: pl.Trainer) -> SharedBoard:
    """The Trainer's board, made on first use."""
    return trainer_board(trainer, "_gradmon_shared", SharedBoard)


def write_layout(trainer: pl.Trainer, charts: Charts) -> None:
    """Register ``charts`` and write every chart registered on the Trainer as one custom-scalars layout."""
    board = shared_board(trainer)
    board.charts.update(charts)
    module = trainer.lightning_module
    _logging.write_layout(trainer, tags.for_model(board.charts, model_label(module.named_parameters(),
                                                                          type(module).__name__)))
