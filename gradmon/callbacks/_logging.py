"""Hand numbers to every logger in ``trainer.loggers``, TensorBoard ones through the cheap paths of
:mod:`gradmon.tensorboard`, the others through ``Logger.log_metrics``.

Never goes through ``LightningModule.log``: that path costs a metric object per key and a sync per value.
Call from rank 0 only (``trainer.is_global_zero``); the loggers are rank-zero objects.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from gradmon import tensorboard as tb


def log_scalars(trainer: Trainer, values: Mapping[str, float], step: int) -> None:
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            tb.write_scalars(logger.experiment, values, step)
        else:
            logger.log_metrics(dict(values), step=step)


def log_histograms(trainer: Trainer, tensors: Mapping[str, torch.Tensor], step: int, warned: set[int]) -> None:
    """Histograms go to TensorBoard loggers; each other logger is named once in ``warned`` and skipped."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            tb.write_histograms(logger.experiment, tensors, step)
        elif id(logger) not in warned:
            warned.add(id(logger))
            rank_zero_info(f"gradmon: {type(logger).__name__} has no histograms; logging only its scalars.")


def log_text(trainer: Trainer, tag: str, text: str, step: int = 0) -> None:
    """Text goes to TensorBoard loggers only (the others have no text channel)."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            tb.write_text(logger.experiment, tag, text, step)


def write_layout(trainer: Trainer) -> None:
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            tb.write_layout(logger.experiment)
