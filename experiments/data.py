"""The data every training experiment uses: sklearn's bundled 8x8 digits, so nothing is ever downloaded."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader, TensorDataset


class DigitsDataModule(LightningDataModule):
    """1797 8x8 images of handwritten digits, flattened to 64 features and standardised with the training split's
    mean and standard deviation; a stratified ``val_fraction`` is held out for validation.

    Args:
        batch_size: Samples per training and validation batch.
        val_fraction: Share of the samples held out for validation, in (0, 1).
        seed: Seed of the train/validation split, so every variant of an experiment sees the same split.
    """

    num_features = 64
    num_classes = 10

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"`val_fraction={val_fraction!r}` is not valid: expected a number in (0, 1).")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        x, y = load_digits(return_X_y=True)
        x_train, x_val, y_train, y_val = train_test_split(
            x, y, test_size=self.val_fraction, stratify=y, random_state=self.seed
        )
        scaler = StandardScaler().fit(x_train)
        self.train_set = _tensors(scaler.transform(x_train), y_train)
        self.val_set = _tensors(scaler.transform(x_val), y_val)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


def _tensors(x, y) -> TensorDataset:
    return TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long))
