"""Sample pools, label checks and the stratified split (datamodules/pools.py), through the streams that use them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from lightning_forget.datamodules import SplitDataModule, SplitDigits
from lightning_forget.datamodules.pools import stratified_split
from tests.helpers.datamodules import inputs_of, labels_of


def test_stratified_split_keeps_class_shares_and_is_seeded() -> None:
    labels = torch.arange(103) % 4
    a_train, a_val = stratified_split(labels, 0.3, torch.Generator().manual_seed(0))
    b_train, b_val = stratified_split(labels, 0.3, torch.Generator().manual_seed(0))
    c_train, _ = stratified_split(labels, 0.3, torch.Generator().manual_seed(1))
    assert torch.equal(a_train, b_train) and torch.equal(a_val, b_val) and not torch.equal(a_train, c_train)
    assert torch.equal(torch.cat([a_train, a_val]).sort().values, torch.arange(103))
    counts = torch.bincount(labels)
    expected = torch.floor(counts.double() * 0.3 + 0.5).long()
    assert torch.equal(torch.bincount(labels[a_val], minlength=4), expected)

def test_generic_sources_tensors_and_dataset_agree() -> None:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(120, 3, generator=generator), torch.arange(120) % 6
    from_tensors = SplitDataModule(train=(x, y), classes_per_task=3)
    from_arrays = SplitDataModule(train=(x.numpy(), y.numpy()), classes_per_task=3)

    class Plain(Dataset):  # no `targets`: labels are read once
        def __len__(self) -> int:
            return len(y)

        def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
            return x[i].numpy(), int(y[i])

    from_dataset = SplitDataModule(train=Plain(), classes_per_task=3)
    from_tensor_dataset = SplitDataModule(train=TensorDataset(x, y), classes_per_task=3)
    for dm in (from_tensors, from_arrays, from_dataset, from_tensor_dataset):
        assert dm.num_tasks == 2 and dm.num_classes == 6 and dm.input_shape == (3,)
        item_x, item_y = dm.train_dataset(1)[0]
        assert item_x.dtype == torch.float32 and item_y.dtype == torch.long and item_y.ndim == 0
        assert torch.equal(inputs_of(dm.val_dataset(1)), inputs_of(from_tensors.val_dataset(1)))
        assert set(labels_of(dm.train_dataset(1)).tolist()) == {3, 4, 5}
    given = SplitDataModule(train=(x, y), val=(x[:12], y[:12]), test=(x[:6], y[:6]), classes_per_task=2)
    assert len(given.train_dataset(0)) == 40 and len(given.val_dataset(0)) == 4 and len(given.test_dataset(0)) == 2

def test_source_errors() -> None:
    with pytest.raises(ValueError, match="`train` is required"):
        SplitDataModule(classes_per_task=2)
    with pytest.raises(ValueError, match="give `classes_per_task`"):
        SplitDataModule(train=(torch.zeros(4, 2), torch.arange(4)))
    with pytest.raises(TypeError, match="`train` must be an \\(X, y\\) pair.*got str"):
        SplitDataModule(train="mnist", classes_per_task=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"got X \(5, 2\) and y \(4,\)"):
        SplitDataModule(train=(torch.zeros(5, 2), torch.arange(4)), classes_per_task=1)
    with pytest.raises(ValueError, match="integer class ids.*0.5"):
        SplitDataModule(train=(torch.zeros(2, 2), torch.tensor([0.0, 0.5])), classes_per_task=1)
    with pytest.raises(ValueError, match="class ids >= 0, got -1"):
        SplitDataModule(train=(torch.zeros(2, 2), torch.tensor([0, -1])), classes_per_task=1)
    with pytest.raises(ValueError, match=r"task must be an int in \[0, 4\], got 7"):
        SplitDigits().classes_of_task(7)
