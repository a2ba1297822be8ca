"""The offline presets (SplitMNIST, SplitDigits, PermutedMNIST, RotatedMNIST): sizes, items, configuration."""

from __future__ import annotations

import json
import pickle

import numpy as np
import torch

from lightning_forget.datamodules import ContinualDataModule, SplitDigits, SplitMNIST
from tests.helpers.datamodules import DIGIT_COUNTS, inputs_of, labels_of


def test_split_sizes_of_the_embedded_sets() -> None:
    mnist = SplitMNIST()
    train = sum(len(mnist.train_dataset(t)) for t in range(5))
    val = sum(len(mnist.val_dataset(t)) for t in range(5))
    assert (train, val) == (4000, 1000)
    assert all(len(mnist.val_dataset(t)) == 200 for t in range(5))
    assert torch.equal(torch.bincount(labels_of(mnist.val_dataset(0))), torch.tensor([100, 100]))

    digits = SplitDigits(classes_per_task=10)
    val_counts = torch.bincount(labels_of(digits.val_dataset(0)), minlength=10).tolist()
    assert val_counts == [int(np.floor(n * 0.2 + 0.5)) for n in DIGIT_COUNTS]
    assert len(digits.train_dataset(0)) + len(digits.val_dataset(0)) == sum(DIGIT_COUNTS)
    # the split is a function of the seed
    assert torch.equal(inputs_of(SplitDigits(classes_per_task=10).val_dataset(0)), inputs_of(digits.val_dataset(0)))
    assert not torch.equal(inputs_of(SplitDigits(classes_per_task=10, seed=1).val_dataset(0)), inputs_of(digits.val_dataset(0)))

def test_items_are_float_inputs_and_long_scalar_labels_normalised() -> None:
    for dm, shape in ((SplitMNIST(), (1, 28, 28)), (SplitDigits(), (1, 8, 8))):
        x, y = dm.train_dataset(0)[0]
        assert x.dtype == torch.float32 and tuple(x.shape) == shape
        assert y.dtype == torch.long and y.ndim == 0
        every = torch.cat([inputs_of(dm.train_dataset(t)) for t in range(dm.num_tasks)])
        assert abs(every.mean().item()) < 0.05 and abs(every.std().item() - 1) < 0.05
    assert pickle.loads(pickle.dumps(SplitDigits().train_dataset(0)))[0][1].dtype == torch.long

def test_jsonargparse_builds_the_datamodules_from_config() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(ContinualDataModule, "data")
    configs = [
        ("SplitDigits", {"classes_per_task": [4, 3, 3], "shuffle_classes": True, "seed": 1}),
        ("RotatedMNIST", {"angles": [0, 45.5], "batch_size": 8}),
        ("PermutedMNIST", {"num_tasks": 2}),
        ("SplitMNIST", {"class_order": [1, 0, 3, 2, 5, 4, 7, 6, 9, 8]}),
    ]
    for name, init_args in configs:
        config = {"class_path": f"lightning_forget.datamodules.{name}", "init_args": init_args}
        dm = parser.instantiate_classes(parser.parse_args(["--data", json.dumps(config)])).data
        assert type(dm).__name__ == name
    assert dm.task_classes[0] == [1, 0]
