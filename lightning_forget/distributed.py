"""Collectives through ``trainer.strategy`` that methods share (all ranks must call them)."""

from __future__ import annotations

from typing import Any, Mapping

import lightning.pytorch as pl
import torch
from torch import Tensor

__all__ = ["gather_batch", "rank_generator", "unshare_memory"]


def gather_batch(trainer: "pl.Trainer", fields: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Concatenate a per-rank batch of fields across ranks, in rank order.

    Ranks may hold different numbers of samples (a last, smaller batch); rows are padded for
    the collective and trimmed after. On one process the batch comes back unchanged.
    """
    if trainer.world_size <= 1:
        return dict(fields)
    strategy = trainer.strategy
    first = next(iter(fields.values()))
    size = torch.tensor([first.shape[0]], device=first.device)
    sizes = strategy.all_gather(size).flatten().tolist()
    longest = int(max(sizes))
    gathered: dict[str, Tensor] = {}
    for key, value in fields.items():
        pad = longest - value.shape[0]
        if pad:
            value = torch.cat([value, value.new_zeros((pad, *value.shape[1:]))])
        stacked = strategy.all_gather(value.contiguous())  # (world, longest, ...)
        gathered[key] = torch.cat([stacked[r, : int(n)] for r, n in enumerate(sizes)])
    return gathered


def rank_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and integer keys (e.g. step and rank)."""
    value = int(seed) & 0xFFFFFFFF
    for key in keys:
        value = (value * 1_000_003 + int(key) + 1) % (2**61 - 1)
    return torch.Generator().manual_seed(value)


def unshare_memory(obj: Any) -> None:
    """Give this process private copies of the shared-memory CPU tensors held by ``obj``.

    ``torch.multiprocessing`` moves every CPU tensor it pickles into shared memory, so under
    ``strategy="ddp_spawn"`` (and any launcher that pickles callbacks into workers) a tensor
    attribute created before ``fit`` is *one* storage written by every rank. Lightning copies the
    parameters and buffers of ``nn.Module``s, but not the tensors of callbacks or metric states;
    those silently sum or overwrite each other across ranks. This walks ``obj``'s attributes
    (through dicts, lists and tuples, and into objects defined in ``lightning_forget``) and
    replaces each shared tensor with a clone. Tensors that are not shared are left as they are.

    Args:
        obj: a callback, metric, buffer or container to fix in place.
    """
    seen: set[int] = {id(obj)}

    def fix_attributes(owner: Any) -> None:
        for key, item in list(getattr(owner, "__dict__", {}).items()):
            fixed = fix(item)
            if fixed is not item:
                object.__setattr__(owner, key, fixed)

    def fix(value: Any) -> Any:
        if isinstance(value, Tensor):
            return value.clone() if value.device.type == "cpu" and value.is_shared() else value
        if id(value) in seen:
            return value
        seen.add(id(value))
        if isinstance(value, dict):
            for key, item in list(value.items()):
                value[key] = fix(item)
        elif isinstance(value, list):
            value[:] = [fix(item) for item in value]
        elif isinstance(value, tuple) and not hasattr(value, "_fields"):
            return tuple(fix(item) for item in value)
        elif not isinstance(value, (type, torch.nn.Module)) and type(value).__module__.startswith("lightning_forget"):
            fix_attributes(value)
        return value

    fix_attributes(obj)
