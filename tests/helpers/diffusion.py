"""Tiny diffusion models and image streams for the erasure tests."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import TensorDataset

from lightning_forget.datamodules.base import ContinualDataModule
from lightning_forget.modules.diffusion import DiffusionModule, digits_data

#: The smallest UNets that keep every part (two levels, cross-attention, class embedding).
TINY_UNET = {"preset": None, "sample_size": 8, "in_channels": 1, "block_out_channels": [8], "norm_num_groups": 4,
             "cross_attention_dim": 8, "attention_head_dim": 4, "num_train_timesteps": 50, "sample_steps": 3}


def tiny_diffusion(dm: Any = None, unet: str = "conditional", **kwargs: Any) -> DiffusionModule:
    """A ~20k-parameter DiffusionModule on 8×8 images (``num_classes`` from the stream, else 6)."""
    num_classes = getattr(dm, "num_classes", 6)
    return DiffusionModule(unet=unet, num_classes=num_classes, **{**TINY_UNET, **kwargs})


class DigitImageStream(ContinualDataModule):
    """scikit-learn digits 0..(2·num_tasks − 1) as 8×8 images in [-1, 1], two classes per task (8 training images
    per class, batches of 8, so 2 batches per task-epoch: a 3-task × 2-epoch stream is 12 steps)."""

    def __init__(self, num_tasks: int = 3, epochs_per_task: int = 1, batch_size: int = 8, seed: int = 0,
                 samples_per_class: int = 8, task: int | None = None) -> None:
        super().__init__(num_tasks=num_tasks, epochs_per_task=epochs_per_task, batch_size=batch_size, seed=seed, task=task)
        self.num_classes = 2 * num_tasks
        self.input_shape = (1, 8, 8)
        x, y = digits_data()
        self._data = {}
        for split, offset, n in (("train", 0, samples_per_class), ("val", samples_per_class, samples_per_class // 2)):
            rows = torch.cat([(y == c).nonzero().flatten()[offset:offset + n] for c in range(self.num_classes)])
            self._data[split] = (x[rows], y[rows])

    def classes_of_task(self, task: int) -> list[int]:
        return [2 * task, 2 * task + 1]

    def _subset(self, split: str, task: int) -> TensorDataset:
        x, y = self._data[split]
        keep = (y == 2 * task) | (y == 2 * task + 1)
        return TensorDataset(x[keep], y[keep])

    def train_dataset(self, task: int) -> TensorDataset:
        return self._subset("train", task)

    def val_dataset(self, task: int) -> TensorDataset:
        return self._subset("val", task)
