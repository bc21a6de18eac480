"""Warning and error types raised by gradmon."""

from __future__ import annotations


class GradientHealthWarning(UserWarning):
    """Issued when gradients are vanishing, exploding or non-finite, and when a gradient check fails."""


class GradientHealthError(RuntimeError):
    """Raised when a monitor's action is ``"raise"``; the message names the step, the layers and their values."""
