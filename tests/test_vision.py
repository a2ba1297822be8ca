"""The CIFAR presets and their augmentation (datamodules/vision.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lightning_forget.datamodules import SplitCIFAR10, SplitCIFAR100
from lightning_forget.datamodules.vision import RandomCropFlip
from tests.helpers.datamodules import fake_torchvision, labels_of, touch  # noqa: F401 (fixture)


def test_cifar_through_torchvision_api(fake_torchvision: Any, tmp_path: Any) -> None:
    touch(tmp_path, *(f"cifar-10-batches-py/{n}" for n in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch", "batches.meta")))
    touch(tmp_path, "cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta")
    c10 = SplitCIFAR10(root=str(tmp_path), augment=True)
    assert c10.num_tasks == 5 and c10.input_shape == (3, 32, 32)
    assert len(c10.train_dataset(0)) == 10 and len(c10.val_dataset(0)) == 4  # val = official test split
    x, y = c10.train_dataset(0)[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    plain = SplitCIFAR10(root=str(tmp_path), val_fraction=0.2)
    assert len(plain.train_dataset(0)) == 8 and len(plain.val_dataset(0)) == 2 and len(plain.test_dataset(0)) == 4
    c100 = SplitCIFAR100(root=str(tmp_path), shuffle_classes=True)
    assert c100.num_tasks == 10 and len(c100.task_classes[0]) == 10
    assert set(labels_of(c100.train_dataset(3)).tolist()) == set(c100.classes_of_task(3))

def test_random_crop_flip_keeps_shape() -> None:
    torch.manual_seed(0)
    image = torch.randn(3, 8, 8)
    out = RandomCropFlip(padding=2)(image)
    assert out.shape == image.shape
    assert torch.equal(RandomCropFlip(padding=0, flip=False)(image), image)
    with pytest.raises(ValueError, match="`padding` must be a non-negative int, got -1"):
        RandomCropFlip(padding=-1)
