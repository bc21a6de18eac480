"""The model the training experiments share: a plain deep MLP classifier whose depth, activation and optimiser come
from the config, so that one variant differs from the next in exactly the setting under study."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from gradmon import WeightInit
from gradmon.init import format_scheme

ACTIVATIONS: dict[str, type[nn.Module]] = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}


def build_mlp(in_features: int, num_classes: int, depth: int, width: int, activation: str) -> nn.Sequential:
    """``depth`` hidden layers (Linear then activation) of ``width`` units, then a Linear to the classes.

    The Linear layers sit at the even indices 0, 2, ..., 2 * depth, so gradmon names them ``net.0`` (first, nearest
    the input) to ``net.{2 * depth}`` (the output layer).
    """
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(in_features if i == 0 else width, width), ACTIVATIONS[activation]()]
    layers.append(nn.Linear(width if depth else in_features, num_classes))
    return nn.Sequential(*layers)


def kaiming_mlp(in_features: int, num_classes: int, depth: int, width: int) -> nn.Sequential:
    """:func:`build_mlp` with ReLU, Kaiming-normal weights and zero biases: a deep net whose gradients stay healthy,
    so that the benchmarks time gradmon's healthy path."""
    model = build_mlp(in_features, num_classes, depth, width, "relu")
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)
    return model


class MLP(LightningModule):
    """A deep MLP trained with SGD on cross-entropy.

    Logs ``train/loss``, ``train/acc``, ``val/loss`` and ``val/acc`` (multiclass accuracy from torchmetrics), and its
    hyperparameters with the WeightInit schemes in use and ``hp/val_acc`` for TensorBoard's HPARAMS tab. It
    initialises its weights the PyTorch way; the experiments change that with the ``gradmon.WeightInit`` callback.

    Args:
        in_features: Input features (linked to the data module's ``num_features`` by the CLI).
        num_classes: Output classes (linked to the data module's ``num_classes`` by the CLI).
        depth: Hidden layers.
        width: Units per hidden layer.
        activation: ``"sigmoid"``, ``"tanh"`` or ``"relu"``.
        lr: SGD learning rate.
        momentum: SGD momentum.
    """

    def __init__(
        self,
        in_features: int = 64,
        num_classes: int = 10,
        depth: int = 16,
        width: int = 64,
        activation: str = "relu",
        lr: float = 0.01,
        momentum: float = 0.9,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"`activation={activation!r}` is not valid: expected one of {', '.join(ACTIVATIONS)}.")
        if depth < 0 or width < 1:
            raise ValueError(f"`depth={depth!r}`, `width={width!r}` are not valid: expected depth >= 0, width >= 1.")
        self.save_hyperparameters()
        self.net = build_mlp(in_features, num_classes, depth, width, activation)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")

    def on_fit_start(self) -> None:
        # The HPARAMS tab compares runs: the model's settings, each WeightInit scheme in use, and the final accuracy.
        if self.logger is None:
            return
        params = dict(self.hparams)
        inits = [cb for cb in self.trainer.callbacks if isinstance(cb, WeightInit)]
        for i, cb in enumerate(inits):
            params[f"weight_init_{i}"] = format_scheme(cb.scheme, cb.arguments)
        self.logger.log_hyperparams(params, {"hp/val_acc": 0.0})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", self.val_acc)
        self.log("hp/val_acc", self.val_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)
