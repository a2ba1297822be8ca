"""The torchvision sources (datamodules/sources.py) and the presets that read them, with a stand-in torchvision."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch

from lightning_forget.datamodules import PermutedMNIST, RotatedMNIST, SplitCIFAR10, SplitCIFAR100, SplitMNIST
from tests.helpers.datamodules import FakeMNIST, fake_torchvision, labels_of, touch  # noqa: F401 (fixture)


def test_root_without_torchvision_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails as if not installed
    for make in (lambda: SplitMNIST(root=str(tmp_path)), lambda: SplitCIFAR10(root=str(tmp_path)), lambda: PermutedMNIST(root=str(tmp_path))):
        with pytest.raises(ImportError, match="pip install torchvision"):
            make()
    with pytest.raises(ValueError, match="`download=True` needs `root`"):
        SplitMNIST(download=True)
    with pytest.raises(ValueError, match="`root` is required"):
        SplitCIFAR100(root=None)  # type: ignore[arg-type]

def test_root_with_missing_files_names_them_and_the_fix(fake_torchvision: Any, tmp_path: Any) -> None:
    with pytest.raises(FileNotFoundError, match=r"MNIST files not found.*train-images-idx3-ubyte.*download=True"):
        SplitMNIST(root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"RotatedMNIST: MNIST files not found"):
        RotatedMNIST(root=str(tmp_path / "nowhere"))
    touch(tmp_path, "cifar-10-batches-py/data_batch_1")
    with pytest.raises(FileNotFoundError, match=r"missing: .*data_batch_2.*test_batch.*Fix: pass `download=True`"):
        SplitCIFAR10(root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python.train"):
        SplitCIFAR100(root=str(tmp_path))

def test_full_mnist_through_torchvision_api(fake_torchvision: Any, tmp_path: Any) -> None:
    dm = SplitMNIST(root=str(tmp_path), download=True)  # files appear in prepare_data
    dm.prepare_data()
    assert [(train, download) for _, train, download in FakeMNIST.calls] == [(True, True), (False, True)]
    dm.setup("fit")
    assert sum(len(dm.train_dataset(t)) for t in range(5)) == 80  # 100 train images, 20% validation
    assert sum(len(dm.val_dataset(t)) for t in range(5)) == 20
    assert sum(len(dm.test_dataset(t)) for t in range(5)) == 30  # the official test split
    x, y = dm.train_dataset(0)[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long
    assert x.min() >= -0.1307 / 0.3081 - 1e-5 and x.max() <= (1 - 0.1307) / 0.3081 + 1e-5
    on_test = PermutedMNIST(root=str(tmp_path), num_tasks=2, val_fraction=0.0)
    assert len(on_test.val_dataset(1)) == 30
