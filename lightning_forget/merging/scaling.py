"""LiNeS layer scaling: θ_0 + λ⊙τ with λ growing linearly with depth.

From "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging"
(Wang et al., ICLR 2025). With τ = θ_ft − θ_0 and L residual blocks (found by
:func:`lightning_forget.merging.depth.block_depths`), block ℓ gets λ(ℓ) = α + β·(ℓ−1)/(L−1):
shallow layers return toward the pre-trained weights (restoring general ability, reducing
forgetting), deep layers keep the task-specific update.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Optional, Union

from torch import Tensor

from lightning_forget.merging.depth import HeadPolicy, block_depths, check_head_policy, head_names
from lightning_forget.merging.vectors import (
    StateLike,
    apply_scaled,
    l1_norm,
    real,
    state_and_params,
    task_vector,
    tied_aliases,
)

__all__ = ["check_alpha", "check_beta", "lines_scale", "lines_scale_map", "lines_scales", "norm_ratio_alpha"]

# In a LoRA pair ΔW = B·A, scaling B by λ and keeping A scales the delta exactly by λ.
_LORA_A = re.compile(r"(?:^|\.)(?:lora_A|lora_embedding_A)(?:\.|$)")


def check_alpha(alpha: object, name: str = "alpha") -> float:
    """LiNeS' α: a float in [0, 1] (0 resets to θ_0, 1 keeps the fine-tuned update).

    Raises:
        TypeError: not a number.
        ValueError: NaN, infinite or outside [0, 1].
    """
    return real(name, alpha, min=0.0, max=1.0, fix="LiNeS interpolates between θ_0 (0) and the fine-tuned model (1)")


def check_beta(beta: object, name: str = "beta") -> float:
    """LiNeS' β: a finite float >= 0 (the increase of the scale from the first to the last block)."""
    return real(name, beta, min=0.0, fix="deeper blocks keep at least the first block's share; the paper uses 0..1.5")


def lines_scales(num_blocks: int, alpha: float, beta: float) -> list[float]:
    """The LiNeS scale of each block: λ(ℓ) = α + β·(ℓ−1)/(L−1) for ℓ = 1..L.

    The first block gets α, the last α + β; with one block (L = 1) it gets α + β.

    Args:
        num_blocks: number of residual blocks L (≥ 1).
        alpha: scale of the first block (and of every parameter outside the blocks).
        beta: increase from the first to the last block.

    Raises:
        ValueError: ``num_blocks`` is not a positive int, or ``alpha``/``beta`` not finite.
        TypeError: ``alpha``/``beta`` not numbers.
    """
    if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < 1:
        raise ValueError(f"`num_blocks` must be a positive int, got {num_blocks!r}.")
    alpha, beta = real("alpha", alpha), real("beta", beta)
    if num_blocks == 1:
        return [alpha + beta]
    return [alpha + beta * i / (num_blocks - 1) for i in range(num_blocks)]


def lines_scale_map(
    names: Sequence[str],
    alpha: float,
    beta: float,
    layer_pattern: Optional[Union[str, re.Pattern[str]]] = None,
    depth_map: Optional[Mapping[str, int]] = None,
    head_policy: HeadPolicy = "exclude",
    head_pattern: Optional[str] = None,
) -> tuple[dict[str, Optional[float]], list[float]]:
    """The LiNeS scale of every parameter name, and the per-block scales.

    Parameters in block ℓ get λ(ℓ); parameters outside the blocks get α; head parameters get
    α, α+β or 1.0 by ``head_policy``, or ``None`` for ``"exclude"`` (left as they are). LoRA
    ``A`` matrices (``lora_A``/``lora_embedding_A``) get ``None`` so that scaling their ``B``
    partner scales the low-rank delta B·A exactly by λ.

    Args: see :func:`lines_scale`.

    Raises:
        ValueError: bad ``head_policy`` or no block found (see ``block_depths``).
    """
    check_head_policy(head_policy)
    depths, num_blocks = block_depths(names, layer_pattern=layer_pattern, depth_map=depth_map)
    per_block = lines_scales(num_blocks, alpha, beta)
    heads = head_names(names, depths, head_pattern)
    head_scale = {"exclude": None, "alpha": alpha, "alpha_plus_beta": alpha + beta, "one": 1.0}[head_policy]
    scales: dict[str, Optional[float]] = {}
    for name in names:
        depth = depths[name]
        if _LORA_A.search(name):
            scales[name] = None
        elif name in heads:
            scales[name] = head_scale
        elif depth is None:
            scales[name] = float(alpha)
        else:
            scales[name] = per_block[depth]
    return scales, per_block


