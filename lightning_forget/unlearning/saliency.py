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

__all__ = ["SaliencyMask"]


class SaliencyMask:
    """A boolean mask per parameter (``True`` = may change) and the original values of the rest.

    Args:
        masks: ``{parameter name: bool tensor of its shape}``.
        originals: ``{parameter name: its values when the mask was made}`` (CPU), for the
            parameters that have masked-out entries.
    """

    def __init__(self, masks: Mapping[str, Tensor], originals: Mapping[str, Tensor]) -> None:
        self.masks = {k: v.detach().cpu().bool() for k, v in masks.items()}
        self.originals = {k: v.detach().cpu().clone() for k, v in originals.items()}

    # ------------------------------------------------------------------ building
    @staticmethod
    def from_gradients(gradients: Mapping[str, Tensor], fraction: float,
                       parameters: Optional[Mapping[str, Tensor]] = None) -> "SaliencyMask":
        """Keep the globally largest ``fraction`` of ``|gradient|`` entries.

        Ties at the cut-off are broken by position (``torch.topk``), so exactly
        ``round(fraction × total)`` entries are kept. ``parameters`` (current values) are
        remembered for the masked-out entries.
        """
        if not 0 < fraction <= 1:
            raise ValueError(f"SaliencyMask: `fraction` must be in (0, 1], got {fraction!r}. Fix: e.g. fraction=0.5.")
        names = list(gradients)
        flat = torch.cat([gradients[n].detach().float().abs().flatten().cpu() for n in names]) if names else torch.zeros(0)
        keep = int(round(fraction * flat.numel()))
        chosen = torch.zeros(flat.numel(), dtype=torch.bool)
        if keep > 0:
            chosen[torch.topk(flat, keep, sorted=False).indices] = True
        masks: dict[str, Tensor] = {}
        offset = 0
        for n in names:
            size = gradients[n].numel()
            masks[n] = chosen[offset : offset + size].view(gradients[n].shape)
            offset += size
        originals = {n: parameters[n] for n in names if parameters is not None and not bool(masks[n].all())}
        return SaliencyMask(masks, originals)

    @property
    def fraction(self) -> float:
        """Share of entries that may change."""
        total = sum(m.numel() for m in self.masks.values())
        return sum(int(m.sum()) for m in self.masks.values()) / max(1, total)

    # ------------------------------------------------------------------ applying
    def mask_gradients(self, named_parameters: Iterable[tuple[str, nn.Parameter]]) -> None:
        """``grad *= mask`` for every masked parameter that has a gradient."""
        with torch.no_grad():
            for name, p in named_parameters:
                mask = self.masks.get(name)
                if mask is not None and p.grad is not None:
                    p.grad.mul_(mask.to(p.grad.device, p.grad.dtype))

    def restore(self, named_parameters: Iterable[tuple[str, nn.Parameter]],
                optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
        """Reset masked-out entries to their original values and zero their optimizer state."""
        params = dict(named_parameters)
        with torch.no_grad():
            for name, original in self.originals.items():
                p = params.get(name)
                if p is None:
                    continue
                keep = self.masks[name].to(p.device)
                p.copy_(torch.where(keep, p, original.to(p.device, p.dtype)))
                for optimizer in optimizers:
                    for value in optimizer.state.get(p, {}).values():
                        if isinstance(value, Tensor) and value.shape == p.shape:
                            value.masked_fill_(~keep.to(value.device), 0)

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, dict[str, Tensor]]:
        return {"masks": dict(self.masks), "originals": dict(self.originals)}

    @staticmethod
    def from_state(state: Mapping[str, Mapping[str, Tensor]]) -> "SaliencyMask":
        return SaliencyMask(state["masks"], state["originals"])
