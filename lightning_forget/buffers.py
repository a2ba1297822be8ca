"""Replay buffers with bounded memory and deterministic, checkpointable contents.

A buffer stores up to ``capacity`` samples as a dict of tensors (``"x"``, ``"y"`` and any other
per-sample field a method needs, e.g. DER++'s ``"logits"``). Storage is allocated once, on the
first insert, with shape ``(capacity, *sample_shape)`` per field, so memory never grows with
the number of tasks.

Which samples are kept is decided by the buffer's own seeded :class:`torch.Generator`, whose
state is part of :meth:`state_dict`.

Per-sample metadata travels with each row: ``add(batch, task=t)`` stores the task id under
:data:`TASK_KEY`, and any extra fixed-shape field of the batch is stored like the input. Fields
named in ``pad_values`` are variable-length sequences (token ids, attention masks, labels): they
are stored with their length and re-padded on each draw to the longest drawn row, with their own
pad value (e.g. ``-100`` for labels, ``0`` for an attention mask).

Insertion policies (when a sample enters the buffer):

- :class:`ReservoirBuffer`: reservoir sampling over everything offered (task-free streams);
- :class:`ClassBalancedBuffer`: class-balanced reservoir;
- :class:`TaskBalancedBuffer`: filled once per task, at the task's end, with an equal share per
  task seen (what Avalanche calls an experience-balanced buffer). Under DDP, callbacks gather the stream batch from every
rank and insert the same gathered batch on every rank, so the buffers stay identical without
any communication about their contents.

No Lightning in this module.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch

from lightning_forget.validation import check_int
from torch import Tensor

__all__ = [
    "TASK_KEY",
    "ReplayBuffer",
    "ReservoirBuffer",
    "ClassBalancedBuffer",
    "TaskBalancedBuffer",
    "equal_shares",
    "make_buffer",
    "pad_rows",
]

#: The buffer field holding each row's task id (written by ``add(batch, task=...)``).
TASK_KEY = "__task__"

PadValues = Mapping[str, Union[int, float]]


def pad_rows(rows: Tensor, width: int, value: Union[int, float]) -> Tensor:
    """``rows`` (``(n, length, ...)``) right-padded with ``value`` along dim 1 to ``width``."""
    length = int(rows.shape[1])
    if length >= width:
        return rows
    pad = torch.full((rows.shape[0], width - length, *rows.shape[2:]), value, dtype=rows.dtype, device=rows.device)
    return torch.cat([rows, pad], dim=1)


def equal_shares(capacity: int, groups: int) -> list[int]:
    """``capacity`` slots split over ``groups``: ``capacity // groups`` each, the rest to the first ones."""
    base, rest = divmod(int(capacity), int(groups))
    return [base + (1 if i < rest else 0) for i in range(int(groups))]


