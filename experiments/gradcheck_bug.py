"""A model with a planted wrong backward, for ``gradmon.GradCheck`` to catch.

The bug is the kind a hand-written ``torch.autograd.Function`` hides easily: the forward is right, every shape is
right, training even seems to run, but one layer's weight gradient comes out ten times too large, as if a sum over
ten micro-batches had never been averaged. Only comparing the gradient with finite differences of the loss shows it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from experiments.models import MLP

#: The layer that carries the bug, under the name gradmon reports it: the second Linear of the MLP.
PLANTED_LAYER = "net.2"


class _LinearWrongWeightGrad(torch.autograd.Function):
    """``F.linear`` whose backward returns ``scale`` times the true weight gradient; the input and bias gradients
    are right, so the layers before it still receive correct gradients and only this layer fails the check."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.scale = scale
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_weight = ctx.scale * grad_out.t() @ x  # the planted bug
        return grad_out @ weight, grad_weight, grad_out.sum(0), None


class LinearWrongWeightGrad(nn.Linear):
    """An ``nn.Linear`` (same parameters, same forward) whose weight gradient is ``scale`` times too large."""

    def __init__(self, in_features: int, out_features: int, scale: float = 10.0) -> None:
        super().__init__(in_features, out_features)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LinearWrongWeightGrad.apply(x, self.weight, self.bias, self.scale)


class GradCheckMLP(MLP):
    """The experiments' MLP with layer ``net.2`` swapped for :class:`LinearWrongWeightGrad` when ``buggy``.

    Args:
        buggy: Plant the wrong backward (``True``) or keep the plain ``nn.Linear`` (``False``).
        **kwargs: The :class:`~experiments.models.MLP` arguments; ``depth`` must be at least 2 so ``net.2`` is a
            hidden Linear.
    """

    def __init__(self, buggy: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        if self.hparams.depth < 2:
            raise ValueError(f"`depth={self.hparams.depth!r}` is not valid: expected depth >= 2 for {PLANTED_LAYER}.")
        if buggy:
            index = int(PLANTED_LAYER.split(".")[1])
            right = self.net[index]
            wrong = LinearWrongWeightGrad(right.in_features, right.out_features)
            wrong.load_state_dict(right.state_dict())
            self.net[index] = wrong
