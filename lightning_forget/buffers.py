"""Replay buffers with bounded memory and deterministic, checkpointable contents.

A buffer stores up to ``capacity`` samples as a dict of tensors (``"x"``, ``"y"`` and any other
per-sample field a method needs, e.g. DER++'s ``"logits"``). Storage is allocated once, on the
first insert, with shape ``(capacity, *sample_shape)`` per field, so memory never grows with
the number of tasks.

Which samples are kept is decided by the buffer's own seeded :class:`torch.Generator`, whose
state is part of :meth:`state_dict`. Under DDP, callbacks gather the stream batch from every
rank and insert the same gathered batch on every rank, so the buffers stay identical without
any communication about their contents.

No Lightning in this module.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor

__all__ = ["ReplayBuffer", "ReservoirBuffer", "ClassBalancedBuffer", "make_buffer"]


class ReplayBuffer:
    """Common storage and sampling; subclasses decide where new samples go (:meth:`_slots`).

    Args:
        capacity: maximum number of samples kept (memory is ``capacity`` × one sample).
        seed: seed of the buffer's generator (which samples are kept and evicted).
        device: where the storage lives; ``None`` keeps it on the device of the first insert.
    """

    _STATE_VERSION = 1

    def __init__(self, capacity: int, seed: int = 0, device: Optional[torch.device | str] = None) -> None:
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ValueError(f"`capacity` must be a positive int (number of samples), got {capacity!r}.")
        self.capacity = capacity
        self.seed = int(seed)
        self.device = torch.device(device) if device is not None else None
        self.generator = torch.Generator().manual_seed(self.seed)
        self.storage: dict[str, Tensor] = {}
        self.size = 0
        self.num_seen = 0

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
            self.storage[key] = torch.zeros((self.capacity, *value.shape[1:]), dtype=value.dtype, device=device)

    def _check_batch(self, batch: Mapping[str, Tensor]) -> int:
        if not batch:
            raise ValueError("Cannot add an empty batch (no fields) to a replay buffer.")
        sizes = {key: int(value.shape[0]) for key, value in batch.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"All fields of a batch added to a buffer need the same length, got {sizes}.")
        if self.storage and set(batch) != set(self.storage):
            raise ValueError(
                f"Batch fields {sorted(batch)} differ from the buffer's fields {sorted(self.storage)}."
            )
        return next(iter(sizes.values()))

    def add(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Offer every sample of ``batch`` to the buffer.

        Returns:
            For each offered sample, the slot it was written to, or -1 when it was not kept.
        """
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
            for key, value in batch.items():
                store = self.storage[key]
                store[dst.to(store.device)] = value[src.to(value.device)].detach().to(store.device, store.dtype)
        return slots

    def _slots(self, batch: Mapping[str, Tensor], n: int) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def update_field(self, key: str, slots: Tensor, values: Tensor) -> None:
        """Overwrite field ``key`` at buffer positions ``slots`` (e.g. to refresh stored logits)."""
        store = self.storage[key]
        store[slots.to(store.device)] = values.detach().to(store.device, store.dtype)

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
        if self.is_empty:
            raise RuntimeError("Cannot sample from an empty replay buffer; check `len(buffer)` first.")
        gen = generator if generator is not None else self.generator
        k = min(int(n), self.size)
        index = torch.randperm(self.size, generator=gen)[:k]
        out = {key: value[index.to(value.device)] for key, value in self.storage.items()}
        if return_indices:
            out["index"] = index
        return out

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
            "generator": self.generator.get_state(),
            "storage": {key: value[: self.size].detach().cpu().clone() for key, value in self.storage.items()},
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
        self.storage = {}
        device = self.device if self.device is not None else torch.device("cpu")
        for key, rows in state["storage"].items():
            store = torch.zeros((self.capacity, *rows.shape[1:]), dtype=rows.dtype, device=device)
            store[: rows.shape[0]] = rows.to(device)
            self.storage[key] = store

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
    ) -> None:
        super().__init__(capacity, seed=seed, device=device)
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


_KINDS = {"reservoir": ReservoirBuffer, "class_balanced": ClassBalancedBuffer}


def make_buffer(kind: str, capacity: int, seed: int = 0, device: Optional[str] = None) -> ReplayBuffer:
    """Build a buffer by name: ``"reservoir"`` or ``"class_balanced"``."""
    if kind not in _KINDS:
        raise ValueError(f"`buffer` must be one of {sorted(_KINDS)}, got {kind!r}.")
    return _KINDS[kind](capacity, seed=seed, device=device)
