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

:class:`ResumableDataLoader` is that loader: a ``DataLoader`` over a
:class:`ResumableBatchSampler` that counts the batches its iterator has handed out; its state is
that count, and after ``load_state_dict`` the next iterator skips that many batches of indices
(without loading their samples) and serves the rest. The order itself is a function of
``(seed, epoch)`` (``EpochShuffleSampler``), so the skipped batches are those the interrupted run
saw. Under DDP Lightning rebuilds the batch sampler around its ``DistributedSampler`` (from the
saved constructor arguments), and each rank skips its own first batches.

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

from typing import Any, Iterator

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

__all__ = ["ResumableBatchSampler", "ResumableDataLoader", "seeded_generator"]

_STATE_VERSION = 1


def seeded_generator(seed: int, salt: int) -> torch.Generator:
    """A private CPU generator seeded by ``(seed, salt)``."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(salt))


class ResumableBatchSampler(BatchSampler):
    """A ``BatchSampler`` whose next iteration can start ``skip`` batches in.

    Args:
        sampler: the sample indices (Lightning swaps in a distributed one under DDP).
        batch_size: samples per batch.
        drop_last: drop the last incomplete batch.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.skip = 0

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        for number, batch in enumerate(super().__iter__()):
            if number >= skip:
                yield batch


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position in the epoch travels in Lightning's checkpoint.

    Build it with ``batch_sampler=ResumableBatchSampler(...)`` and ``generator=``; everything
    else is ``DataLoader``'s. ``len()`` stays the full epoch (Lightning counts the batches done
    before the checkpoint itself).

    Note:
        State: ``{"version": 1, "batches_served": n}``, the batches the current iterator handed
        out.
    """

    def __init__(self, dataset: Dataset, *args: Any, **kwargs: Any) -> None:
        super().__init__(dataset, *args, **kwargs)
        if not isinstance(self.batch_sampler, ResumableBatchSampler):
            raise TypeError(
                f"ResumableDataLoader needs `batch_sampler=ResumableBatchSampler(...)`, got "
                f"{type(self.batch_sampler).__name__}."
            )
        self._seed = None if self.generator is None else self.generator.initial_seed()
        self._served = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        if self.generator is not None and self._seed is not None:
            self.generator.manual_seed(self._seed)
        self._served = self.batch_sampler.skip  # type: ignore[union-attr]
        return self._counted(super().__iter__())

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
        served = int(state_dict["batches_served"])
        self.batch_sampler.skip = served  # type: ignore[union-attr]
        self._served = served
