"""Hand numbers to every logger in ``trainer.loggers``, TensorBoard ones through the cheap paths of
:mod:`gradmon.tensorboard`, the others through ``Logger.log_metrics``; Weights & Biases ones also get histograms
(``wandb.Histogram``) and the texts as one table (``gradmon/texts``: step, tag, text).

Never goes through ``LightningModule.log``: that path costs a metric object per key and a sync per value.
Call from rank 0 only (``trainer.is_global_zero``); the loggers are rank-zero objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.fabric.utilities.logger import _add_prefix
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from gradmon import tags
from gradmon import tensorboard as tb
from gradmon.callbacks._boards import FIGURE_BOARD


def _prefixed(logger: TensorBoardLogger, values: Mapping[str, object]) -> Mapping[str, object]:
    """The tags the logger's own ``log_metrics`` would write: its ``prefix`` and ``-`` before each key."""
    prefix = getattr(logger, "_prefix", "")
    return _add_prefix(dict(values), prefix, logger.LOGGER_JOIN_CHAR) if prefix else values


def log_scalars(trainer: Trainer, values: Mapping[str, float], step: int) -> None:
    figures = getattr(trainer, FIGURE_BOARD, None)  # made by a callback that draws figures
    if figures is not None:
        figures.keep(values, step)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            tb.write_scalars(logger.experiment, _prefixed(logger, values), step)
        else:
            logger.log_metrics(dict(values), step=step)


def log_histograms(trainer: Trainer, tensors: Mapping[str, torch.Tensor], step: int, warned: set[int]) -> None:
    """Histograms go to TensorBoard loggers; each other logger is named once in ``warned`` and skipped.

    Non-finite values are left out of a histogram (TensorBoard cannot bin them); how many there were goes to every
    logger as ``<metric>_nonfinite/<layer>`` for the tag ``<metric>/<layer>``, when there are any.
    """
    nonfinite = {tag: tb.count_nonfinite(t) for tag, t in tensors.items()}
    counts = {_nonfinite_tag(tag): float(n) for tag, n in nonfinite.items() if n}
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            tb.write_histograms(logger.experiment, _prefixed(logger, tensors), step)
        elif _is_wandb(logger):
            import wandb

            histograms = {tag: wandb.Histogram(tb.finite_values(t).tolist()) for tag, t in tensors.items()}
            logger.log_metrics(histograms, step=step)
        elif id(logger) not in warned:
            warned.add(id(logger))
            rank_zero_info(f"gradmon: {type(logger).__name__} has no histograms; logging only its scalars.")
    if counts:
        log_scalars(trainer, counts, step)


def _nonfinite_tag(tag: str) -> str:
    metric, _, layer = tag.partition("/")
    return tags.tag(tags.nonfinite_count(metric), layer)


def log_text(trainer: Trainer, tag: str, text: str, step: int = 0) -> None:
    """Text goes to TensorBoard loggers, and to Weights & Biases ones as a row of the table ``gradmon/texts`` (step,
    tag, text; logged whole each time a row is added: a W&B table cannot grow once logged); the others have no text
    channel."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            tb.write_text(logger.experiment, tag, text, step)
        elif _is_wandb(logger):
            rows = logger.__dict__.setdefault("_gradmon_texts", [])  # this logger's rows so far
            rows.append([step, tag, text])
            logger.log_table(tags.WANDB_TEXTS, columns=["step", "tag", "text"], data=list(rows), step=step)


def log_table(trainer: Trainer, key: str, columns: list[str], rows: list[list[object]], step: int) -> None:
    """A table to the Weights & Biases loggers (the others have no table channel)."""
    for logger in trainer.loggers:
        if _is_wandb(logger) and rows:
            logger.log_table(key, columns=columns, data=rows, step=step)


def image_writers(trainer: Trainer, told: set[int]) -> list[Any]:
    """Where images go, each taking ``add_image(tag, image, step, dataformats)`` and ``flush()``: the writer of each
    TensorBoard logger and each Weights & Biases logger (as ``wandb.Image``); each other logger is named once in
    ``told``."""
    writers: list[Any] = []
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            writers.append(logger.experiment)
        elif _is_wandb(logger):
            writers.append(_WandbImages(logger))
        elif id(logger) not in told:
            told.add(id(logger))
            rank_zero_info(f"gradmon: {type(logger).__name__} takes no images; the figures go to TensorBoard and W&B "
                           "loggers only.")
    return writers


class _WandbImages:
    """A WandbLogger taking images as a SummaryWriter does: ``wandb.Image`` under the same tag."""

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def add_image(self, tag: str, image: Any, step: int, dataformats: str = "HWC") -> None:
        self.logger.log_image(tag, [image], step=step)

    def flush(self) -> None:
        return None


def _is_wandb(logger: object) -> bool:
    """A Lightning ``WandbLogger``, told by its class name so that wandb stays an optional import."""
    return type(logger).__name__ == "WandbLogger"


def write_layout(trainer: Trainer, charts: Mapping[str, list[tuple[str, str]]] = tags.LAYOUT_CHARTS) -> None:
    """The custom-scalars layout of ``charts`` to every TensorBoard logger."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            prefix = getattr(logger, "_prefix", "")
            # The charts must pick the tags as written, prefix included.
            shown = tags.prefixed_charts(prefix + logger.LOGGER_JOIN_CHAR, dict(charts)) if prefix else charts
            tb.write_layout(logger.experiment, shown)
