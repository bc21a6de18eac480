"""The rules: one function per cause, each reading :class:`~gradmon.diagnosis.evidence.Evidence` and returning the
findings it supports. Every threshold is a module constant with the reason for its value.

- :func:`nonfinite_values`: where NaN or inf first appear, and what made them (an operation on finite inputs, an
  overflowing activation, weights an earlier update overflowed).
- :func:`signal_through_depth`: the forward signal and the gradient fitted through depth, read against the scale
  the weights need (init too small, too large, a gain mismatch, saturating activations).
- :func:`recurrent_scale`: recurrent weights whose gain makes the gradient grow through time.
- :func:`saturated_units` and :func:`dead_units`: bounded activations stuck at their limits, ReLUs that never fire.
- :func:`learning_rate`: the update ratio read as the optimizer makes it (SGD moves a weight by lr x gradient, Adam by
  about lr), and divergence over the observed steps (the loss rising, the weights growing while it does not fall).

A rule reports a cause only when its own evidence supports it; when the evidence is ambiguous it reports the cause
``"unknown"`` with what was measured. Which finding is the root and which are its consequences is for
:mod:`gradmon.diagnosis.verdict`.
"""

from __future__ import annotations

from gradmon.diagnosis.evidence import Evidence
from gradmon.diagnosis.nonfinite import nonfinite_values
from gradmon.diagnosis.scale import recurrent_scale, signal_through_depth
from gradmon.diagnosis.text import Finding
from gradmon.diagnosis.training import collapse_behind_norms, learning_rate
from gradmon.diagnosis.units import dead_units, saturated_units

__all__ = [
    "collapse_behind_norms", "dead_units", "diagnose", "learning_rate", "nonfinite_values", "recurrent_scale",
    "saturated_units", "signal_through_depth",
]


def diagnose(evidence: Evidence) -> list[Finding]:
    """The findings of one step, the most severe first: non-finite values, the signal through depth, recurrent
    weights, saturated and dead units, the learning rate. A healthy step gives an empty list.

    Args:
        evidence: What the step offers.

    Returns:
        The findings; their roots and consequences are sorted out by :class:`gradmon.diagnosis.Diagnosis`.
    """
    nonfinite = nonfinite_values(evidence)
    if nonfinite is not None:
        return [nonfinite]
    findings = signal_through_depth(evidence)
    findings += collapse_behind_norms(evidence)
    findings += recurrent_scale(evidence)
    findings += saturated_units(evidence, findings)
    findings += dead_units(evidence, findings)
    findings += learning_rate(evidence, findings)
    return findings
