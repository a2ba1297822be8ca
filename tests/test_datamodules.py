"""Class- and domain-incremental datamodules: partitions, splits, items, loaders, errors, a real fit."""

from __future__ import annotations

import json
import os
import pickle
import sys
import types
from collections import defaultdict
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, TensorDataset

import lightning_forget.datamodules.sources as sources_module
from lightning_forget.datamodules import (
    ContinualDataModule,
    DomainIncrementalDataModule,
    PermutedMNIST,
    RotatedMNIST,
    SplitCIFAR10,
    SplitCIFAR100,
    SplitDataModule,
    SplitDigits,
    SplitMNIST,
)
from lightning_forget.datamodules.split import rotate_images, stratified_split
from lightning_forget.datamodules.vision import RandomCropFlip

DIGIT_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def _labels(dataset: Dataset) -> torch.Tensor:
    return torch.stack([dataset[i][1] for i in range(len(dataset))])  # type: ignore[arg-type]


def _inputs(dataset: Dataset) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in range(len(dataset))])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- class partition
def test_default_partition_is_disjoint_and_covers_all_classes() -> None:
    dm = SplitDigits()
    assert dm.num_tasks == 5 and dm.num_classes == 10 and dm.input_shape == (1, 8, 8)
    assert dm.task_classes == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    flat = [c for classes in dm.task_classes for c in classes]
    assert sorted(flat) == list(range(10)) and len(set(flat)) == len(flat)
    for t in range(dm.num_tasks):
        for dataset in (dm.train_dataset(t), dm.val_dataset(t), dm.test_dataset(t)):
            assert set(_labels(dataset).tolist()) == set(dm.classes_of_task(t))


def test_class_order_uneven_tasks_and_derived_num_tasks() -> None:
    dm = SplitDigits(class_order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0], classes_per_task=[4, 3, 3])
    assert dm.num_tasks == 3 and dm.task_classes == [[9, 8, 7, 6], [5, 4, 3], [2, 1, 0]]
    assert set(_labels(dm.train_dataset(1)).tolist()) == {3, 4, 5}
    assert SplitMNIST(num_tasks=2).task_classes == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert SplitMNIST(classes_per_task=5, num_tasks=2).num_tasks == 2
    assert SplitDigits(classes_per_task=1).num_tasks == 10


def test_shuffled_classes_are_a_seeded_permutation() -> None:
    first, again, other = (SplitDigits(shuffle_classes=True, seed=s).task_classes for s in (3, 3, 4))
    assert first == again
    assert first != other
    assert sorted(c for classes in first for c in classes) == list(range(10))
    assert first != SplitDigits().task_classes


# --------------------------------------------------------------------------- splits and items
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


def test_split_sizes_of_the_embedded_sets() -> None:
    mnist = SplitMNIST()
    train = sum(len(mnist.train_dataset(t)) for t in range(5))
    val = sum(len(mnist.val_dataset(t)) for t in range(5))
    assert (train, val) == (4000, 1000)
    assert all(len(mnist.val_dataset(t)) == 200 for t in range(5))
    assert torch.equal(torch.bincount(_labels(mnist.val_dataset(0))), torch.tensor([100, 100]))

    digits = SplitDigits(classes_per_task=10)
    val_counts = torch.bincount(_labels(digits.val_dataset(0)), minlength=10).tolist()
    assert val_counts == [int(np.floor(n * 0.2 + 0.5)) for n in DIGIT_COUNTS]
    assert len(digits.train_dataset(0)) + len(digits.val_dataset(0)) == sum(DIGIT_COUNTS)
    # the split is a function of the seed
    assert torch.equal(_inputs(SplitDigits(classes_per_task=10).val_dataset(0)), _inputs(digits.val_dataset(0)))
    assert not torch.equal(_inputs(SplitDigits(classes_per_task=10, seed=1).val_dataset(0)), _inputs(digits.val_dataset(0)))