class ReplayBuffer:
    """Common storage and sampling; subclasses decide where new samples go (:meth:`_slots`).

    Args:
        capacity: maximum number of samples kept (memory is ``capacity`` × one sample).
        seed: seed of the buffer's generator (which samples are kept and evicted).
        device: where the storage lives; ``None`` keeps it on the device of the first insert.
        pad_values: fields of variable length along dim 1 (token sequences) and the value that
            pads each, e.g. ``{"input_ids": 0, "attention_mask": 0, "labels": -100}``.
    """

    _STATE_VERSION = 2
    #: The field holding task ids (see :data:`TASK_KEY`).
    task_key = TASK_KEY

    def __init__(
        self,
        capacity: int,
        seed: int = 0,
        device: Optional[torch.device | str] = None,
        pad_values: Optional[PadValues] = None,
    ) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ValueError(f"`capacity` must be a positive int (number of samples), got {capacity!r}.")
        self.capacity = capacity
        self.seed = int(seed)
        self.device = torch.device(device) if device is not None else None
        self.pad_values: dict[str, Union[int, float]] = dict(pad_values or {})
        self.generator = torch.Generator().manual_seed(self.seed)
        self.storage: dict[str, Tensor] = {}
        #: Stored length (dim 1) of each row of the variable-length fields.
        self.lengths: dict[str, Tensor] = {}
        self.size = 0
        self.num_seen = 0
        #: Incremented whenever the stored rows change (draw schedules restart on a change).
        self.revision = 0

    def __getstate__(self) -> dict[str, Any]:
        # A torch.Generator does not survive torch.multiprocessing's pickling with the default
        # file-descriptor sharing ("unable to resize file" in the worker; `strategy="ddp_spawn"`
        # pickles callbacks and their buffers): carry its state as plain bytes instead.
        state = self.__dict__.copy()
        state["generator"] = self.generator.get_state().numpy().tobytes()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        generator_state = state["generator"]
        self.__dict__.update(state)
        self.generator = torch.Generator()
        self.generator.set_state(torch.frombuffer(bytearray(generator_state), dtype=torch.uint8))

    # ------------------------------------------------------------------ inspection
    def __len__(self) -> int:
        return self.size

    @property
    def is_empty(self) -> bool:
        return self.size == 0

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self.storage)

    def contents(self) -> dict[str, Tensor]:
        """The stored samples (views of the storage, first ``len(self)`` rows)."""
        return {key: value[: self.size] for key, value in self.storage.items()}

    def nbytes(self) -> int:
        """Bytes held by the storage (fixed after the first insert)."""
        return sum(t.numel() * t.element_size() for t in self.storage.values())

    # ------------------------------------------------------------------ insertion
    def _allocate(self, batch: Mapping[str, Tensor]) -> None:
        device = self.device if self.device is not None else next(iter(batch.values())).device
        for key, value in batch.items():
            fill = self.pad_values.get(key, 0)
            self.storage[key] = torch.full((self.capacity, *value.shape[1:]), fill, dtype=value.dtype, device=device)
            if key in self.pad_values:
                self.lengths[key] = torch.zeros(self.capacity, dtype=torch.long)

    def _widen(self, key: str, width: int) -> None:
        """Grow the storage of sequence field ``key`` to ``width`` positions (pad-filled)."""
        store = self.storage[key]
        if width > store.shape[1]:
            self.storage[key] = pad_rows(store, width, self.pad_values[key])

    def _write(self, dst: Tensor, batch: Mapping[str, Tensor], src: Tensor) -> None:
        """Write rows ``src`` of ``batch`` into slots ``dst`` (sequence fields re-padded)."""
        for key, value in batch.items():
            rows = value[src.to(value.device)].detach()
            if key in self.pad_values:
                self._widen(key, int(rows.shape[1]))
                rows = pad_rows(rows, int(self.storage[key].shape[1]), self.pad_values[key])
                self.lengths[key][dst.cpu()] = int(value.shape[1])
            store = self.storage[key]
            store[dst.to(store.device)] = rows.to(store.device, store.dtype)
        if dst.numel():
            self.revision += 1

    def _check_batch(self, batch: Mapping[str, Tensor]) -> int:
        if not batch:
            raise ValueError("Cannot add an empty batch (no fields) to a replay buffer.")
        sizes = {key: int(value.shape[0]) for key, value in batch.items()}
        short = sorted(key for key in self.pad_values if key in batch and batch[key].dim() < 2)
        if short:
            raise ValueError(
                f"Fields {short} are named in `pad_values` (variable-length sequences along dim 1) but are "
                f"not at least 2-D (rows x length); drop them from `pad_values`."
            )
        if len(set(sizes.values())) != 1:
            raise ValueError(f"All fields of a batch added to a buffer need the same length, got {sizes}.")
        if self.storage and set(batch) != set(self.storage):
            raise ValueError(
                f"Batch fields {sorted(batch)} differ from the buffer's fields {sorted(self.storage)}."
            )
        return next(iter(sizes.values()))

    @staticmethod
    def with_task(batch: Mapping[str, Tensor], task: Optional[int]) -> dict[str, Tensor]:
        """``batch`` with the task id of every row under :data:`TASK_KEY` (unchanged for ``None``)."""
        batch = dict(batch)
        if task is None:
            return batch
        if TASK_KEY in batch:
            raise ValueError(f"The batch already has a field {TASK_KEY!r}, the name the buffer stores task ids under.")
        n = int(next(iter(batch.values())).shape[0]) if batch else 0
        batch[TASK_KEY] = torch.full((n,), int(task), dtype=torch.long)
        return batch

    def add(self, batch: Mapping[str, Tensor], task: Optional[int] = None) -> Tensor:
        """Offer every sample of ``batch`` to the buffer.

        Args:
            batch: per-sample tensors by field name.
            task: the task the samples belong to, stored with each kept row (give it always or never).

        Returns:
            For each offered sample, the slot it was written to, or -1 when it was not kept.
        """
        batch = self.with_task(batch, task)
        n = self._check_batch(batch)
        if n == 0:
            return torch.empty(0, dtype=torch.long)
        if not self.storage:
            self._allocate(batch)
        slots = self._slots(batch, n)
        kept = slots >= 0
        if kept.any():
            # When two samples of one batch go to the same slot, the later one wins (as if they
            # had been offered one at a time); the earlier one is reported as not kept.
            last = torch.full((self.capacity,), -1, dtype=torch.long)
            last.scatter_reduce_(0, slots[kept], torch.nonzero(kept).flatten(), reduce="amax")
            dst = torch.nonzero(last >= 0).flatten()
            src = last[dst]
            slots = torch.full_like(slots, -1)
            slots[src] = dst
            self._write(dst, batch, src)
        return slots

    def _slots(self, batch: Mapping[str, Tensor], n: int) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def update_field(self, key: str, slots: Tensor, values: Tensor) -> None:
        """Overwrite field ``key`` at buffer positions ``slots`` (e.g. to refresh stored logits)."""
        store = self.storage[key]
        store[slots.to(store.device)] = values.detach().to(store.device, store.dtype)
        self.revision += 1

    def _keep_rows(self, index: Tensor) -> None:
        """Keep only the rows ``index`` (in that order) as rows ``0..len(index)-1``."""
        index = index.long().cpu()
        for key, store in self.storage.items():
            rows = store[index.to(store.device)]
            store[: index.numel()] = rows
            store[index.numel():] = self.pad_values.get(key, 0)
        for key, lengths in self.lengths.items():
            kept = lengths[index]
            lengths.zero_()
            lengths[: index.numel()] = kept
        self.size = int(index.numel())
        self.revision += 1

    def _append(self, rows: Mapping[str, Tensor]) -> None:
        """Write ``rows`` into the free slots after the stored ones."""
        n = int(next(iter(rows.values())).shape[0])
        if self.size + n > self.capacity:
            raise RuntimeError(f"Cannot append {n} rows to a buffer holding {self.size} of {self.capacity}.")
        if not self.storage:
            self._allocate(rows)
        if set(rows) != set(self.storage):
            raise ValueError(f"Rows with fields {sorted(rows)} differ from the buffer's fields {sorted(self.storage)}.")
        self._write(torch.arange(self.size, self.size + n), rows, torch.arange(n))
        self.size += n

    # ------------------------------------------------------------------ sampling
    def sample(
        self, n: int, generator: Optional[torch.Generator] = None, return_indices: bool = False
    ) -> dict[str, Tensor]:
        """Draw ``min(n, len(self))`` distinct samples uniformly at random.

        Args:
            n: how many samples.
            generator: the generator to draw with (callbacks pass one seeded per step and rank);
                defaults to the buffer's own.
            return_indices: also return the drawn slots under the key ``"index"``.
        """
        check_int("n", n, min=0, fix="ask for a non-negative number of samples")
        if self.is_empty:
            raise RuntimeError("Cannot sample from an empty replay buffer; check `len(buffer)` first.")
        gen = generator if generator is not None else self.generator
        k = min(int(n), self.size)
        index = torch.randperm(self.size, generator=gen)[:k]
        out = self.take(index)
        if return_indices:
            out["index"] = index
        return out

    def take(self, index: Tensor) -> dict[str, Tensor]:
        """The rows at slots ``index``; sequence fields cut to the longest taken row (still padded)."""
        index = index.long().cpu()
        out = {}
        for key, store in self.storage.items():
            rows = store[index.to(store.device)]
            if key in self.lengths:
                width = int(self.lengths[key][index].max()) if index.numel() else 0
                rows = rows[:, :width]
            out[key] = rows
        return out

    def task_ids(self) -> Optional[Tensor]:
        """The task id of every stored row, or ``None`` when the buffer was filled without tasks."""
        return self.storage[TASK_KEY][: self.size].cpu() if TASK_KEY in self.storage else None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Plain values and CPU tensors: the stored rows, counters and the generator state."""
        return {
            "version": self._STATE_VERSION,
            "kind": type(self).__name__,
            "capacity": self.capacity,
            "seed": self.seed,
            "size": self.size,
            "num_seen": self.num_seen,
            "revision": self.revision,
            "generator": self.generator.get_state(),
            "storage": {key: value[: self.size].detach().cpu().clone() for key, value in self.storage.items()},
            "lengths": {key: value[: self.size].clone() for key, value in self.lengths.items()},
            "shapes": {key: (tuple(value.shape[1:]), str(value.dtype)) for key, value in self.storage.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore exactly what :meth:`state_dict` saved."""
        if state.get("kind", type(self).__name__) != type(self).__name__:
            raise ValueError(f"Cannot load a {state['kind']} state into a {type(self).__name__}.")
        if int(state["capacity"]) != self.capacity:
            raise ValueError(
                f"The checkpoint's buffer capacity is {state['capacity']} but this buffer has "
                f"capacity {self.capacity}; build the callback with the same buffer size to resume."
            )
        self.seed = int(state["seed"])
        self.size = int(state["size"])
        self.num_seen = int(state["num_seen"])
        self.generator.set_state(state["generator"])
        if int(state["version"]) < 2:
            # Version 1 (before sequence fields and draw schedules) had no lengths and no revision.
            revision, lengths = 0, {}
        else:
            revision, lengths = int(state["revision"]), state["lengths"]
        self.revision = revision
        self.storage = {}
        self.lengths = {}
        device = self.device if self.device is not None else torch.device("cpu")
        for key, rows in state["storage"].items():
            fill = self.pad_values.get(key, 0)
            store = torch.full((self.capacity, *rows.shape[1:]), fill, dtype=rows.dtype, device=device)
            store[: rows.shape[0]] = rows.to(device)
            self.storage[key] = store
        for key, rows in lengths.items():
            self.lengths[key] = torch.zeros(self.capacity, dtype=torch.long)
            self.lengths[key][: rows.shape[0]] = rows
        missing = sorted(set(self.pad_values) & set(self.storage) - set(self.lengths))
        if missing:
            raise ValueError(
                f"`pad_values` names {missing} as variable-length fields, but the checkpoint's buffer stored "
                "them as fixed-shape fields; resume with the `pad_values` the run was started with."
            )

    def to(self, device: torch.device | str) -> "ReplayBuffer":
        """Move the storage (e.g. next to the model after a resume)."""
        self.storage = {key: value.to(device) for key, value in self.storage.items()}
        if self.device is not None:
            self.device = torch.device(device)
        return self


