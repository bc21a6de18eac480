"""Experiments that reproduce vanishing, exploding and initialisation effects, plus the overhead benchmark."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

#: Lightning's loggers, under the names its packages log with.
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric")


@contextlib.contextmanager
def lightning_quiet(level: int = logging.ERROR) -> Iterator[None]:
    """Lightning's loggers at ``level`` for the block, their own levels restored after it (a test that reads their
    INFO records may run next)."""
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, old in zip(loggers, levels):
            logger.setLevel(old)
