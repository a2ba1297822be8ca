"""Collectives through ``trainer.strategy`` that methods share (all ranks must call them)."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DistributedSampler

__all__ = ["gather_batch", "rank_generator", "sampler_padding_mask", "unshare_memory"]


def _field_layout(fields: Mapping[str, Tensor]) -> list[tuple[str, tuple[int, ...], torch.dtype, int]]:
    """``(name, sample shape, dtype, bytes per sample)`` of each field, in order."""
    layout = []
    for key, value in fields.items():
        shape = tuple(value.shape[1:])
        layout.append((key, shape, value.dtype, math.prod(shape) * value.element_size()))
    return layout


def _pack_rows(fields: Mapping[str, Tensor], n: int, device: torch.device) -> Tensor:
    """Every field's rows as bytes, side by side: an ``(n, bytes per sample)`` uint8 tensor."""
    parts = []
    for value in fields.values():
        value = value.detach().to(device).contiguous()
        if value.dtype == torch.bool:
            value = value.to(torch.uint8)
        width = math.prod(value.shape[1:])
        parts.append(value.reshape(n, width).view(torch.uint8) if width else value.new_zeros((n, 0), dtype=torch.uint8))
    return torch.cat(parts, dim=1) if parts else torch.zeros((n, 0), dtype=torch.uint8, device=device)


def _unpack_rows(rows: Tensor, layout: list[tuple[str, tuple[int, ...], torch.dtype, int]]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    offset = 0
    n = rows.shape[0]
    for key, shape, dtype, nbytes in layout:
        chunk = rows[:, offset : offset + nbytes].contiguous()
        offset += nbytes
        if dtype == torch.bool:
            value = chunk.reshape(n, *shape).bool()
        elif nbytes:
            value = chunk.view(dtype).reshape(n, *shape)
        else:
            value = torch.zeros((n, *shape), dtype=dtype, device=rows.device)
        out[key] = value
    return out


def gather_batch(
    trainer: "pl.Trainer", fields: Mapping[str, Tensor], keep: Optional[Tensor] = None
) -> dict[str, Tensor]:
    """Concatenate a per-rank batch of fields across ranks, in rank order.

    Every field is packed side by side as bytes into one ``(rows, bytes per sample)`` tensor, so
    fields of any dtype travel in a single ``all_gather`` (Lightning's ``strategy.all_gather``
    is one ``torch.distributed`` collective, with no barrier of its own).

    Args:
        trainer: the trainer whose strategy gathers.
        fields: per-sample tensors with the same number of rows.
        keep: a boolean mask of the rows to keep (e.g. not :func:`sampler_padding_mask`'s
            repeats). Pass it only when every rank holds the same number of rows, which a
            ``DistributedSampler``'s batches do: the mask then travels with the rows as one more
            byte and the gather is **one** collective; the dropped rows are removed after it.
            Without ``keep``, ranks may hold different numbers of rows (a last, smaller batch):
            a first collective gathers the row counts, rows are padded for the second and
            trimmed after (two collectives).

    On one process the batch comes back unchanged (``keep`` applied).
    """
    if trainer.world_size <= 1:
        if keep is None:
            return dict(fields)
        return {k: v[keep.to(v.device)] for k, v in fields.items()}
    strategy = trainer.strategy
    first = next(iter(fields.values()))
    n = int(first.shape[0])
    device = first.device
    layout = _field_layout(fields)
    rows = _pack_rows(fields, n, device)
    if keep is not None:
        flags = keep.to(device=device, dtype=torch.uint8).reshape(n, 1)
        stacked = strategy.all_gather(torch.cat([rows, flags], dim=1))  # (world, n, bytes + 1)
        joined = stacked.reshape(-1, stacked.shape[-1])
        joined = joined[joined[:, -1].bool(), :-1]
        return _unpack_rows(joined, layout)
    sizes = strategy.all_gather(torch.tensor([n], device=device, dtype=torch.long)).flatten().tolist()
    longest = int(max(sizes))
    if longest > n:
        rows = torch.cat([rows, rows.new_zeros((longest - n, rows.shape[1]))])
    stacked = strategy.all_gather(rows)  # (world, longest, bytes per sample)
    joined = torch.cat([stacked[r, : int(k)] for r, k in enumerate(sizes)])
    return _unpack_rows(joined, layout)


def sampler_padding_mask(trainer: "pl.Trainer", batch_idx: int, num_rows: int) -> Optional[Tensor]:
    """Which rows of this rank's training batch ``batch_idx`` are padding of a ``DistributedSampler``.

    With ``drop_last=False`` (Lightning's default), ``DistributedSampler`` makes every rank draw
    the same number of samples by repeating the first ``total_size - len(dataset)`` indices of the
    epoch's order; rank ``r``'s ``i``-th sample of the epoch is position ``i * world + r`` of that
    padded order, so it is a repeat exactly when that position is ``>= len(dataset)``. Returns a
    boolean mask (``True`` = padded repeat), or ``None`` when the loader is not sampled that way
    (one process, a custom batch sampler, several loaders) and nothing can be said.

    The rule needs the batch's position in the epoch (``batch_idx * batch_size``), which holds for
    the library's loaders and any loader Lightning resumes at its exact batch.
    """
    if trainer.world_size <= 1:
        return None
    loader = getattr(trainer, "train_dataloader", None)
    sampler = getattr(loader, "sampler", None)
    batch_size = getattr(loader, "batch_size", None)
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last or not batch_size:
        return None
    dataset_len = len(sampler.dataset)  # type: ignore[arg-type]
    if sampler.total_size <= dataset_len:
        return None
    local = batch_idx * int(batch_size) + torch.arange(num_rows)
    return local * int(sampler.num_replicas) + int(sampler.rank) >= dataset_len


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
    replaces each shared tensor with a clone; an ``nn.Module`` it reaches (a teacher, a snapshot
    held by a callback) gets private copies of its shared parameters (``param.data``, so the
    ``Parameter`` objects and any optimizer holding them stay the same) and buffers. Tensors that
    are not shared are left as they are.

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
        elif isinstance(value, torch.nn.Module):
            fix_module(value)
        elif not isinstance(value, type) and type(value).__module__.startswith("lightning_forget"):
            fix_attributes(value)
        return value

    def fix_module(module: torch.nn.Module) -> None:
        for param in module.parameters():
            if param.device.type == "cpu" and param.data.is_shared():
                param.data = param.data.clone()
        for sub in module.modules():
            for name, buffer in list(sub._buffers.items()):
                if buffer is not None and buffer.device.type == "cpu" and buffer.is_shared():
                    sub._buffers[name] = buffer.clone()

    fix_attributes(obj)