class ReservoirBuffer(ReplayBuffer):
    """Reservoir sampling: every sample seen so far is in the buffer with equal probability.

    The i-th sample ever offered (0-based) fills slot i while the buffer is not full; after
    that it replaces a uniformly random slot with probability ``capacity / (i + 1)``.
    """

    def _slots(self, batch: Mapping[str, Tensor], n: int) -> Tensor:
        seen = self.num_seen + torch.arange(n)
        draws = (torch.rand(n, generator=self.generator, dtype=torch.float64) * (seen + 1).double()).long()
        slots = torch.where(seen < self.capacity, seen, torch.where(draws < self.capacity, draws, -1))
        self.num_seen += n
        self.size = min(self.capacity, self.num_seen)
        return slots


class ClassBalancedBuffer(ReplayBuffer):
    """Class-balanced reservoir (CBRS, Chrysakis & Moens, ICML 2020).

    While there is room every sample is kept. Once full, a sample of a class that is not among
    the largest in the buffer replaces a random sample of a largest class; a sample of a largest
    class replaces a random sample of its own class with probability ``m_c / n_c`` (stored
    count over seen count of that class). Classes end up (nearly) equally represented.

    Args:
        label_key: the field holding integer class labels.
    """

    def __init__(
        self,
        capacity: int,
        seed: int = 0,
        device: Optional[torch.device | str] = None,
        label_key: str = "y",
        pad_values: Optional[PadValues] = None,
    ) -> None:
        super().__init__(capacity, seed=seed, device=device, pad_values=pad_values)
        self.label_key = label_key
        self.seen_per_class: dict[int, int] = {}

    def _labels(self, batch: Mapping[str, Tensor]) -> Tensor:
        if self.label_key not in batch:
            raise KeyError(
                f"ClassBalancedBuffer needs integer labels under {self.label_key!r}; the batch has "
                f"fields {sorted(batch)}. Pass `label_key=` naming the label field."
            )
        labels = batch[self.label_key]
        if labels.dtype.is_floating_point or labels.dim() != 1:
            raise ValueError(
                f"ClassBalancedBuffer needs 1-D integer class labels, got dtype {labels.dtype} and "
                f"shape {tuple(labels.shape)}; use `buffer='reservoir'` for other targets."
            )
        return labels.detach().cpu()

    def _stored_labels(self) -> Tensor:
        return self.storage[self.label_key][: self.size].detach().cpu()

    def _slots(self, batch: Mapping[str, Tensor], n: int) -> Tensor:
        labels = self._labels(batch).tolist()
        slots = torch.full((n,), -1, dtype=torch.long)
        stored = self._stored_labels().clone() if self.size else torch.empty(0, dtype=torch.long)
        stored = torch.cat([stored, torch.full((self.capacity - stored.numel(),), -1, dtype=torch.long)])
        for i, c in enumerate(labels):
            self.seen_per_class[c] = self.seen_per_class.get(c, 0) + 1
            self.num_seen += 1
            if self.size < self.capacity:
                slot = self.size
                self.size += 1
            else:
                counts = torch.bincount(stored[stored >= 0])
                largest = int(counts.max())
                own = int(counts[c]) if c < counts.numel() else 0
                if own < largest:
                    big = torch.nonzero(counts == largest).flatten()
                    victim_class = int(big[torch.randint(big.numel(), (1,), generator=self.generator)])
                    candidates = torch.nonzero(stored == victim_class).flatten()
                    slot = int(candidates[torch.randint(candidates.numel(), (1,), generator=self.generator)])
                else:
                    keep = torch.rand(1, generator=self.generator, dtype=torch.float64).item()
                    if keep >= own / self.seen_per_class[c]:
                        continue
                    candidates = torch.nonzero(stored == c).flatten()
                    slot = int(candidates[torch.randint(candidates.numel(), (1,), generator=self.generator)])
            stored[slot] = c
            slots[i] = slot
        return slots

    def class_counts(self) -> dict[int, int]:
        """How many samples of each class the buffer holds."""
        if self.is_empty:
            return {}
        values, counts = torch.unique(self._stored_labels(), return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts)}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["label_key"] = self.label_key
        state["seen_per_class"] = dict(self.seen_per_class)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.seen_per_class = {int(k): int(v) for k, v in state.get("seen_per_class", {}).items()}


