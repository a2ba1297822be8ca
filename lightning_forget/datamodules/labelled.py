"""``LabelledDataModule``: the plumbing shared by the streams over labelled data.

Sources become pools (:mod:`.pools`), a seeded stratified split makes the validation data when
none is given, and every task's ``Dataset`` is built lazily and cached. Subclasses decide which
samples a task serves (:mod:`.class_incremental`, :mod:`.domain_incremental`); presets with a
built-in source (:mod:`.presets`, :mod:`.vision`) set ``_NUM_CLASSES``/``_INPUT_SHAPE`` and
implement ``_load_builtin``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import Dataset

from lightning_forget.datamodules.base import ContinualDataModule
from lightning_forget.datamodules.pools import DataSource, SamplePool, pool_from_source, stratified_split

__all__ = ["LabelledDataModule"]

_SPLIT_NAMES = ("train", "val", "test")


class LabelledDataModule(ContinualDataModule):
    """Sources → pools, the stratified validation split and lazy loading of task datasets.

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
        self._given: Optional[tuple[SamplePool, Optional[SamplePool], Optional[SamplePool]]] = None
        if train is None:
            if self._NUM_CLASSES is None:
                raise ValueError(f"{owner}: `train` is required: pass the training data as (X, y) tensors or a Dataset of (x, y).")
            if val is not None or test is not None:
                raise ValueError(f"{owner}: `val`/`test` were given without `train`; pass all of them, or none for the built-in data.")
            has_test = self._builtin_has_test()
        else:
            self._given = (
                pool_from_source(train, "train"),
                None if val is None else pool_from_source(val, "val"),
                None if test is None else pool_from_source(test, "test"),
            )
            has_test = test is not None
        if val is None and self.val_fraction == 0 and not has_test:
            raise ValueError(
                f"{owner}: `val_fraction=0` uses the test split as validation data, but this source "
                "has no test split. Fix: use 0 < val_fraction < 1 (a stratified split of the "
                "training data), or pass `val`/`test`."
            )
        self._pools: Optional[tuple[SamplePool, SamplePool, SamplePool]] = None
        self._datasets: dict[tuple[str, int], Dataset] = {}

    # -------------------------------------------------------------- built-in sources
    def _builtin_has_test(self) -> bool:
        return False

    def _load_builtin(self) -> tuple[SamplePool, Optional[SamplePool]]:  # pragma: no cover - abstract
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
    def _ensure_pools(self) -> tuple[SamplePool, SamplePool, SamplePool]:
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

    def _make_task_dataset(self, pool: SamplePool, split: str, task: int) -> Dataset:  # pragma: no cover - abstract
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

