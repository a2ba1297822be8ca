"""Tiny synthetic continual streams for fast tests."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from lightning_forget.datamodules import ContinualDataModule


class BlobStream(ContinualDataModule):
    """Class-incremental Gaussian blobs: ``num_tasks`` tasks × ``classes_per_task`` classes.

    Each class is a Gaussian around its own random centre in ``dim`` dimensions, so a linear
    model can learn every task, and tasks interfere through the shared head.
    """

    def __init__(
        self,
        num_tasks: int = 3,
        classes_per_task: int = 2,
        dim: int = 8,
        samples_per_class: int = 24,
        epochs_per_task: int = 1,
        batch_size: int = 8,
        seed: int = 0,
        joint: bool = False,
        task: int | None = None,
    ) -> None:
        super().__init__(num_tasks=num_tasks, epochs_per_task=epochs_per_task, batch_size=batch_size, seed=seed, joint=joint, task=task)
        self.classes_per_task = classes_per_task
        self.num_classes = num_tasks * classes_per_task
        self.input_shape = (dim,)
        gen = torch.Generator().manual_seed(1234)
        centres = 3.0 * torch.randn(self.num_classes, dim, generator=gen)
        self._data = {}
        for split, n in (("train", samples_per_class), ("val", samples_per_class // 2)):
            xs, ys = [], []
            for c in range(self.num_classes):
                xs.append(centres[c] + torch.randn(n, dim, generator=gen))
                ys.append(torch.full((n,), c, dtype=torch.long))
            self._data[split] = (torch.cat(xs), torch.cat(ys))

    def classes_of_task(self, task: int) -> list[int]:
        return list(range(task * self.classes_per_task, (task + 1) * self.classes_per_task))

    def _subset(self, split: str, task: int) -> TensorDataset:
        x, y = self._data[split]
        keep = (y >= task * self.classes_per_task) & (y < (task + 1) * self.classes_per_task)
        return TensorDataset(x[keep], y[keep])

    def train_dataset(self, task: int) -> TensorDataset:
        return self._subset("train", task)

    def val_dataset(self, task: int) -> TensorDataset:
        return self._subset("val", task)
