"""Checkpoint the global random number generators, so a resumed run draws what the original drew."""

from __future__ import annotations

import random
from typing import Any, Optional

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

try:  # Python 3.12+
    from typing import override
except ImportError:  # pragma: no cover
    from typing_extensions import override

__all__ = ["RNGStateCheckpoint", "capture_rng_state", "restore_rng_state"]


def _numpy_state() -> tuple[str, torch.Tensor, int, int, float]:
    # Plain values and a tensor, so checkpoints load with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)


def capture_rng_state() -> dict[str, Any]:
    """This process's torch (CPU and, where initialised, CUDA), NumPy and Python RNG states."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set this process's RNGs to what :func:`capture_rng_state` returned."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RNGStateCheckpoint(Callback):
    """Save the global RNG states of every rank with the checkpoint and restore them on resume.

    Lightning checkpoints weights, optimizers, loops and callback state, but not the global
    random number generators that dropout, random augmentations and samplers without their own
    generator draw from. A run resumed from a checkpoint therefore draws different dropout
    masks than the uninterrupted run, and ends with different parameters. This callback stores
    the torch (CPU, and CUDA where in use), NumPy and Python RNG states of **each rank** in its
    ``state_dict`` and puts them back when training resumes, so the resumed run makes the same
    draws as the uninterrupted one.

    When the states are put back: a resumed fit first runs the sanity check and creates its data
    iterators, which draw from the global RNGs. So the saved states are restored at
    ``on_train_epoch_start`` of the resumed epoch (before its loader iterator is created, which
    matches a checkpoint written at an epoch's end) and once more at ``on_train_batch_start`` of
    the first resumed batch if the run resumes in the middle of an epoch (matching a checkpoint
    written after a training batch, e.g. ``ModelCheckpoint(every_n_train_steps=...)``).
    ``load_state_dict`` also restores them at once, for code that loads outside ``fit``.

    It must be in the callbacks of the resumed run too (the checkpoint's state is only read by a
    callback that is there). In a LightningCLI YAML::

        trainer:
          callbacks:
            - class_path: lightning_forget.callbacks.RNGStateCheckpoint

    Under DDP every rank has its own RNG state; ``state_dict`` gathers all of them (a collective:
    Lightning's ``trainer.save_checkpoint`` calls it on every rank) and each rank restores its
    own on resume. Resuming with another world size cannot reproduce the run: it warns and
    restores the ranks that have a saved state.

    Exactness needs every draw between the checkpoint and the resumed step to be the same in
    both runs: data loading with ``num_workers=0`` that draws from the global RNGs per sample
    (random augmentation in ``__getitem__``) happens one batch ahead of training in Lightning's
    prefetching and is not covered.

    Note:
        Saved state: ``version``; ``world_size``; ``ranks`` = one dict per rank with
        ``torch`` (ByteTensor), ``numpy`` (name, int64 key tensor, position, gauss flag and
        cache) and ``python`` states and ``cuda`` (list of
        ByteTensors) where CUDA is initialised.
    """

    STATE_VERSION = 1

    def __init__(self) -> None:
        super().__init__()
        self._pending: Optional[dict[str, Any]] = None

    def _rank(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    @override
    def state_dict(self) -> dict[str, Any]:
        local = capture_rng_state()
        rank, world = self._rank()
        ranks: list[Any] = [local]
        if world > 1:
            ranks = [None] * world
            dist.all_gather_object(ranks, local)
        return {"version": self.STATE_VERSION, "world_size": world, "ranks": ranks}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = int(state_dict["version"])
        if version != self.STATE_VERSION:
            raise RuntimeError(
                f"RNGStateCheckpoint cannot read state of version {version} (this library writes "
                f"{self.STATE_VERSION}); resume with the lightning_forget release that wrote it."
            )
        rank, world = self._rank()
        saved = list(state_dict["ranks"])
        if len(saved) != world:
            rank_zero_warn(
                f"RNGStateCheckpoint: the checkpoint holds RNG states of {len(saved)} rank(s) but this run "
                f"has {world}; the resumed run cannot reproduce the original draws. Ranks below "
                f"{len(saved)} restore their saved state, the others keep theirs.",
                category=UserWarning,
            )
        self._pending = saved[rank] if rank < len(saved) else None
        if self._pending is not None:
            restore_rng_state(self._pending)

    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._pending is not None:
            restore_rng_state(self._pending)

    @override
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        if self._pending is not None:
            if batch_idx != 0:  # resumed in the middle of the epoch, after a training batch
                restore_rng_state(self._pending)
            self._pending = None
