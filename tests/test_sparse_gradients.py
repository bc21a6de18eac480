"""Sparse gradients (``nn.Embedding(sparse=True)``): measured by their coalesced values, in every monitor."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import logdir, read_scalars, trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gradmon import ActivationMonitor, GradHealthMonitor, GradNormMonitor

STEPS = 3


class SparseEmbedding(pl.LightningModule):
    def __init__(self, nan_at: int | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8, sparse=True)
        self.head = nn.Linear(8, 3)
        self.nan_at = nan_at
        self.dense_norms: dict[int, float] = {}

    def training_step(self, batch, batch_idx):
        tokens, y = batch
        # Repeated tokens: the sparse gradient holds duplicate indices, summed when coalesced.
        return nn.functional.cross_entropy(self.head(self.emb(tokens).mean(1)), y)

    def on_after_backward(self) -> None:
        grad = self.emb.weight.grad
        assert grad.is_sparse
        if self.global_step == self.nan_at:
            grad._values()[0, 0] = math.nan
        self.dense_norms[self.global_step] = grad.to_dense().double().norm().item()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 10, (16 * STEPS, 6), generator=g)
    return DataLoader(TensorDataset(tokens, torch.randint(0, 3, (16 * STEPS,), generator=g)), batch_size=16)


def test_sparse_gradients_are_measured_by_every_monitor(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SparseEmbedding()
    health = GradHealthMonitor()
    callbacks = [GradNormMonitor(log_every_n_steps=1, histogram_every_n_steps=1), health,
                 ActivationMonitor(log_every_n_steps=1)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, max_steps=STEPS, callbacks=callbacks, log_every_n_steps=1).fit(model, loader())
    got = read_scalars(logdir(tmp_path))
    for step in range(STEPS):
        assert got["grad_norm/emb"][step] == pytest.approx(model.dense_norms[step], rel=1e-5)
    assert health.events == []
    assert any(tag.startswith("activation_rms/") for tag in got)


@pytest.mark.parametrize("sync_free", [False, True])
def test_a_nan_in_a_sparse_gradient_is_flagged_and_skipped(sync_free: bool) -> None:
    torch.manual_seed(0)
    model = SparseEmbedding(nan_at=1)
    health = GradHealthMonitor(on_nonfinite="skip", sync_free=sync_free)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_steps=STEPS, callbacks=[health]).fit(model, loader())
    assert [(e.step, e.layer, e.condition) for e in health.events] == [(1, "emb", "nonfinite")]
    assert health.skipped_steps == 1 and torch.isfinite(model.emb.weight).all()
