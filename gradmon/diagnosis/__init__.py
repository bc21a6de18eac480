"""Diagnosis: from what the monitors measured, say what is wrong, its likely cause, and what to change.

gradmon's monitors measure; this package reads the measurements together and names a cause, the way one would by
hand. It is three parts, each in its own module:

- :mod:`~gradmon.diagnosis.evidence`: what is measured (:class:`Evidence`): the weight layers in forward order,
  each with its fan-in, weight scale and the activation after it (:class:`LayerInfo`); the statistics of the
  modules' outputs and their gradients (:class:`gradmon.activations.ModuleStats`); per-layer gradient norms and
  update ratios; the optimizer (:class:`OptimizerInfo`); the loss; and what earlier observed steps showed
  (:class:`StepRecord`).
- :mod:`~gradmon.diagnosis.rules`: one function per cause, each with its thresholds named and justified;
  :func:`diagnose` runs them over one step's evidence and returns :class:`Finding` s.
- :mod:`~gradmon.diagnosis.text`: the words (:data:`CONDITIONS`, :data:`CAUSES`) and how a finding reads.

:mod:`~gradmon.diagnosis.verdict` keeps the verdict over a run (:class:`Diagnosis`): the root cause found when the
condition was first flagged, its consequences, replaced only by stronger evidence.

A plain loop::

    from gradmon.activations import ActivationRecorder
    from gradmon.diagnosis import Diagnosis, diagnose_model
    from gradmon.norms import layer_norms

    recorder, diagnosis = ActivationRecorder(model), Diagnosis()
    for step, (x, y) in enumerate(loader):
        if step % 100 == 0:
            with recorder:
                loss_fn(model(x), y).backward()
            findings = diagnose_model(model, recorder.stats(), step=step, grad_norms=layer_norms(model)[0])
            diagnosis.observe(step, findings)
        else:
            loss_fn(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    print(diagnosis.verdict.line() if diagnosis.verdict else "nothing found")

This package never imports Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from gradmon.activations import ModuleStats
from gradmon.diagnosis.evidence import (
    Evidence,
    LayerInfo,
    OptimizerInfo,
    RecurrentInfo,
    StepRecord,
    Trend,
    depth_trend,
    is_weight_layer,
    layer_structure,
    measure_layers,
    needed_gain,
    post_norm,
    recurrent_layers,
)
from gradmon.diagnosis.rules import diagnose
from gradmon.diagnosis.text import BASES, CAUSES, CLEARED, CONDITIONS, FIX_KEYS, Finding
from gradmon.diagnosis.verdict import Diagnosis, Verdict, explains
from gradmon.init import InitRecord

__all__ = [
    "BASES", "CAUSES", "CLEARED", "CONDITIONS", "FIX_KEYS", "Diagnosis", "Evidence", "Finding", "LayerInfo",
    "OptimizerInfo", "RecurrentInfo", "StepRecord", "Trend", "Verdict", "depth_trend", "diagnose", "diagnose_model",
    "explains", "is_weight_layer", "layer_structure", "measure_layers", "needed_gain", "post_norm",
    "recurrent_layers",
]


def diagnose_model(
    model: nn.Module,
    activations: Sequence[ModuleStats] = (),
    *,
    step: int = 0,
    grad_norms: Mapping[str, float] | None = None,
    update_ratios: Mapping[str, float] | None = None,
    init: Sequence[InitRecord] = (),
    optimizer: torch.optim.Optimizer | None = None,
    loss: float = float("nan"),
) -> list[Finding]:
    """:func:`diagnose` of ``model`` as it is now, with what a plain loop measured (see the package docstring).

    Args:
        model: The model.
        activations: Its recorded statistics (:meth:`gradmon.activations.ActivationRecorder.stats`).
        step: The step, for the findings.
        grad_norms: Gradient norms by layer (:func:`gradmon.norms.layer_norms`).
        update_ratios: Update ratios by layer, of the step just taken.
        init: What :func:`gradmon.init.initialize` did.
        optimizer: The optimizer, so that update ratios are read as it makes them.
        loss: The step's loss.

    Returns:
        The findings of the step.
    """
    order = [s.name for s in activations] or None
    layers = measure_layers(model, layer_structure(model, order))
    records = {r.layer: r for r in init if r.weight in ("weight", "")}
    return diagnose(Evidence(
        step, layers, tuple(activations), grad_norms, update_ratios, records or None,
        optimizer=OptimizerInfo.of(optimizer) if optimizer is not None else None, loss=loss,
        recurrent=tuple(recurrent_layers(model)), post_norm=post_norm(model, order),
    ))
