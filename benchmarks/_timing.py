"""Per-batch training time for the benchmark scripts (not part of the library).

``StepClock`` is a pair of callbacks: put ``clock.start`` first and ``clock.end`` last in the
callback list, so everything other callbacks do around a training batch (replay draws, unlearn
steps, buffer inserts) is inside the measured span, and work done at epoch or task ends (Fisher
passes, evaluations) is not. The median over the recorded batches is robust to a loaded machine.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import lightning.pytorch as pl


class _Start(pl.Callback):
    def __init__(self, clock: "StepClock") -> None:
        self.clock = clock

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.clock._started = time.perf_counter()


class _End(pl.Callback):
    def __init__(self, clock: "StepClock") -> None:
        self.clock = clock

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.clock.times.append((int(trainer.current_epoch), time.perf_counter() - self.clock._started))


class StepClock:
    """Seconds per training batch, as ``(epoch, seconds)`` pairs in ``times``."""

    def __init__(self) -> None:
        self._started = 0.0
        self.times: list[tuple[int, float]] = []
        self.start, self.end = _Start(self), _End(self)

    def median(self, from_epoch: int = 0, warmup: int = 5) -> float:
        """Median seconds per batch from epoch ``from_epoch`` on, leaving out the first ``warmup``
        batches of the run (allocator and autograd warm-up)."""
        kept = [seconds for i, (epoch, seconds) in enumerate(self.times) if i >= warmup and epoch >= from_epoch]
        if not kept:
            raise ValueError(f"no batch timed from epoch {from_epoch} on (after {warmup} warm-up batches)")
        return statistics.median(kept)