def test_items_are_float_inputs_and_long_scalar_labels_normalised() -> None:
    for dm, shape in ((SplitMNIST(), (1, 28, 28)), (SplitDigits(), (1, 8, 8))):
        x, y = dm.train_dataset(0)[0]
        assert x.dtype == torch.float32 and tuple(x.shape) == shape
        assert y.dtype == torch.long and y.ndim == 0
        every = torch.cat([_inputs(dm.train_dataset(t)) for t in range(dm.num_tasks)])
        assert abs(every.mean().item()) < 0.05 and abs(every.std().item() - 1) < 0.05
    assert pickle.loads(pickle.dumps(SplitDigits().train_dataset(0)))[0][1].dtype == torch.long


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
        assert torch.equal(_inputs(dm.val_dataset(1)), _inputs(from_tensors.val_dataset(1)))
        assert set(_labels(dm.train_dataset(1)).tolist()) == {3, 4, 5}
    given = SplitDataModule(train=(x, y), val=(x[:12], y[:12]), test=(x[:6], y[:6]), classes_per_task=2)
    assert len(given.train_dataset(0)) == 40 and len(given.val_dataset(0)) == 4 and len(given.test_dataset(0)) == 2


def test_val_fraction_zero_validates_on_the_test_split() -> None:
    x, y = torch.randn(40, 2), torch.arange(40) % 2
    dm = SplitDataModule(train=(x, y), test=(x[:10], y[:10]), classes_per_task=1, val_fraction=0.0)
    assert len(dm.train_dataset(0)) == 20 and len(dm.val_dataset(0)) == 5


# --------------------------------------------------------------------------- loaders and modes
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




# --------------------------------------------------------------------------- domain-incremental
def test_permuted_stream_identity_then_seeded_bijections() -> None:
    dm = PermutedMNIST(num_tasks=3)
    assert dm.num_tasks == 3 and dm.classes_of_task(2) == list(range(10)) and dm.task_permutation(0) is None
    base_x, base_y = _inputs(dm.val_dataset(0)), _labels(dm.val_dataset(0))
    reference = SplitMNIST(classes_per_task=10)
    assert torch.equal(base_x, _inputs(reference.val_dataset(0))) and torch.equal(base_y, _labels(reference.val_dataset(0)))
    perms = [dm.task_permutation(t) for t in (1, 2)]
    for t, perm in zip((1, 2), perms):
        assert perm is not None and torch.equal(perm.sort().values, torch.arange(784))
        assert torch.equal(perm, PermutedMNIST(num_tasks=3).task_permutation(t))
        x, y = _inputs(dm.val_dataset(t)), _labels(dm.val_dataset(t))
        assert torch.equal(y, base_y)
        assert torch.equal(x.flatten(1), base_x.flatten(1)[:, perm])
    assert not torch.equal(perms[0], perms[1])
    assert not torch.equal(perms[0], PermutedMNIST(num_tasks=3, seed=1).task_permutation(1))


def test_rotation_matches_rot90_and_keeps_background() -> None:
    image = torch.arange(36.0).view(1, 1, 6, 6)
    assert torch.allclose(rotate_images(image, 0.0), image, atol=1e-4)
    assert torch.allclose(rotate_images(image, 90.0), torch.rot90(image, 1, dims=(-2, -1)), atol=1e-4)
    assert torch.allclose(rotate_images(image, -90.0), torch.rot90(image, -1, dims=(-2, -1)), atol=1e-4)
    background = torch.full((1, 1, 6, 6), -0.5)  # a blank image stays blank, corners included
    assert torch.allclose(rotate_images(background, 45.0, fill=torch.full((1, 1, 1, 1), -0.5)), background)
    assert rotate_images(background, 45.0)[0, 0, 0, 0] == 0  # zero padding would not


def test_rotated_stream_angles_labels_and_cache() -> None:
    dm = RotatedMNIST(angles=[0.0, 90.0, 30.0])
    assert dm.num_tasks == 3 and [dm.task_angle(t) for t in range(3)] == [0.0, 90.0, 30.0]
    base_x, base_y = _inputs(dm.val_dataset(0)), _labels(dm.val_dataset(0))
    turned = dm.val_dataset(1)
    assert turned is dm.val_dataset(1)  # rotated once per task and split, then cached
    assert torch.equal(_labels(turned), base_y)
    assert torch.allclose(_inputs(turned), torch.rot90(base_x, 1, dims=(-2, -1)), atol=1e-4)
    seeded = RotatedMNIST(num_tasks=4, seed=2)
    angles = [seeded.task_angle(t) for t in range(4)]
    assert angles[0] == 0.0 and all(0 <= a < 180 for a in angles) and len(set(angles)) == 4
    assert angles == [RotatedMNIST(num_tasks=4, seed=2).task_angle(t) for t in range(4)]
    corner = _inputs(seeded.train_dataset(1))[:, 0, 0, 0]
    assert torch.allclose(corner, torch.full_like(corner, -0.1307 / 0.3081), atol=1e-3)


