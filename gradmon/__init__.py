"""gradmon: gradient-health callbacks for PyTorch Lightning.

The pure-torch core (:mod:`gradmon.norms`, :mod:`gradmon.health`, :mod:`gradmon.init`, :mod:`gradmon.numerical`,
:mod:`gradmon.activations`, :mod:`gradmon.diagnosis`, :mod:`gradmon.tensorboard`) never imports Lightning; the
callbacks in :mod:`gradmon.callbacks` are thin adapters.
The public names below are imported lazily so that ``import gradmon.norms`` stays Lightning-free.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "GradNormMonitor": "gradmon.callbacks.grad_norm",
    "GradHealthMonitor": "gradmon.callbacks.grad_health",
    "WeightInit": "gradmon.callbacks.weight_init",
    "GradCheck": "gradmon.callbacks.grad_check",
    "ActivationMonitor": "gradmon.callbacks.activation_monitor",
    "HealthRules": "gradmon.health",
    "GradientHealthWarning": "gradmon.errors",
    "GradientHealthError": "gradmon.errors",
    "verdict": "gradmon.callbacks._diagnosis",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gradmon' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
