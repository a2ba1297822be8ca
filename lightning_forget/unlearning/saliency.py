"""SalUn's weight-saliency mask as a composable piece (no Lightning).

Fan et al., "SalUn: Empowering Machine Unlearning via Gradient-based Weight Saliency in Both
Image Classification and Generation" (ICLR 2024), ``Classification/generate_mask.py``:

1. one pass over the forget data accumulates ``g = Σ ∇_θ ℓ_f`` (their ``ℓ_f`` is ``−CE``; only
   ``|g|`` matters, so the sign does not);
2. all entries of ``|g|`` are ranked **globally** (across every parameter tensor) and the top
   fraction ``γ`` is kept: ``mask = 1`` there, 0 elsewhere;
3. during unlearning, gradients are multiplied by the mask before each step; masked-out weights
   are reset to their original values after it and their optimizer state (momentum, Adam moments)
   is zeroed, so they stay exactly where they were.

:class:`SaliencyMask` holds the mask and the original values by parameter name; it works on top of
any objective (the callbacks take ``mask_fraction``).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

from lightning_forget.sharding import (
    _all_reduce_partials,
    edit_local,
    full_tensor,
    is_sharded,
    local_clone,
    local_view,
    shard_like,
    topk_mask,
)

__all__ = ["SaliencyMask"]


class SaliencyMask:
    """A boolean mask per parameter (``True`` = may change) and the original values of the rest.

    Under FSDP2 (``ModelParallelStrategy``) both are held as each rank's local shards, in the
    parameters' own layout: :meth:`from_gradients` selects the global top-``k`` over all shards
    (:func:`lightning_forget.sharding.topk_mask`, the same set as the unsharded selection), and
    every update is shard-wise. :meth:`state` gathers full tensors for checkpoints; a mask loaded
    from one (:meth:`from_state`) is cut back to the rank's shards at its first use.

    Args:
        masks: ``{parameter name: bool tensor of its shape}`` (or of its local shard's shape).
        originals: ``{parameter name: its values when the mask was made}`` (CPU), for the
            parameters that have masked-out entries.
    """

    def __init__(self, masks: Mapping[str, Tensor], originals: Mapping[str, Tensor], full: bool = True) -> None:
        self.masks = {k: v.detach().cpu().bool() for k, v in masks.items()}
        self.originals = {k: v.detach().cpu().clone() for k, v in originals.items()}
        #: Whether masks/originals are whole tensors (cut to this rank's shards at the first use when sharded).
        self.full = bool(full)

    # ------------------------------------------------------------------ building
    @staticmethod
    def from_gradients(gradients: Mapping[str, Tensor], fraction: float,
                       parameters: Optional[Mapping[str, Tensor]] = None) -> "SaliencyMask":
        """Keep the globally largest ``fraction`` of ``|gradient|`` entries.

        Exactly ``round(fraction × total)`` entries are kept; ties at the cut-off are broken by
        position (parameter order, then row-major index), over all shards when the gradients are
        sharded (DTensors). ``parameters`` (current values) are remembered for the masked-out
        entries (their local shards).
        """
        if not 0 < fraction <= 1:
            raise ValueError(f"SaliencyMask: `fraction` must be in (0, 1], got {fraction!r}. Fix: e.g. fraction=0.5.")
        names = list(gradients)
        total = sum(int(gradients[n].numel()) for n in names)
        keep = int(round(fraction * total))
        masks = topk_mask({n: gradients[n].detach().abs() for n in names}, keep)
        sharded = any(is_sharded(gradients[n]) for n in names)
        kept_all = {n: bool(masks[n].all()) for n in names}
        if sharded:  # a tensor fully kept on this rank may not be on another: decide on the whole tensor
            partial = torch.tensor([float(not kept_all[n]) for n in names], dtype=torch.float64)
            if names:
                partial = _all_reduce_partials(partial, [gradients[n] for n in names])
            kept_all = {n: float(partial[i]) == 0 for i, n in enumerate(names)}
        originals = {n: local_clone(parameters[n], device="cpu") for n in names
                     if parameters is not None and not kept_all[n]}
        return SaliencyMask(masks, originals, full=not sharded)

    @property
    def fraction(self) -> float:
        """Share of entries that may change (of this rank's entries when held as shards)."""
        total = sum(m.numel() for m in self.masks.values())
        return sum(int(m.sum()) for m in self.masks.values()) / max(1, total)

    def _localize(self, params: Mapping[str, Tensor]) -> None:
        """Cut whole masks/originals (loaded from a checkpoint) to the shards of sharded ``params``."""
        if not self.full:
            return
        if any(is_sharded(p) for p in params.values()):
            self.masks = {n: shard_like(m, params[n]).clone() if n in params else m for n, m in self.masks.items()}
            self.originals = {n: shard_like(o, params[n]).clone() if n in params else o for n, o in self.originals.items()}
            self.full = False

    # ------------------------------------------------------------------ applying
    def mask_gradients(self, named_parameters: Iterable[tuple[str, nn.Parameter]]) -> None:
        """``grad *= mask`` for every masked parameter that has a gradient (shard-wise)."""
        params = dict(named_parameters)
        self._localize(params)
        for name, p in params.items():
            mask = self.masks.get(name)
            if mask is not None and p.grad is not None:
                edit_local(p.grad, lambda g, m=mask: g * m.to(g.device, g.dtype))

    def restore(self, named_parameters: Iterable[tuple[str, nn.Parameter]],
                optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
        """Reset masked-out entries to their original values and zero their optimizer state (shard-wise)."""
        params = dict(named_parameters)
        self._localize(params)
        optimizers = list(optimizers)
        for name, original in self.originals.items():
            p = params.get(name)
            if p is None:
                continue
            local = local_view(p)
            keep = self.masks[name].to(local.device)
            edit_local(p, lambda v: torch.where(keep, v, original.to(v.device, v.dtype)))
            for optimizer in optimizers:
                for value in optimizer.state.get(p, {}).values():
                    if isinstance(value, Tensor) and value.shape == p.shape:
                        edit_local(value, lambda v: v.masked_fill(~keep.to(v.device), 0))

    # ------------------------------------------------------------------ state
    def state(self, params: Optional[Mapping[str, Tensor]] = None) -> dict[str, dict[str, Tensor]]:
        """Masks and originals as whole CPU tensors; ``params`` (name → parameter) gives the layout of
        shards to gather (a collective under FSDP2: every rank calls it, as at a checkpoint)."""
        if self.full or params is None:
            return {"masks": dict(self.masks), "originals": dict(self.originals)}
        return {
            # as uint8: gloo gathers no booleans
            "masks": {n: full_tensor(m.to(local_view(params[n]).device, torch.uint8), like=params[n]).cpu().bool()
                      for n, m in self.masks.items()},
            "originals": {n: full_tensor(o.to(local_view(params[n]).device), like=params[n]).cpu()
                          for n, o in self.originals.items()},
        }

    @staticmethod
    def from_state(state: Mapping[str, Mapping[str, Tensor]]) -> "SaliencyMask":
        return SaliencyMask(state["masks"], state["originals"], full=True)
