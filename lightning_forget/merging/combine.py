"""Merging models fine-tuned from one pre-trained model: task arithmetic and TIES, ± LiNeS.

- :func:`task_arithmetic`: θ_0 + s·Σ_t τ_t ("Editing Models with Task Arithmetic", Ilharco et
  al., ICLR 2023).
- :func:`ties_merge`: trim → elect sign → disjoint mean ("TIES-Merging: Resolving Interference
  When Merging Models", Yadav et al., NeurIPS 2023).
- :func:`merge`: either of them, optionally followed by LiNeS with the paper's norm-ratio α.

Buffers: float buffers (e.g. BatchNorm running statistics) are averaged over the fine-tuned
models, integer ones copied from the pre-trained model. Inputs are never modified.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Literal, Optional, Union

import torch
from torch import Tensor, nn

from lightning_forget.merging.depth import HeadPolicy
from lightning_forget.merging.scaling import check_alpha, check_beta, lines_scale_map, norm_ratio_alpha
from lightning_forget.merging.vectors import (
    StateLike,
    apply_scaled,
    check_finite,
    check_pair,
    real,
    state_and_params,
    task_vector,
    tied_aliases,
)
from lightning_forget.sharding import kth_largest
from lightning_forget.validation import check_choice, message

__all__ = ["MergeMethod", "TiesTrim", "TiesZeroSign", "TiesCountTied", "merge", "task_arithmetic", "ties_merge", "ties_vector"]

MergeMethod = Literal["task_arithmetic", "ties"]
TiesTrim = Literal["official", "ceil"]
TiesZeroSign = Literal["majority", "zero"]
TiesCountTied = Literal["per_key", "once"]


def _task_vectors(pretrained: StateLike, finetuned_list: Sequence[StateLike]) -> tuple[
    dict[str, Tensor], list[dict[str, Tensor]], list[str], list[dict[str, Tensor]]
]:
    if isinstance(finetuned_list, (Mapping, nn.Module)) or not isinstance(finetuned_list, Sequence):
        raise TypeError(
            "`finetuned_list` must be a list of fine-tuned models or state dicts, got "
            f"{type(finetuned_list).__name__}. Fix: wrap a single model in a list."
        )
    if len(finetuned_list) == 0:
        raise ValueError("`finetuned_list` is empty; pass at least one fine-tuned model.")
    base, base_params = state_and_params(pretrained, "pretrained")
    states, param_lists = zip(*(state_and_params(f, f"finetuned_list[{i}]") for i, f in enumerate(finetuned_list)))
    params = list(param_lists[0])
    for i, p in enumerate(param_lists[1:], start=1):
        if set(p) != set(params):
            diff = sorted(set(p) ^ set(params))[:5]
            raise ValueError(
                f"`finetuned_list[{i}]` does not have the same parameters as `finetuned_list[0]` "
                f"(e.g. {diff}); all fine-tuned models must share one architecture."
            )
    check_finite(base, [n for n in params if n in base], "pretrained")
    for i, s in enumerate(states):
        check_pair(base, s, params, f"finetuned_list[{i}]")
        check_finite(s, params, f"finetuned_list[{i}]")
    taus = [task_vector(base, {n: s[n] for n in params}) for s in states]
    return base, list(states), params, taus


def _merged_buffers(base: Mapping[str, Tensor], states: Sequence[Mapping[str, Tensor]], params: Sequence[str]) -> dict[str, Tensor]:
    """Float buffers averaged over the fine-tuned models; other buffers copied from θ_0."""
    out = {}
    aliases = tied_aliases(states[0], params)
    for name, t in states[0].items():
        if name in params or name in aliases:
            continue
        if t.is_floating_point():
            out[name] = torch.stack([s[name].to(t.device) for s in states]).mean(0)
        else:
            out[name] = (base[name] if name in base else t).clone()
    return out


def _finish(out: dict[str, Tensor], state0: Mapping[str, Tensor], params: Sequence[str]) -> dict[str, Tensor]:
    for alias, owner in tied_aliases(state0, params).items():
        out[alias] = out[owner]
    return {name: out[name] for name in state0}


def _key_counts(state0: Mapping[str, Tensor], params: Sequence[str], count_tied: str) -> dict[str, int]:
    """How many state-dict keys each parameter has (1 unless tied, and only with ``"per_key"``)."""
    counts = {n: 1 for n in params}
    if check_choice("count_tied", count_tied, ("per_key", "once")) == "per_key":
        for owner in tied_aliases(state0, params).values():
            counts[owner] += 1
    return counts


def _kept_count(k: float, n: int, trim: str) -> int:
    if trim == "official":
        return min(n, int(k * n) + 1)
    return min(n, max(1, math.ceil(k * n)))


def ties_vector(
    taus: Sequence[Mapping[str, Tensor]],
    k: float = 0.2,
    trim: TiesTrim = "official",
    zero_sign: TiesZeroSign = "majority",
    key_counts: Optional[Mapping[str, int]] = None,
) -> dict[str, Tensor]:
    """The TIES-merged task vector (trim → elect sign → disjoint mean), without scaling.

    1. **Trim**: in each task vector keep the entries of largest magnitude over the whole
       flattened vector of n entries, zero the rest; entries equal to the threshold are kept.
       ``trim="official"`` (default) keeps ``int(k·n) + 1`` entries, as the authors' code does
       (it finds the ``(n − int(k·n))``-th smallest magnitude), so published TIES numbers can
       be compared: that is ⌈k·n⌉ unless k·n is an integer, when it is one more.
       ``trim="ceil"`` keeps exactly ⌈k·n⌉ (at least 1), the fraction k the paper describes.
       Both are capped at n.
    2. **Elect**: the sign of each entry is the sign of the sum of the trimmed vectors. Where
       that sum is exactly 0, ``zero_sign="majority"`` (default, the authors' code) uses the
       majority sign, the sign of the sum of all elected signs over the whole vector;
       ``zero_sign="zero"`` keeps 0, so no value is merged there (no side is favoured).
    3. **Disjoint mean**: each entry is the mean of the trimmed values that are non-zero and
       agree with the elected sign; entries where none agrees stay zero (also where the
       majority sign itself is 0, where the authors' code would average the negative values).

    Args:
        taus: task vectors with identical names and shapes.
        k: fraction of entries kept per task vector, in (0, 1].
        trim: ``"official"`` or ``"ceil"``: how many entries step 1 keeps.
        zero_sign: ``"majority"`` or ``"zero"``: the elected sign where the sum is 0.
        key_counts: how many times each name counts in n, in the threshold and in the majority
            sign (:func:`ties_merge` passes 2 for a weight tied under two state-dict keys, as
            the authors' code flattens the state dict key by key); default 1 each.

    Raises:
        ValueError: ``k`` outside (0, 1], no task vector, or a bad ``trim``/``zero_sign``.
    """
    k = real("k", k, min=0.0, max=1.0, min_inclusive=False, fix="pass the fraction of entries kept, e.g. k=0.2")
    check_choice("trim", trim, ("official", "ceil"))
    check_choice("zero_sign", zero_sign, ("majority", "zero"))
    if not taus:
        raise ValueError("`taus` is empty; pass at least one task vector.")
    names = list(taus[0])
    counts = {n: 1 for n in names} if key_counts is None else {n: int(key_counts[n]) for n in names}
    trimmed = []
    for tau in taus:
        size = sum(tau[n].numel() * counts[n] for n in names)
        if size == 0:
            trimmed.append(dict(tau))
            continue
        # Over all shards when the task vectors are sharded (FSDP2 state dicts of DTensors).
        threshold = kth_largest([tau[n].float().abs() for n in names for _ in range(counts[n])], _kept_count(k, size, trim))
        trimmed.append({n: torch.where(tau[n].abs() >= threshold.item(), tau[n], torch.zeros_like(tau[n])) for n in names})
    stacked = {n: torch.stack([t[n] for t in trimmed]) for n in names}
    elected = {n: torch.sign(s.sum(0)) for n, s in stacked.items()}
    if zero_sign == "majority" and names:
        majority = torch.sign(sum(elected[n].double().sum() * counts[n] for n in names))
        elected = {n: torch.where(e == 0, majority.to(e.dtype), e) for n, e in elected.items()}
    merged = {}
    for n in names:
        agree = (torch.sign(stacked[n]) == elected[n]) & (stacked[n] != 0)
        count = agree.sum(0)
        total = (stacked[n] * agree).sum(0)
        merged[n] = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
    return merged


def task_arithmetic(pretrained: StateLike, finetuned_list: Sequence[StateLike], scaling: float = 1.0) -> dict[str, Tensor]:
    """Task arithmetic: θ_0 + s·Σ_t τ_t.

    From "Editing Models with Task Arithmetic" (Ilharco et al., ICLR 2023): adding the task
    vectors of models fine-tuned from one pre-trained model gives a multi-task model; the
    coefficient ``scaling`` (s) is tuned on validation data (0.3 is typical for 8 tasks).

    Args:
        pretrained: θ_0.
        finetuned_list: the fine-tuned models (same architecture).
        scaling: coefficient s of the summed task vector.

    Returns:
        The merged state dict (float buffers averaged over the fine-tuned models, integer
        buffers from θ_0).

    Raises:
        TypeError, KeyError: bad inputs (see :func:`task_vector`).
        ValueError: bad inputs, or a NaN/infinite parameter (the message names it).
    """
    scaling = real("scaling", scaling)
    base, states, params, taus = _task_vectors(pretrained, finetuned_list)
    total = {n: sum(t[n] for t in taus) for n in params}
    out = _merged_buffers(base, states, params)
    apply_scaled(base, total, {n: scaling for n in params}, out, states[0])
    return _finish(out, states[0], params)


def ties_merge(
    pretrained: StateLike,
    finetuned_list: Sequence[StateLike],
    k: float = 0.2,
    scaling: float = 1.0,
    trim: TiesTrim = "official",
    zero_sign: TiesZeroSign = "majority",
    count_tied: TiesCountTied = "per_key",
) -> dict[str, Tensor]:
    """TIES-merging: θ_0 + s·TIES(τ_1..τ_T).

    From "TIES-Merging: Resolving Interference When Merging Models" (Yadav et al., NeurIPS
    2023). See :func:`ties_vector` for the trim / elect-sign / disjoint-mean steps. The
    defaults reproduce the authors' code; each has an alternative that follows the paper's
    text more literally.

    Args:
        pretrained: θ_0.
        finetuned_list: the fine-tuned models.
        k: fraction of each task vector's entries kept by magnitude (paper default 0.2).
        scaling: coefficient s of the merged vector (1.0 for the disjoint mean).
        trim: ``"official"`` keeps ``int(k·n) + 1`` entries, ``"ceil"`` keeps ⌈k·n⌉.
        zero_sign: ``"majority"`` replaces an elected sign of 0 by the majority sign,
            ``"zero"`` keeps it (nothing merged there).
        count_tied: ``"per_key"`` counts a tied weight (e.g. GPT-2's ``lm_head.weight`` and
            ``transformer.wte.weight``) once per state-dict key in the trimming threshold, as
            the authors' code does; ``"once"`` counts each tensor once (n is then the true
            number of parameters). The merged weights stay tied either way.

    Returns:
        The merged state dict.

    Raises:
        TypeError, KeyError: bad inputs.
        ValueError: bad arguments, or a NaN/infinite parameter in a model (trimming would hide
            it); the message names the model and the parameter.
    """
    scaling = real("scaling", scaling)
    base, states, params, taus = _task_vectors(pretrained, finetuned_list)
    merged = ties_vector(taus, k, trim=trim, zero_sign=zero_sign, key_counts=_key_counts(states[0], params, count_tied))
    out = _merged_buffers(base, states, params)
    apply_scaled(base, merged, {n: scaling for n in params}, out, states[0])
    return _finish(out, states[0], params)


def merge(
    pretrained: StateLike,
    finetuned_list: Sequence[StateLike],
    method: MergeMethod = "task_arithmetic",
    lines_beta: Optional[float] = None,
    alpha: Optional[float] = None,
    k: float = 0.2,
    scaling: float = 1.0,
    layer_pattern: Optional[Union[str, re.Pattern[str]]] = None,
    depth_map: Optional[Mapping[str, int]] = None,
    head_policy: HeadPolicy = "alpha_plus_beta",
    head_pattern: Optional[str] = None,
    trim: TiesTrim = "official",
    zero_sign: TiesZeroSign = "majority",
    count_tied: TiesCountTied = "per_key",
) -> dict[str, Tensor]:
    """Merge fine-tuned models by task arithmetic or TIES, optionally with LiNeS scaling.

    Without LiNeS (``lines_beta=None``): θ_0 + s·τ_MTL with τ_MTL = Σ_t τ_t (task arithmetic)
    or the TIES vector. With LiNeS ("LiNeS: Post-training Layer Scaling Prevents Forgetting and
    Enhances Model Merging", Wang et al., ICLR 2025): θ_0 + λ⊙τ_MTL with
    λ(ℓ) = α + β·(ℓ−1)/(L−1), β = ``lines_beta`` (tuned on validation in the paper: 0.1..1.0
    for TA, 0.1..1.5 for TIES) and α by default the norm ratio
    (1/T)·‖Σ_t τ_t‖₁/‖τ_MTL‖₁, which is 1/T for task arithmetic and corrects for trimming and
    sign election for TIES.

    Args:
        pretrained: θ_0.
        finetuned_list: the fine-tuned models.
        method: ``"task_arithmetic"`` or ``"ties"``.
        lines_beta: β of LiNeS (>= 0); ``None`` disables LiNeS.
        alpha: α of LiNeS in [0, 1] (default: the norm ratio); only with ``lines_beta``.
        k: TIES' kept fraction.
        scaling: coefficient of the merged vector without LiNeS (with LiNeS the scaled vector
            is added with coefficient 1, as in the paper, and ``scaling`` must stay 1.0).
        layer_pattern: see :func:`lightning_forget.merging.lines_scale`.
        depth_map: see :func:`lightning_forget.merging.lines_scale`.
        head_pattern: see :func:`lightning_forget.merging.lines_scale`.
        head_policy: LiNeS scale of a trainable output head shared by the merged models. The
            default ``"alpha_plus_beta"`` treats it as the deepest layer. There is no single
            fine-tuned head to keep in a merge: ``"exclude"`` and ``"one"`` both add the
            head's merged update with coefficient 1 (for task arithmetic, the sum of T
            updates, usually too large). The paper merges encoders only (frozen heads).
        trim: TIES' trimming rule (see :func:`ties_merge`).
        zero_sign: TIES' rule for a zero elected sign (see :func:`ties_merge`).
        count_tied: TIES' count of tied weights (see :func:`ties_merge`).

    Returns:
        The merged state dict.

    Raises:
        ValueError: bad ``method``, ``alpha`` without ``lines_beta``, ``scaling`` with
            ``lines_beta``, or the errors of the functions above.
    """
    check_choice("method", method, ("task_arithmetic", "ties"))
    scaling = real("scaling", scaling)
    if lines_beta is None:
        if alpha is not None:
            raise ValueError(
                message("alpha", "None without `lines_beta`", alpha,
                        "`alpha` is LiNeS' first-block scale and needs `lines_beta`; to scale a plain merge use `scaling`")
            )
        if method == "ties":
            return ties_merge(pretrained, finetuned_list, k=k, scaling=scaling, trim=trim, zero_sign=zero_sign, count_tied=count_tied)
        return task_arithmetic(pretrained, finetuned_list, scaling=scaling)
    lines_beta = check_beta(lines_beta, "lines_beta")
    if scaling != 1.0:
        raise ValueError(
            f"`scaling`={scaling!r} cannot be combined with `lines_beta`: LiNeS adds the "
            "depth-scaled merged vector with coefficient 1. Drop `scaling` (or tune `alpha`)."
        )
    base, states, params, taus = _task_vectors(pretrained, finetuned_list)
    if method == "ties":
        counts = _key_counts(states[0], params, count_tied)
        merged = ties_vector(taus, k, trim=trim, zero_sign=zero_sign, key_counts=counts)
    else:
        merged = {n: sum(t[n] for t in taus) for n in params}
    alpha = norm_ratio_alpha(taus, merged) if alpha is None else check_alpha(alpha)
    scales, _ = lines_scale_map(params, alpha, lines_beta, layer_pattern, depth_map, head_policy, head_pattern)
    full = {n: (1.0 if s is None else s) for n, s in scales.items()}
    out = _merged_buffers(base, states, params)
    apply_scaled(base, merged, full, out, states[0])
    return _finish(out, states[0], params)
