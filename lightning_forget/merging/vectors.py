"""Task vectors: τ = θ_ft − θ_0 by parameter name, and the input handling every merge shares.

Which entries are "parameters". Only floating-point entries take part in a task vector.
Integer and boolean entries (``num_batches_tracked``, ``position_ids``) and the running
statistics of normalisation layers (names ending in ``running_mean``, ``running_var``) are
buffers. When an ``nn.Module`` is passed, exactly its ``named_parameters()`` are parameters.
Tied weights (two names sharing one tensor, e.g. GPT-2's ``lm_head.weight`` and
``transformer.wte.weight``) are one parameter under the first name, written back identical
under both names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Optional, Union

import torch
from torch import Tensor, nn

from lightning_forget.sharding import local_view
from lightning_forget.validation import check_float, message

__all__ = ["StateLike", "task_vector"]

StateLike = Union[Mapping[str, Tensor], nn.Module]

# Normalisation statistics are float buffers that must never be scaled or merged as weights.
_STAT_BUFFER = re.compile(r"(?:^|\.)(?:running_mean|running_var|num_batches_tracked)$")


def real(name: str, value: object, **bounds: float) -> float:
    """``value`` as a finite float (``TypeError`` for a non-number, ``ValueError`` for NaN/inf/out of bounds)."""
    return check_float(name, value, **bounds)  # type: ignore[arg-type,return-value]


def state_and_params(obj: StateLike, what: str) -> tuple[dict[str, Tensor], list[str]]:
    """The state dict of ``obj`` and the names of its parameters (tied aliases removed)."""
    if isinstance(obj, nn.Module):
        state = {name: t.detach() for name, t in obj.state_dict().items()}
        params = [name for name, p in obj.named_parameters() if p.is_floating_point()]
        return state, params
    if isinstance(obj, Mapping):
        state = dict(obj)
        for name, value in state.items():
            if not isinstance(value, Tensor):
                raise TypeError(
                    f"`{what}` must map parameter names to tensors, but entry {name!r} is a "
                    f"{type(value).__name__}. Fix: pass a model state dict (for a Lightning "
                    "checkpoint, its `['state_dict']`)."
                )
        params = [n for n, t in state.items() if t.is_floating_point() and not _STAT_BUFFER.search(n)]
        return state, _drop_tied_aliases(state, params)
    raise TypeError(message(what, "an nn.Module or a state dict (Mapping[str, Tensor])", obj))


def _storage_key(t: Tensor) -> tuple[int, tuple[int, ...], tuple[int, ...], int]:
    """Equal for two entries that are one tensor. A sharded entry (an FSDP2 state dict's DTensor) has no
    storage of its own (``data_ptr()`` is 0 for every DTensor): its local shard's storage tells ties
    apart (the entries of one tied parameter share it); a shard without storage (an empty shard) is
    taken as untied."""
    local = local_view(t)
    if local is not t and local.data_ptr() == 0:
        return (-id(t), tuple(t.shape), (), 0)
    return (local.data_ptr(), tuple(t.shape), tuple(local.stride()), local.storage_offset())


def _drop_tied_aliases(state: Mapping[str, Tensor], names: list[str]) -> list[str]:
    """Keep the first name of every group of names that share one tensor."""
    seen: set[tuple[int, tuple[int, ...], tuple[int, ...], int]] = set()
    kept = []
    for name in names:
        key = _storage_key(state[name])
        if state[name].numel() > 0 and key in seen:
            continue
        seen.add(key)
        kept.append(name)
    return kept


def tied_aliases(state: Mapping[str, Tensor], params: Sequence[str]) -> dict[str, str]:
    """Map every state entry that aliases a parameter in ``params`` to that parameter's name."""
    owner = {_storage_key(state[name]): name for name in params}
    aliases = {}
    for name, t in state.items():
        if name in params or not isinstance(t, Tensor) or t.numel() == 0:
            continue
        key = _storage_key(t)
        if key in owner:
            aliases[name] = owner[key]
    return aliases


def check_pair(base: Mapping[str, Tensor], other: Mapping[str, Tensor], params: Sequence[str], what: str) -> None:
    """Both models have every parameter in ``params``, with the same shapes."""
    missing = [n for n in params if n not in base]
    if missing:
        raise KeyError(
            f"{len(missing)} parameter(s) of `{what}` are missing from `pretrained`, e.g. "
            f"{missing[:5]}. Both models must have the same architecture and parameter names "
            "(strip or add prefixes such as 'model.' so they match)."
        )
    bad = [(n, tuple(base[n].shape), tuple(other[n].shape)) for n in params if base[n].shape != other[n].shape]
    if bad:
        n, a, b = bad[0]
        raise ValueError(
            f"{len(bad)} parameter(s) differ in shape between `pretrained` and `{what}`, e.g. "
            f"{n!r}: {a} vs {b}. Task vectors need identical architectures."
        )


def check_finite(state: Mapping[str, Tensor], params: Sequence[str], what: str) -> None:
    """Refuse NaN or infinite entries: merging would hide them (TIES' trimming drops them)."""
    for name in params:
        t = state[name]
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(
                f"`{what}` has {bad} NaN/infinite value(s) in parameter {name!r}; a merge would hide "
                "them. Fix: check that model's training (or drop it from the merge)."
            )


def task_vector(pretrained: StateLike, finetuned: StateLike) -> dict[str, Tensor]:
    """The task vector τ = θ_ft − θ_0 of a fine-tuned model, by parameter name.

    From "Editing Models with Task Arithmetic" (Ilharco et al., ICLR 2023). Only floating-point
    parameters are included (see the module docstring for what counts as a buffer); tied
    aliases appear once, under their first name.

    Args:
        pretrained: the pre-trained weights θ_0 (an ``nn.Module`` or a state dict).
        finetuned: the fine-tuned weights θ_ft, same architecture.

    Returns:
        A new dict ``name -> θ_ft − θ_0`` (float tensors on ``finetuned``'s devices).

    Raises:
        TypeError: an input is neither a module nor a mapping of tensors.
        KeyError: a parameter of ``finetuned`` is missing from ``pretrained``.
        ValueError: a parameter's shape differs between the two.
    """
    base, _ = state_and_params(pretrained, "pretrained")
    state, params = state_and_params(finetuned, "finetuned")
    check_pair(base, state, params, "finetuned")
    return {n: state[n] - base[n].to(device=state[n].device, dtype=state[n].dtype) for n in params}


def apply_scaled(
    base: Mapping[str, Tensor],
    delta: Mapping[str, Tensor],
    scales: Mapping[str, Optional[float]],
    out: dict[str, Tensor],
    fallback: Mapping[str, Tensor],
) -> None:
    """Write θ_0 + λ·δ into ``out`` (``fallback[name]`` where λ is None)."""
    for name, d in delta.items():
        scale = scales[name]
        if scale is None:
            out[name] = fallback[name].clone()
        else:
            out[name] = base[name].to(device=d.device, dtype=d.dtype) + scale * d


def l1_norm(vec: Mapping[str, Tensor]) -> float:
    """‖vec‖₁ over all entries, in float64."""
    total = float(sum(t.detach().double().abs().sum() for t in vec.values()))
    return total if math.isfinite(total) else float("nan")
