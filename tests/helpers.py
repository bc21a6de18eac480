"""Small models, data and readers shared by the tests."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


class MLP(pl.LightningModule):
    """``depth`` hidden Linear layers of ``width`` then a 10-way head, under ``net`` (layers net.0, net.2, ...)."""

    def __init__(self, depth: int = 3, width: int = 16, in_features: int = 8, activation: str = "relu",
                 init: str | None = None, optimizer: str = "sgd", lr: float = 0.05) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = in_features
        for _ in range(depth):
            layers += [nn.Linear(d, width), ACTIVATIONS[activation]()]
            d = width
        layers.append(nn.Linear(d, 10))
        self.net = nn.Sequential(*layers)
        self.optimizer_name, self.lr = optimizer, lr
        for m in self.net:
            if isinstance(m, nn.Linear) and init is not None:
                if init == "kaiming":
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                elif init == "normal1":
                    nn.init.normal_(m.weight, std=1.0)
                else:
                    raise ValueError(init)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class ScaleGrad(torch.autograd.Function):
    """Identity forward, backward scaled by ``scale``: a wrong gradient autograd cannot see."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class WrongLinear(nn.Linear):
    """A Linear whose weight and bias gradients are ``scale`` times the true ones (a planted backward bug)."""

    def __init__(self, *args, scale: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = scale

    def forward(self, x):
        weight, bias = ScaleGrad.apply(self.weight, self.scale), ScaleGrad.apply(self.bias, self.scale)
        return nn.functional.linear(x, weight, bias)


def make_data(n: int, in_features: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g)
    y = (x @ torch.randn(in_features, 10, generator=g)).argmax(1)
    return x, y


def make_loader(batch_size: int = 16, steps: int = 8, in_features: int = 8, seed: int = 0):
    x, y = make_data(batch_size * steps, in_features, seed)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def trainer(tmp_path: Path | None = None, **kwargs) -> pl.Trainer:
    """A quiet CPU Trainer; TensorBoard logs under ``tmp_path/tb/version_0`` when a path is given."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=pl.loggers.TensorBoardLogger(tmp_path, name="tb", version=0) if tmp_path is not None else False,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def read_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """Every scalar tag of the event files under ``logdir``, as {tag: {step: value}}."""
    acc = accumulator(logdir)
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def accumulator(logdir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc
