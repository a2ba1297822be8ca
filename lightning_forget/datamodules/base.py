"""``ContinualDataModule``: a task sequence served inside one ``Trainer.fit``."""

from __future__ import annotations

from typing import Any, Iterator, Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler

from lightning.pytorch.utilities import rank_zero_warn

from lightning_forget.datamodules.loaders import ResumableDataLoader, seeded_generator
from lightning_forget.validation import check_bool, check_int
from lightning_forget.tasks import check_dataloader_reloading

__all__ = ["ContinualDataModule", "EpochShuffleSampler"]


class EpochShuffleSampler(Sampler[int]):
    """A shuffling sampler whose order depends only on ``(seed, epoch)``.

    Unlike ``RandomSampler`` with a generator, the order does not depend on how often the
    sampler was iterated before, so a resumed run sees the same batches as an uninterrupted
    one. Lightning calls :meth:`set_epoch` at every epoch start.
    """

    def __init__(self, length: int, seed: int = 0, epoch: int = 0) -> None:
        self.length = int(length)
        self.seed = int(seed)
        self.epoch = int(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


class ContinualDataModule(pl.LightningDataModule):
    """Base class of datamodules that serve a sequence of tasks in one fit.

    Subclasses implement :meth:`train_dataset` and :meth:`val_dataset` (and optionally
    :meth:`test_dataset`) for a task index; this class turns them into loaders:

    - ``train_dataloader()`` serves the current task ``epoch // epochs_per_task`` (all tasks at
      once in ``joint`` mode, or the fixed ``task`` when one is set);
    - ``val_dataloader()`` / ``test_dataloader()`` serve one loader per task, in task order, so
      ``dataloader_idx`` is the task a validation batch belongs to.

    The Trainer must reload training loaders every epoch
    (``reload_dataloaders_every_n_epochs=1``) and run ``num_tasks * epochs_per_task`` epochs
    (``max_epochs``; a clear error says so otherwise).

    The training loader is a :class:`~lightning_forget.datamodules.loaders.ResumableDataLoader`:
    its position in the epoch is saved in Lightning's checkpoints, so a run resumed from a
    checkpoint written mid-epoch (``ModelCheckpoint(every_n_train_steps=k)``) trains on exactly
    the batches the uninterrupted run would have. Every loader has its own seeded generator, so
    iterating one never draws from the global torch RNG.

    Args:
        num_tasks: number of tasks in the stream.
        epochs_per_task: training epochs spent on each task.
        batch_size: training and evaluation batch size.
        num_workers: ``DataLoader`` workers.
        joint: train on the union of all tasks (the upper-bound baseline); the run is then one
            training phase of ``epochs_per_task`` epochs, evaluated on every task.
        task: serve only this task's training data (for one-``fit``-per-task use).
        seed: seed for shuffling and any random split.
        eval_batch_size: evaluation batch size (defaults to ``batch_size``).
        drop_last: drop the last incomplete training batch.
    """

    def __init__(
        self,
        num_tasks: int,
        epochs_per_task: int = 1,
        batch_size: int = 32,
        num_workers: int = 0,
        joint: bool = False,
        task: Optional[int] = None,
        seed: int = 0,
        eval_batch_size: Optional[int] = None,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("num_tasks", num_tasks), ("epochs_per_task", epochs_per_task), ("batch_size", batch_size)):
            check_int(name, value, min=1)
        check_int("num_workers", num_workers, min=0)
        check_int("seed", seed, fix="pass an integer seed")
        check_int("eval_batch_size", eval_batch_size, min=1, allow_none=True, fix="omit it to use `batch_size`")
        check_bool("joint", joint)
        check_bool("drop_last", drop_last)
        check_int("task", task, allow_none=True)
        if task is not None and not (0 <= task < num_tasks):
            raise ValueError(f"`task` must be in [0, {num_tasks - 1}] (or None for the whole stream), got {task!r}.")
        if joint and task is not None:
            raise ValueError("`joint=True` trains on every task at once; it cannot be combined with `task`.")
        self.num_tasks = num_tasks
        self.epochs_per_task = epochs_per_task
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.joint = joint
        self.task = task
        self.seed = seed
        self.drop_last = drop_last
        self._warned_short = False

    #: ``DataLoader`` collate function of every loader (``None``: PyTorch's default); subclasses
    #: with variable-length examples override it.
    collate_fn: Any = None

    # ------------------------------------------------------------------ the schedule
    @property
    def num_train_phases(self) -> int:
        """Number of successive training phases in one fit (1 in joint or fixed-task mode)."""
        return 1 if (self.joint or self.task is not None) else self.num_tasks

    @property
    def max_epochs(self) -> int:
        """The ``max_epochs`` a Trainer needs to go through the whole stream."""
        return self.num_train_phases * self.epochs_per_task

    def task_of_epoch(self, epoch: int) -> int:
        """The task trained in ``epoch``.

        In joint mode every task is trained at once, so the run counts as being in the last
        task (its accuracy row is the final one). With a fixed ``task`` it is that task.
        """
        if self.joint:
            return self.num_tasks - 1
        if self.task is not None:
            return self.task
        return min(epoch // self.epochs_per_task, self.num_tasks - 1)

    def is_last_epoch_of_task(self, epoch: int) -> bool:
        """Whether ``epoch`` is the last epoch of its training phase."""
        return (epoch + 1) % self.epochs_per_task == 0

    @property
    def current_task(self) -> int:
        """The task of the attached trainer's current epoch (0 without a trainer)."""
        trainer = self.trainer
        return self.task_of_epoch(trainer.current_epoch if trainer is not None else 0)

    # ------------------------------------------------------------------ what subclasses provide
    def train_dataset(self, task: int) -> Dataset:  # pragma: no cover - abstract
        """The training set of ``task``."""
        raise NotImplementedError

    def val_dataset(self, task: int) -> Dataset:  # pragma: no cover - abstract
        """The validation set of ``task``."""
        raise NotImplementedError

    def test_dataset(self, task: int) -> Dataset:
        """The test set of ``task`` (defaults to the validation set)."""
        return self.val_dataset(task)

    # ------------------------------------------------------------------ loaders
    def _check_trainer(self) -> None:
        trainer = self.trainer
        if trainer is None:
            return
        check_dataloader_reloading(trainer)
        max_epochs = getattr(trainer, "max_epochs", None)
        stops_early = max_epochs is not None and 0 <= max_epochs < self.max_epochs
        limited_otherwise = getattr(trainer, "max_steps", -1) != -1 or getattr(trainer, "fast_dev_run", False)
        if stops_early and not limited_otherwise and not self._warned_short:
            self._warned_short = True
            rank_zero_warn(
                f"{type(self).__name__} has {self.num_train_phases} training phases × "
                f"{self.epochs_per_task} epochs = {self.max_epochs} epochs, but the Trainer stops "
                f"after max_epochs={max_epochs}, before the last task. To train the whole stream "
                f"pass `Trainer(max_epochs={self.max_epochs})`."
            )

    def train_dataloader(self) -> DataLoader:
        self._check_trainer()
        if self.joint:
            dataset: Dataset = ConcatDataset([self.train_dataset(t) for t in range(self.num_tasks)])
        else:
            dataset = self.train_dataset(self.current_task)
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        sampler = EpochShuffleSampler(len(dataset), seed=self.seed, epoch=epoch)  # type: ignore[arg-type]
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            # A private generator for the workers' base seed, so iterating a loader never
            # consumes the global RNG (a resumed run would otherwise see other dropout masks).
            generator=seeded_generator(self.seed, epoch),
            num_workers=self.num_workers,
            drop_last=self.drop_last,
            collate_fn=self.collate_fn,
        )

    def _eval_loaders(self, make: Any, salt: int) -> list[DataLoader]:
        return [
            DataLoader(
                make(t),
                batch_size=self.eval_batch_size,
                shuffle=False,
                num_workers=self.num_workers,
                collate_fn=self.collate_fn,
                generator=seeded_generator(self.seed, salt + t),
            )
            for t in range(self.num_tasks)
        ]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.val_dataset, salt=500_000)

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.test_dataset, salt=700_000)