def lines_scale(
    pretrained: StateLike,
    finetuned: StateLike,
    alpha: float,
    beta: Optional[float] = None,
    layer_pattern: Optional[Union[str, re.Pattern[str]]] = None,
    depth_map: Optional[Mapping[str, int]] = None,
    head_policy: HeadPolicy = "exclude",
    head_pattern: Optional[str] = None,
) -> dict[str, Tensor]:
    """LiNeS: scale a fine-tuned model's task vector linearly with depth.

    From "LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging"
    (Wang et al., ICLR 2025). With τ = θ_ft − θ_0 and L residual blocks, block ℓ gets
    λ(ℓ) = α + β·(ℓ−1)/(L−1) and the result is θ_0 + λ⊙τ: shallow layers return toward the
    pre-trained weights (restoring general ability, reducing forgetting), deep layers keep the
    task-specific update. Parameters outside the blocks (embeddings, final norms) get α.

    Args:
        pretrained: θ_0 (an ``nn.Module`` or a state dict).
        finetuned: θ_ft, same architecture.
        alpha: scale of the first block and of non-block parameters, in [0, 1] (the paper
            sweeps 0..1).
        beta: increase to the last block, >= 0; ``None`` → ``1 − alpha`` (the last block keeps
            its full update, the paper's single-task setting).
        layer_pattern: regex with a capture group giving the block index (see
            :func:`lightning_forget.merging.block_depths`).
        depth_map: explicit ``name -> depth`` map.
        head_policy: what the output head gets: ``"exclude"`` keeps the fine-tuned head
            unchanged (default; the paper scales only the encoder), ``"alpha"``,
            ``"alpha_plus_beta"`` or ``"one"`` (λ = 1).
        head_pattern: regex of head parameter names (default
            :data:`lightning_forget.merging.DEFAULT_HEAD_PATTERN`).

    Returns:
        A full state dict with ``finetuned``'s keys: scaled parameters, and the fine-tuned
        model's buffers unchanged.

    Raises:
        TypeError: a non-number ``alpha``/``beta``, or inputs that are not models/state dicts.
        ValueError: ``alpha`` outside [0, 1], ``beta`` < 0, or a model whose blocks cannot be
            found (the message lists parameter names and names ``layer_pattern``/``depth_map``).
        KeyError: a parameter missing from ``pretrained``.
    """
    alpha = check_alpha(alpha)
    beta = 1.0 - alpha if beta is None else check_beta(beta)
    state, params = state_and_params(finetuned, "finetuned")
    tau = task_vector(pretrained, finetuned)
    base, _ = state_and_params(pretrained, "pretrained")
    scales, _ = lines_scale_map(params, alpha, beta, layer_pattern, depth_map, head_policy, head_pattern)
    out = {name: t.clone() for name, t in state.items()}
    apply_scaled(base, tau, scales, out, state)
    for alias, owner in tied_aliases(state, params).items():
        out[alias] = out[owner]
    return out


def norm_ratio_alpha(taus: Sequence[Mapping[str, Tensor]], merged: Mapping[str, Tensor]) -> float:
    """LiNeS' α for merging: (1/T)·‖Σ_t τ_t‖₁ / ‖τ_MTL‖₁ (1/T for plain task arithmetic).

    Raises:
        ValueError: the merged vector is all zeros.
    """
    total = {n: sum(t[n] for t in taus) for n in merged}
    denom = l1_norm(merged)
    if denom == 0.0:
        raise ValueError("The merged task vector is all zeros, so LiNeS' norm-ratio α is undefined; pass `alpha`.")
    return l1_norm(total) / (len(taus) * denom)
