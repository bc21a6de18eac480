"""Warning and error types raised by gradmon."""

from __future__ import annotations

import sys
import warnings

import torch.distributed as dist


class GradientHealthWarning(UserWarning):
    """Issued when gradients are vanishing, exploding or non-finite, and when a gradient check fails."""


class GradientHealthError(RuntimeError):
    """Raised when a monitor's action is ``"raise"``; the message names the step, the layers and their values."""


#: Top-level packages whose frames a health warning is not attributed to: the line it names is the user's own.
_LIBRARIES = frozenset({"gradmon", "lightning", "pytorch_lightning", "lightning_fabric", "torch"})


def warn_health(message: str) -> None:
    """Issue a :class:`GradientHealthWarning` from a callback, on rank 0 only in a distributed run (every rank
    reaches the same decision; one report is enough).

    Raised inside Lightning's loop, the warning is attributed to the first line of the call stack outside gradmon,
    Lightning and torch: the user's ``trainer.fit(...)``. Python's default display then reads
    ``train.py:12: GradientHealthWarning: <message>`` followed by that line, as for any warning, and the process-wide
    ``warnings.formatwarning`` is left alone. Every call is shown (no once-per-location registry: each message names
    its own step); filters by category work as usual.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in _LIBRARIES:
        frame = frame.f_back
    if frame is None:  # nothing but library frames: name gradmon itself
        warnings.warn_explicit(message, GradientHealthWarning, filename="gradmon", lineno=0, module="gradmon")
        return
    warnings.warn_explicit(
        message,
        GradientHealthWarning,
        filename=frame.f_code.co_filename,
        lineno=frame.f_lineno,
        module=frame.f_globals.get("__name__", "<string>"),
        # No module_globals: a loader asked for the source of a module run with `python -m` raises ImportError;
        # the line is read from the file by its name instead.
    )
