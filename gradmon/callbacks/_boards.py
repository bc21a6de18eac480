"""A board kept on a Trainer: how the gradmon callbacks of one Trainer share state without importing each other
(:mod:`gradmon.callbacks._shared`, :mod:`gradmon.callbacks._diagnosis`, :mod:`gradmon.callbacks._images`). It imports
nothing of gradmon's, so every one of them can use it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import lightning.pytorch as pl

T = TypeVar("T")
#: Where :mod:`gradmon.callbacks._images` keeps a Trainer's figure board (read by the logging of every scalar).
FIGURE_BOARD = "_gradmon_figures"


def trainer_board(trainer: pl.Trainer, attribute: str, make: Callable[[], T]) -> T:
    """The board kept on ``trainer`` as ``attribute``, made by ``make`` on first use."""
    board = getattr(trainer, attribute, None)
    if board is None:
        board = make()
        setattr(trainer, attribute, board)
    return board
