"""Pools of labelled samples, label checks and the stratified split (no Lightning).

The bottom layer of the labelled-data streams: a :class:`SamplePool` holds the samples of one
split (a tensor of inputs, or a user ``Dataset`` addressed by index) with their labels, and
hands out ``Dataset`` views of subsets of it, optionally normalised, pixel-permuted or
augmented per item. :func:`pool_from_source` checks what a user passes as data
(``(X, y)`` or a ``Dataset``) and :func:`stratified_split` makes seeded validation splits.
The streams (:mod:`.class_incremental`, :mod:`.domain_incremental`) build on these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

__all__ = [
    "ArrayDataset",
    "DataSource",
    "DatasetView",
    "Normalise",
    "SamplePool",
    "check_labels",
    "labels_of",
    "permute_pixels",
    "pool_from_source",
    "stratified_split",
]

DataSource = Union[tuple[Tensor, Tensor], Dataset]
"""Labelled data: an ``(X, y)`` pair of tensors (or arrays) or a ``Dataset`` of ``(x, y)`` items."""
# Pools smaller than this (in elements) are normalised once up front; larger ones (full MNIST,
# CIFAR) stay uint8 and are normalised item by item, which keeps memory at a quarter.
_EAGER_NORMALISE_LIMIT = 1 << 24


@dataclass(frozen=True)
class Normalise:
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


def permute_pixels(x: Tensor, permutation: Tensor, pixel_dims: int) -> Tensor:
    """Reorder the last ``pixel_dims`` dimensions of ``x``, flattened, by ``permutation``."""
    flat = x.flatten(start_dim=x.ndim - pixel_dims)
    return flat[..., permutation].reshape(x.shape)


class ArrayDataset(Dataset):
    """Items ``(x[j], y[j])`` for ``j`` in ``indices`` of in-memory tensors, made model-ready.

    ``normalise`` (uint8 storage), ``permutation`` (permuted pixels) and ``augment`` (training
    augmentation) are applied per item, in that order.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        indices: Optional[Tensor] = None,
        normalise: Optional[Normalise] = None,
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
            x = permute_pixels(x, self.permutation, self.pixel_dims)
        if self.augment is not None:
            x = self.augment(x)
        return x, self.y[j]


class DatasetView(Dataset):
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


class SamplePool:
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
        normalise: Optional[Normalise] = None,
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
        self._tensor_pool: Optional[SamplePool] = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        if self.x is not None:
            return tuple(self.x.shape[1:])
        return tuple(self.as_dataset()[0][0].shape)

    def select(self, indices: Tensor) -> "SamplePool":
        if self.x is not None:
            return SamplePool(self.labels[indices], x=self.x[indices], normalise=self.normalise)
        inner = self.indices[indices] if self.indices is not None else indices
        return SamplePool(self.labels[indices], dataset=self.dataset, indices=inner)

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
            return ArrayDataset(self.x, self.labels, indices, self.normalise, permutation, pixel_dims, augment)
        if permutation is not None or augment is not None:
            return self.as_tensor_pool().as_dataset(indices, permutation=permutation, pixel_dims=pixel_dims, augment=augment)
        inner = indices if self.indices is None else (self.indices if indices is None else self.indices[indices])
        return DatasetView(self.dataset, inner)  # type: ignore[arg-type]

    def as_tensor_pool(self) -> "SamplePool":
        """This pool with its inputs held as one float tensor (reads a dataset pool once)."""
        if self.x is not None:
            return self
        if self._tensor_pool is None:
            view = self.as_dataset()
            items = [view[i][0] for i in tqdm(range(len(view)), desc="Reading inputs", disable=len(view) < 10_000)]
            self._tensor_pool = SamplePool(self.labels, x=torch.stack(items))
        return self._tensor_pool

    def normalised_inputs(self) -> Tensor:
        """All inputs as a normalised float tensor ``(N, *sample_shape)``."""
        pool = self.as_tensor_pool()
        assert pool.x is not None
        return pool.normalise(pool.x) if pool.normalise is not None else pool.x


def labels_of(dataset: Dataset, name: str) -> Tensor:
    """Labels of a ``Dataset``: its ``targets`` attribute when it has one, else one pass over it."""
    size = len(dataset)  # type: ignore[arg-type]
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == size:
        return check_labels(torch.as_tensor(targets), name)
    labels = [torch.as_tensor(dataset[i][1]) for i in tqdm(range(size), desc="Reading labels", disable=size < 10_000)]
    return check_labels(torch.stack(labels) if labels else torch.empty(0), name)


def check_labels(labels: Tensor, name: str) -> Tensor:
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


def pool_from_source(source: Any, name: str) -> SamplePool:
    """Check a user data source (``(X, y)`` or ``Dataset``) and wrap it as a pool."""
    if isinstance(source, Dataset):
        return SamplePool(labels_of(source, name), dataset=source)
    if isinstance(source, (tuple, list)) and len(source) == 2:
        x, y = torch.as_tensor(source[0]), check_labels(torch.as_tensor(source[1]), name)
        if x.ndim < 2 or len(x) != len(y):
            raise ValueError(
                f"`{name}` must be (X, y) with X of shape (N, *input_shape) and y of shape (N,), "
                f"got X {tuple(x.shape)} and y {tuple(y.shape)}."
            )
        return SamplePool(y, x=x)
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