class TaskBalancedBuffer(ReplayBuffer):
    """A buffer filled once per task, at the task's end, with an equal share for every task seen.

    The insertion policy of Avalanche's experience-balanced buffer (Lomonaco et al., "Avalanche:
    an End-to-End Library for Continual Learning", CVPR Workshops 2021), the task-level
    counterpart of the per-class balance of GDumb (Prabhu et al., ECCV 2020). During task ``t``
    the offered samples go to a *staging* reservoir of ``capacity // g`` rows, ``g`` being the
    number of tasks the buffer will hold once ``t`` is added; reservoir sampling keeps a uniform
    random subset of the task's samples there, so the staging memory is bounded too. The stored
    rows do not change during the task, so replay draws never include the task being trained.
    :meth:`end_task` then re-balances: every task gets ``capacity // g`` slots (the remainder to
    the first tasks), each old task keeping a random subset of its rows (rows are stored in random
    order, and a shrinking task keeps its first ones), and the staged rows of ``t``, shuffled,
    fill its share. A sample is stored at most once.

    Task ids are stored with every row under :data:`TASK_KEY`. Under DDP the gathered batches are
    staged identically on every rank; the staging generator is seeded from ``(seed, task)``.

    Args:
        capacity: maximum number of samples kept (plus at most ``capacity // g`` staged).
        seed: seed of the generators (which samples are kept, the order of each task's rows).
        device: where the storage lives; ``None`` keeps it on the device of the first insert.
        pad_values: variable-length fields and their pad values (see :class:`ReplayBuffer`).
    """

    def __init__(
        self,
        capacity: int,
        seed: int = 0,
        device: Optional[torch.device | str] = None,
        pad_values: Optional[PadValues] = None,
    ) -> None:
        super().__init__(capacity, seed=seed, device=device, pad_values=pad_values)
        self.staging: Optional[ReservoirBuffer] = None
        self.staging_task = -1

    def stored_tasks(self) -> list[int]:
        """The tasks that have rows in the buffer, in increasing order."""
        ids = self.task_ids()
        return [] if ids is None else sorted(int(t) for t in ids.unique())

    def _open(self, task: int) -> None:
        groups = len([t for t in self.stored_tasks() if t != task]) + 1
        share = self.capacity // groups
        if share < 1:
            raise RuntimeError(
                f"TaskBalancedBuffer of capacity {self.capacity} cannot give task {task} a slot: it already "
                f"holds {groups - 1} tasks. Use a buffer of at least as many samples as tasks."
            )
        seed = (self.seed * 1_000_003 + int(task) + 1) % (2**61 - 1)
        self.staging = ReservoirBuffer(share, seed=seed, device=self.device, pad_values=self.pad_values)
        self.staging_task = int(task)

    def add(self, batch: Mapping[str, Tensor], task: Optional[int] = None) -> Tensor:
        """Stage the samples of ``task`` (they enter the buffer at :meth:`end_task`).

        Returns:
            For each offered sample, its row in the staging reservoir, or -1 when it was not kept.
        """
        if task is None:
            raise ValueError("TaskBalancedBuffer.add needs `task=` (the task the samples belong to).")
        if TASK_KEY in batch:
            raise ValueError(f"The batch already has a field {TASK_KEY!r}, the name the buffer stores task ids under.")
        if self.staging is not None and int(task) != self.staging_task:
            raise RuntimeError(
                f"TaskBalancedBuffer: samples of task {task} arrived while task {self.staging_task} is still "
                f"open; call `end_task({self.staging_task})` at the end of each task."
            )
        if self.staging is None:
            self._open(int(task))
        slots = self.staging.add(batch)  # type: ignore[union-attr]
        self.num_seen += int(slots.numel())
        return slots

    def end_task(self, task: int) -> None:
        """Move the staged samples of ``task`` into the buffer and re-balance the shares."""
        staging = self.staging
        if staging is None or self.staging_task != int(task):
            return  # nothing of this task was offered
        self.staging, self.staging_task = None, -1
        if staging.is_empty:
            return
        old = [t for t in self.stored_tasks() if t != int(task)]
        shares = equal_shares(self.capacity, len(old) + 1)
        if self.size:
            ids = self.task_ids()
            keep = [torch.nonzero(ids == t).flatten()[:share] for t, share in zip(old, shares)]  # type: ignore[operator]
            self._keep_rows(torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long))
        order = torch.randperm(len(staging), generator=self.generator)[: shares[-1]]
        self._append(self.with_task(staging.take(order), int(task)))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["staging"] = None if self.staging is None else self.staging.state_dict()
        state["staging_task"] = self.staging_task
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.staging_task = int(state["staging_task"])
        self.staging = None
        if state["staging"] is not None:
            staged = state["staging"]
            self.staging = ReservoirBuffer(int(staged["capacity"]), device=self.device, pad_values=self.pad_values)
            self.staging.load_state_dict(staged)

    def to(self, device: torch.device | str) -> "TaskBalancedBuffer":
        super().to(device)
        if self.staging is not None:
            self.staging.to(device)
        return self


_KINDS = {"reservoir": ReservoirBuffer, "class_balanced": ClassBalancedBuffer, "task_balanced": TaskBalancedBuffer}


def make_buffer(
    kind: str,
    capacity: int,
    seed: int = 0,
    device: Optional[str] = None,
    pad_values: Optional[PadValues] = None,
) -> ReplayBuffer:
    """Build a buffer by name: ``"reservoir"``, ``"class_balanced"`` or ``"task_balanced"``."""
    if kind not in _KINDS:
        raise ValueError(f"`buffer` must be one of {sorted(_KINDS)}, got {kind!r}.")
    return _KINDS[kind](capacity, seed=seed, device=device, pad_values=pad_values)
