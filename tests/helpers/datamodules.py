"""Helpers of the datamodule tests: item readers and stand-ins for torchvision's datasets."""

from __future__ import annotations

import os
import types
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

import lightning_forget.datamodules.sources as sources_module

DIGIT_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
"""Images per digit in scikit-learn's digits."""


def labels_of(dataset: Dataset) -> torch.Tensor:
    return torch.stack([dataset[i][1] for i in range(len(dataset))])  # type: ignore[arg-type]


def inputs_of(dataset: Dataset) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in range(len(dataset))])  # type: ignore[arg-type]


class FakeMNIST:
    """Stands in for torchvision.datasets.MNIST: same attributes, tiny random data."""

    calls: list[tuple[str, bool, bool]] = []

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        type(self).calls.append((root, train, download))
        if download:
            raw = os.path.join(root, "MNIST", "raw")
            os.makedirs(raw, exist_ok=True)
            for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
                open(os.path.join(raw, name), "wb").close()
        size = 100 if train else 30
        generator = torch.Generator().manual_seed(int(train))
        self.data = torch.randint(0, 256, (size, 28, 28), dtype=torch.uint8, generator=generator)
        self.targets = torch.arange(size) % 10


class FakeCIFAR10:
    classes = 10

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        size = 50 if train else 20
        self.data = np.random.default_rng(int(train)).integers(0, 256, (size, 32, 32, 3), dtype=np.uint8)
        self.targets = [i % self.classes for i in range(size)]


class FakeCIFAR100(FakeCIFAR10):
    classes = 100

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        size = 200 if train else 100
        self.data = np.random.default_rng(int(train)).integers(0, 256, (size, 32, 32, 3), dtype=np.uint8)
        self.targets = [i % self.classes for i in range(size)]


@pytest.fixture
def fake_torchvision(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    fake = types.SimpleNamespace(datasets=types.SimpleNamespace(MNIST=FakeMNIST, CIFAR10=FakeCIFAR10, CIFAR100=FakeCIFAR100))
    monkeypatch.setattr(sources_module, "import_torchvision", lambda purpose: fake)
    FakeMNIST.calls = []
    return fake


def touch(root: Any, *paths: str) -> None:
    for path in paths:
        full = os.path.join(str(root), path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        open(full, "wb").close()
