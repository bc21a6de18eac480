"""Warning and error types raised by gradmon."""

from __future__ import annotations

import warnings

import torch.distributed as dist


class GradientHealthWarning(UserWarning):
    """Issued when gradients are vanishing, exploding or non-finite, and when a gradient check fails."""


class GradientHealthError(RuntimeError):
    """Raised when a monitor's action is ``"raise"``; the message names the step, the layers and their values."""


_format_warning = warnings.formatwarning


def _format_health_warning(message, category, filename, lineno, line=None) -> str:  # type: ignore[no-untyped-def]
    """``GradientHealthWarning: <message>``: a health warning has no line of user code to point at (it is raised
    inside Lightning's loop), so the usual ``file:line:`` prefix would only show ``gradmon:0:``."""
    if isinstance(category, type) and issubclass(category, GradientHealthWarning):
        return f"{category.__name__}: {message}\n"
    return _format_warning(message, category, filename, lineno, line)


# Only GradientHealthWarning is formatted differently; every other warning goes through the previous formatter.
warnings.formatwarning = _format_health_warning


def warn_health(message: str) -> None:
    """Issue a :class:`GradientHealthWarning` from a callback, on rank 0 only in a distributed run (every rank
    reaches the same decision; one report is enough).

    Raised inside Lightning's loop there is no user line to point at, so the warning is attributed to ``gradmon``
    itself: the console shows the message alone, not a line of gradmon's source. Filters by category work as usual.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    warnings.warn_explicit(message, GradientHealthWarning, filename="gradmon", lineno=0, module="gradmon")
