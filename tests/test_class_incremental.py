"""SplitDataModule: class partitions, loaders and modes, argument errors, a real fit."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset

from lightning_forget.datamodules import SplitDataModule, SplitDigits, SplitMNIST
from tests.helpers.datamodules import DIGIT_COUNTS, labels_of
from tests.helpers.harness import quiet_trainer


def test_default_partition_is_disjoint_and_covers_all_classes() -> None:
    dm = SplitDigits()
    assert dm.num_tasks == 5 and dm.num_classes == 10 and dm.input_shape == (1, 8, 8)
    assert dm.task_classes == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    flat = [c for classes in dm.task_classes for c in classes]
    assert sorted(flat) == list(range(10)) and len(set(flat)) == len(flat)
    for t in range(dm.num_tasks):
        for dataset in (dm.train_dataset(t), dm.val_dataset(t), dm.test_dataset(t)):
            assert set(labels_of(dataset).tolist()) == set(dm.classes_of_task(t))

def test_class_order_uneven_tasks_and_derived_num_tasks() -> None:
    dm = SplitDigits(class_order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0], classes_per_task=[4, 3, 3])
    assert dm.num_tasks == 3 and dm.task_classes == [[9, 8, 7, 6], [5, 4, 3], [2, 1, 0]]
    assert set(labels_of(dm.train_dataset(1)).tolist()) == {3, 4, 5}
    assert SplitMNIST(num_tasks=2).task_classes == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert SplitMNIST(classes_per_task=5, num_tasks=2).num_tasks == 2
    assert SplitDigits(classes_per_task=1).num_tasks == 10

def test_shuffled_classes_are_a_seeded_permutation() -> None:
    first, again, other = (SplitDigits(shuffle_classes=True, seed=s).task_classes for s in (3, 3, 4))
    assert first == again
    assert first != other
    assert sorted(c for classes in first for c in classes) == list(range(10))
    assert first != SplitDigits().task_classes

def test_val_fraction_zero_validates_on_the_test_split() -> None:
    x, y = torch.randn(40, 2), torch.arange(40) % 2
    dm = SplitDataModule(train=(x, y), test=(x[:10], y[:10]), classes_per_task=1, val_fraction=0.0)
    assert len(dm.train_dataset(0)) == 20 and len(dm.val_dataset(0)) == 5

def test_val_dataloader_is_one_loader_per_task_and_test_too() -> None:
    dm = SplitDigits(batch_size=16, eval_batch_size=500)
    loaders = dm.val_dataloader()
    assert len(loaders) == dm.num_tasks == len(dm.test_dataloader())
    for t, loader in enumerate(loaders):
        (_, y), = list(loader)
        assert set(y.tolist()) == set(dm.classes_of_task(t))

def test_joint_mode_concatenates_every_task() -> None:
    dm = SplitDigits(joint=True)
    dataset = dm.train_dataloader().dataset
    assert isinstance(dataset, ConcatDataset)
    assert len(dataset) == sum(len(dm.train_dataset(t)) for t in range(5)) == sum(DIGIT_COUNTS) - 359
    assert dm.max_epochs == dm.epochs_per_task

@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"classes_per_task": 3}, r"classes_per_task=3 does not divide the 10 classes.*\[3, 3, 3, 1\]"),
        ({"classes_per_task": 0}, r"`classes_per_task` must be an int >= 1, got 0"),
        ({"classes_per_task": [4, 4]}, r"must sum to the 10 classes.*sum 8"),
        ({"num_tasks": 3}, r"num_tasks=3 does not divide the 10 classes"),
        ({"classes_per_task": 2, "num_tasks": 4}, r"num_tasks=4 disagrees with classes_per_task=2"),
        ({"class_order": [0, 1, 2]}, r"missing \[3, 4, 5, 6, 7, 8, 9\]"),
        ({"class_order": [0, 0, 1, 2, 3, 4, 5, 6, 7, 8]}, r"duplicates \[0\].*missing \[9\]"),
        ({"class_order": list(range(9)) + [12]}, r"unknown \[12\]"),
        ({"class_order": list(range(10)), "shuffle_classes": True}, r"either `class_order` or `shuffle_classes"),
        ({"val_fraction": 1.5}, r"`val_fraction` must be a number in \[0, 1\), got 1.5"),
        ({"val_fraction": 0.0}, r"`val_fraction=0` uses the test split"),
        ({"task": 5}, r"`task` must be in \[0, 4\]"),
    ],
)
def test_split_argument_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SplitDigits(**kwargs)

class _LabelRecorder(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(64, 10)
        self.train_labels: dict[int, set[int]] = defaultdict(set)
        self.val_labels: dict[int, set[int]] = defaultdict(set)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.train_labels[self.current_epoch].update(y.tolist())
        return F.cross_entropy(self.net(x.flatten(1)), y)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.val_labels[dataloader_idx].update(batch[1].tolist())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

def test_fit_trains_each_epoch_on_its_task_only(tmp_path: Path) -> None:
    dm = SplitDigits(epochs_per_task=2, batch_size=64)
    model = _LabelRecorder()
    quiet_trainer(tmp_path, [], max_epochs=dm.max_epochs).fit(model, datamodule=dm)
    assert sorted(model.train_labels) == list(range(10))
    for epoch, labels in model.train_labels.items():
        assert labels == set(dm.classes_of_task(epoch // dm.epochs_per_task)), epoch
    assert {t: sorted(labels) for t, labels in model.val_labels.items()} == dict(enumerate(dm.task_classes))

def test_fit_with_a_fixed_task_trains_only_that_task(tmp_path: Path) -> None:
    dm = SplitDigits(task=2, epochs_per_task=2, batch_size=64)
    assert dm.max_epochs == 2
    model = _LabelRecorder()
    quiet_trainer(tmp_path, [], max_epochs=dm.max_epochs).fit(model, datamodule=dm)
    assert model.train_labels == {0: {4, 5}, 1: {4, 5}}
    assert sorted(model.val_labels) == list(range(5))  # still evaluated on every task

def test_fit_without_reloading_loaders_is_refused(tmp_path: Path) -> None:
    dm = SplitDigits(batch_size=256)
    with pytest.raises(RuntimeError, match="reload_dataloaders_every_n_epochs=1"):
        quiet_trainer(tmp_path, [], max_epochs=dm.max_epochs, reload_dataloaders_every_n_epochs=0).fit(_LabelRecorder(), datamodule=dm)
