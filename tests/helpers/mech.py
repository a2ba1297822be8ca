"""Small fixtures for the shared-mechanism tests (gradients, step boundary, precision, RNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers.harness import quiet_trainer


class TinyRegressor(pl.LightningModule):
    """A linear regressor (optionally with dropout) trained with SGD on MSE."""

    def __init__(self, dropout: float = 0.0, lr: float = 0.1, in_dim: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, 8), nn.Dropout(dropout), nn.Linear(8, 1))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x).float(), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def regression_data(n: int = 24, in_dim: int = 3, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_dim, generator=gen)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=gen)
    return TensorDataset(x, y)


def regression_loader(n: int = 24, batch_size: int = 4, shuffle: bool = False, seed: int = 0) -> DataLoader:
    return DataLoader(
        regression_data(n, seed=seed),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
    )


def plain_trainer(tmp_path: Path, callbacks: list[Any], **kwargs: Any) -> pl.Trainer:
    """The shared quiet trainer with Lightning's own loader reloading and determinism defaults."""
    kwargs.setdefault("reload_dataloaders_every_n_epochs", 0)
    kwargs.setdefault("deterministic", False)
    return quiet_trainer(tmp_path, callbacks, **kwargs)
