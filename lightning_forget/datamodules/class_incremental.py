"""``SplitDataModule``: a class-incremental stream over any labelled data.

The classes of one labelled dataset are partitioned into groups, one group per task; labels keep
their original ids, so one output head covers every class seen so far (the class-incremental
scenario of van de Ven & Tolias, "Three scenarios for continual learning", NeurIPS Continual
Learning Workshop 2018).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch.utils.data import Dataset

from lightning_forget.datamodules.labelled import LabelledDataModule
from lightning_forget.datamodules.pools import DataSource, SamplePool
from lightning_forget.validation import check_int

__all__ = ["SplitDataModule"]


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
        check_int("num_tasks", num_tasks, min=1)
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
        sizes = [check_int("classes_per_task", size, min=1) for size in classes_per_task]
        if not sizes or sum(sizes) != num_classes:
            raise ValueError(
                f"{owner}: the `classes_per_task` list must sum to the {num_classes} classes, got "
                f"{list(classes_per_task)!r} (sum {sum(sizes)})."
            )
    else:
        size = check_int("classes_per_task", classes_per_task, min=1)
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


class SplitDataModule(LabelledDataModule):
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
        **kwargs: the loader and schedule arguments of
            :class:`~lightning_forget.datamodules.ContinualDataModule` (``epochs_per_task``,
            ``batch_size``, ``num_workers``, ``joint``, ``task``, ``seed``, ``eval_batch_size``,
            ``drop_last``); ``seed`` also seeds the validation split and the class shuffle.

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
        **kwargs: Any,
    ) -> None:
        owner = type(self).__name__
        self._init_sources(train, val, test, val_fraction)
        self._classes = self._source_classes()
        sizes = _task_sizes(len(self._classes), classes_per_task, num_tasks, self._DEFAULT_NUM_TASKS, owner)
        super().__init__(num_tasks=len(sizes), **kwargs)
        order = _order_classes(self._classes, class_order, shuffle_classes, self.seed, owner)
        bounds = [sum(sizes[:t]) for t in range(len(sizes) + 1)]
        self._task_classes = [order[bounds[t] : bounds[t + 1]] for t in range(len(sizes))]
        self.classes_per_task = classes_per_task
        self.class_order = class_order
        self.shuffle_classes = shuffle_classes

    def classes_of_task(self, task: int) -> list[int]:
        """The class ids of ``task``, in class order."""
        return list(self._task_classes[self._check_task(task)])

    def _make_task_dataset(self, pool: SamplePool, split: str, task: int) -> Dataset:
        classes = torch.tensor(self._task_classes[task], dtype=torch.long)
        indices = torch.isin(pool.labels, classes).nonzero().squeeze(1)
        return pool.as_dataset(indices, augment=self._augmentation() if split == "train" else None)

