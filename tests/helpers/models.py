"""Tiny models for tests that need layers the MLP has not (BatchNorm2d)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_forget.modules import ContinualClassifier


class TinyConvNet(nn.Module):
    """Reads a flat ``dim``-vector as a ``(2, 2, dim // 4)`` image: 1x1 conv, BatchNorm2d, ReLU."""

    def __init__(self, dim: int = 8, channels: int = 4) -> None:
        super().__init__()
        self.dim = dim
        self.conv = nn.Conv2d(2, channels, 1)
        self.bn = nn.BatchNorm2d(channels)
        self.out_features = channels * 2 * (dim // 4)

    def forward(self, x: Tensor) -> Tensor:
        x = x.view(x.shape[0], 2, 2, self.dim // 4)
        return torch.flatten(torch.relu(self.bn(self.conv(x))), 1)


def conv_classifier(dm: Any, **kwargs: Any) -> ContinualClassifier:
    """A ContinualClassifier with :class:`TinyConvNet` for a flat-feature stream such as BlobStream."""
    kwargs.setdefault("report", False)
    return ContinualClassifier(
        backbone=TinyConvNet(dm.input_shape[0]), num_classes=dm.num_classes, input_shape=dm.input_shape,
        num_tasks=dm.num_tasks, **kwargs
    )
