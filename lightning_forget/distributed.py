"""Collectives through ``trainer.strategy`` that methods share (all ranks must call them)."""

from __future__ import annotations

from typing import Mapping

import lightning.pytorch as pl
import torch
from torch import Tensor

__all__ = ["gather_batch", "rank_generator"]


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
