"""Training loaders that resume at the exact batch, and loaders that never touch the global RNG.

**Mid-epoch resume.** Lightning 2.6 saves the state of every training loader that has
``state_dict``/``load_state_dict`` in the checkpoint (``FitLoop.on_save_checkpoint`` stores
``CombinedLoader._state_dicts()`` under the fit loop's ``"combined_loader"`` key) and, when it
restarts mid-epoch, calls ``load_state_dict`` on the freshly built loader before it creates the
loader's iterator (``FitLoop.setup_data`` → ``_load_combined_loader_states``). It then counts the
batches already done into the data fetcher (``fetched += batch_progress.current.ready``), so a
loader whose iterator skips exactly the batches served before the checkpoint finishes the epoch
as the uninterrupted run does. A loader with a length is not prefetched by Lightning, so at a
checkpoint written in ``on_train_batch_end`` the batches served equal the batches trained. A
plain ``DataLoader`` has no such state: Lightning warns ("your dataloader is not resumable") and
starts the epoch from its first batch again.

:class:`ResumableDataLoader` is that loader: a ``DataLoader`` that counts the batches its
iterator has handed out; its state is that count, and after ``load_state_dict`` the next iterator
skips that many batches of indices (without loading their samples) and serves the rest. The
order itself is a function of ``(seed, epoch)`` (``EpochShuffleSampler``, or Lightning's
``DistributedSampler`` wrapper, seeded and set to the epoch), so the skipped batches are those
the interrupted run saw. Under DDP Lightning rebuilds the loader (the same class, from its saved
constructor arguments) around its distributed sampler, and each rank skips its own first
batches.

torchdata's ``StatefulDataLoader`` (0.11) also installs here without moving torch and resumes
exactly under Lightning 2.6; it was not chosen because it would add a dependency for what is a
counter over a deterministic order, and it re-implements ``DataLoader`` internals that have to
track each torch release.

**RNG.** A ``DataLoader`` without ``generator=`` draws its workers' base seed from the global
torch RNG at every ``iter()``, so merely iterating a loader changes the random numbers the
training step (dropout, replay draws) sees next, and a resumed run, which iterates a different
number of loaders, diverges. Every loader built here has its own ``torch.Generator``, re-seeded at
each ``iter()`` so that the worker seeds depend on ``(seed, epoch)`` only.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["ResumableDataLoader", "seeded_generator"]

_STATE_VERSION = 1


def seeded_generator(seed: int, salt: int) -> torch.Generator:
    """A private CPU generator seeded by ``(seed, salt)``."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(salt))


class _SkipFirst:
    """The batches of ``index_sampler`` after its first ``skip`` (indices only: nothing is loaded)."""

    def __init__(self, index_sampler: Iterable[Any], skip: int) -> None:
        self.index_sampler = index_sampler
        self.skip = skip

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.index_sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.index_sampler) - self.skip)  # type: ignore[arg-type]


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position in the epoch travels in Lightning's checkpoint.

    Built like any ``DataLoader`` (``sampler=``, ``batch_size=``, ``generator=`` ...), so
    Lightning can rebuild it around a distributed sampler. ``len()`` stays the full epoch
    (Lightning counts the batches done before the checkpoint itself). The skip acts on the
    index sampler that the iterator reads (``DataLoader._index_sampler``), so the skipped
    batches are never loaded, with or without workers.

    Note:
        State: ``{"version": 1, "batches_served": n}``, the batches the current iterator handed
        out.
    """

    def __init__(self, dataset: Dataset, *args: Any, **kwargs: Any) -> None:
        super().__init__(dataset, *args, **kwargs)
        self._seed = None if self.generator is None else self.generator.initial_seed()
        self._served = 0
        self._skip = 0
        self._skipping = 0

    @property
    def _index_sampler(self) -> Any:
        index_sampler = super()._index_sampler
        return _SkipFirst(index_sampler, self._skipping) if self._skipping else index_sampler

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        if self.generator is not None and self._seed is not None:
            self.generator.manual_seed(self._seed)
        self._served = self._skip
        self._skipping, self._skip = self._skip, 0
        try:
            iterator = super().__iter__()  # reads `_index_sampler` once, here
        finally:
            self._skipping = 0
        return self._counted(iterator)

    def _counted(self, iterator: Iterator[Any]) -> Iterator[Any]:
        for batch in iterator:
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The batches served by the current iterator of this epoch."""
        return {"version": _STATE_VERSION, "batches_served": self._served}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Make the next iterator start after ``state_dict["batches_served"]`` batches."""
        if state_dict["version"] != _STATE_VERSION:
            raise ValueError(
                f"ResumableDataLoader state version {state_dict['version']!r} is not supported "
                f"(this version reads {_STATE_VERSION})."
            )
        self._skip = self._served = int(state_dict["batches_served"])