def test_domain_stream_over_generic_data() -> None:
    x, y = torch.rand(60, 5, 5), torch.arange(60) % 3
    dm = DomainIncrementalDataModule(train=(x, y), transform="rotate", num_tasks=2, val_fraction=0.5)
    assert dm.input_shape == (5, 5) and dm.task_classes == [[0, 1, 2], [0, 1, 2]]
    assert _inputs(dm.train_dataset(1)).shape == (30, 5, 5)
    flat = DomainIncrementalDataModule(train=TensorDataset(x.flatten(1), y), num_tasks=2)
    perm = flat.task_permutation(1)
    assert perm is not None and len(perm) == 25
    assert torch.equal(_inputs(flat.train_dataset(1)), _inputs(flat.train_dataset(0))[:, perm])


# --------------------------------------------------------------------------- errors
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


def test_domain_errors() -> None:
    data = (torch.zeros(10, 4), torch.arange(10) % 2)
    with pytest.raises(ValueError, match="`transform` must be 'permute' or 'rotate', got 'flip'"):
        DomainIncrementalDataModule(train=data, transform="flip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"needs image inputs.*got inputs of shape \(4,\)"):
        DomainIncrementalDataModule(train=data, transform="rotate")
    with pytest.raises(ValueError, match="`angles` only applies to transform='rotate'"):
        DomainIncrementalDataModule(train=data, angles=[0.0, 1.0])
    with pytest.raises(ValueError, match="must equal num_tasks=3; got 2 angles"):
        RotatedMNIST(num_tasks=3, angles=[0.0, 10.0])
    with pytest.raises(ValueError, match="`angles` must be a non-empty list of finite numbers"):
        RotatedMNIST(angles=[0.0, float("nan")])
    with pytest.raises(ValueError, match="`num_tasks` must be an int >= 1, got 0"):
        PermutedMNIST(num_tasks=0)


# --------------------------------------------------------------------------- torchvision sources
def test_root_without_torchvision_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails as if not installed
    for make in (lambda: SplitMNIST(root=str(tmp_path)), lambda: SplitCIFAR10(root=str(tmp_path)), lambda: PermutedMNIST(root=str(tmp_path))):
        with pytest.raises(ImportError, match="pip install torchvision"):
            make()
    with pytest.raises(ValueError, match="`download=True` needs `root`"):
        SplitMNIST(download=True)
    with pytest.raises(ValueError, match="`root` is required"):
        SplitCIFAR100(root=None)  # type: ignore[arg-type]


class _FakeMNIST:
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


class _FakeCIFAR10:
    classes = 10

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        size = 50 if train else 20
        self.data = np.random.default_rng(int(train)).integers(0, 256, (size, 32, 32, 3), dtype=np.uint8)
        self.targets = [i % self.classes for i in range(size)]


class _FakeCIFAR100(_FakeCIFAR10):
    classes = 100

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        size = 200 if train else 100
        self.data = np.random.default_rng(int(train)).integers(0, 256, (size, 32, 32, 3), dtype=np.uint8)
        self.targets = [i % self.classes for i in range(size)]


@pytest.fixture
def fake_torchvision(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    fake = types.SimpleNamespace(datasets=types.SimpleNamespace(MNIST=_FakeMNIST, CIFAR10=_FakeCIFAR10, CIFAR100=_FakeCIFAR100))
    monkeypatch.setattr(sources_module, "import_torchvision", lambda purpose: fake)
    _FakeMNIST.calls = []
    return fake


def _touch(root: Any, *paths: str) -> None:
    for path in paths:
        full = os.path.join(str(root), path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        open(full, "wb").close()


def test_root_with_missing_files_names_them_and_the_fix(fake_torchvision: Any, tmp_path: Any) -> None:
    with pytest.raises(FileNotFoundError, match=r"MNIST files not found.*train-images-idx3-ubyte.*download=True"):
        SplitMNIST(root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"RotatedMNIST: MNIST files not found"):
        RotatedMNIST(root=str(tmp_path / "nowhere"))
    _touch(tmp_path, "cifar-10-batches-py/data_batch_1")
    with pytest.raises(FileNotFoundError, match=r"missing: .*data_batch_2.*test_batch.*Fix: pass `download=True`"):
        SplitCIFAR10(root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python.train"):
        SplitCIFAR100(root=str(tmp_path))


def test_full_mnist_through_torchvision_api(fake_torchvision: Any, tmp_path: Any) -> None:
    dm = SplitMNIST(root=str(tmp_path), download=True)  # files appear in prepare_data
    dm.prepare_data()
    assert [(train, download) for _, train, download in _FakeMNIST.calls] == [(True, True), (False, True)]
    dm.setup("fit")
    assert sum(len(dm.train_dataset(t)) for t in range(5)) == 80  # 100 train images, 20% validation
    assert sum(len(dm.val_dataset(t)) for t in range(5)) == 20
    assert sum(len(dm.test_dataset(t)) for t in range(5)) == 30  # the official test split
    x, y = dm.train_dataset(0)[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long
    assert x.min() >= -0.1307 / 0.3081 - 1e-5 and x.max() <= (1 - 0.1307) / 0.3081 + 1e-5
    on_test = PermutedMNIST(root=str(tmp_path), num_tasks=2, val_fraction=0.0)
    assert len(on_test.val_dataset(1)) == 30


def test_cifar_through_torchvision_api(fake_torchvision: Any, tmp_path: Any) -> None:
    _touch(tmp_path, *(f"cifar-10-batches-py/{n}" for n in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch", "batches.meta")))
    _touch(tmp_path, "cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta")
    c10 = SplitCIFAR10(root=str(tmp_path), augment=True)
    assert c10.num_tasks == 5 and c10.input_shape == (3, 32, 32)
    assert len(c10.train_dataset(0)) == 10 and len(c10.val_dataset(0)) == 4  # val = official test split
    x, y = c10.train_dataset(0)[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    plain = SplitCIFAR10(root=str(tmp_path), val_fraction=0.2)
    assert len(plain.train_dataset(0)) == 8 and len(plain.val_dataset(0)) == 2 and len(plain.test_dataset(0)) == 4
    c100 = SplitCIFAR100(root=str(tmp_path), shuffle_classes=True)
    assert c100.num_tasks == 10 and len(c100.task_classes[0]) == 10
    assert set(_labels(c100.train_dataset(3)).tolist()) == set(c100.classes_of_task(3))


def test_random_crop_flip_keeps_shape() -> None:
    torch.manual_seed(0)
    image = torch.randn(3, 8, 8)
    out = RandomCropFlip(padding=2)(image)
    assert out.shape == image.shape
    assert torch.equal(RandomCropFlip(padding=0, flip=False)(image), image)
    with pytest.raises(ValueError, match="`padding` must be a non-negative int, got -1"):
        RandomCropFlip(padding=-1)


# --------------------------------------------------------------------------- LightningCLI / jsonargparse
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


# --------------------------------------------------------------------------- a real fit
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


def _trainer(dm: ContinualDataModule, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=dm.max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


def test_fit_trains_each_epoch_on_its_task_only() -> None:
    dm = SplitDigits(epochs_per_task=2, batch_size=64)
    model = _LabelRecorder()
    _trainer(dm, reload_dataloaders_every_n_epochs=1).fit(model, datamodule=dm)
    assert sorted(model.train_labels) == list(range(10))
    for epoch, labels in model.train_labels.items():
        assert labels == set(dm.classes_of_task(epoch // dm.epochs_per_task)), epoch
    assert {t: sorted(labels) for t, labels in model.val_labels.items()} == dict(enumerate(dm.task_classes))


def test_fit_with_a_fixed_task_trains_only_that_task() -> None:
    dm = SplitDigits(task=2, epochs_per_task=2, batch_size=64)
    assert dm.max_epochs == 2
    model = _LabelRecorder()
    _trainer(dm, reload_dataloaders_every_n_epochs=1).fit(model, datamodule=dm)
    assert model.train_labels == {0: {4, 5}, 1: {4, 5}}
    assert sorted(model.val_labels) == list(range(5))  # still evaluated on every task


def test_fit_without_reloading_loaders_is_refused() -> None:
    dm = SplitDigits(batch_size=256)
    with pytest.raises(RuntimeError, match="reload_dataloaders_every_n_epochs=1"):
        _trainer(dm).fit(_LabelRecorder(), datamodule=dm)
