"""Task vectors, model merging and LiNeS layer scaling as pure functions on state dicts.

Nothing here imports Lightning: the functions take ``nn.Module`` objects or state dicts
(``Mapping[str, Tensor]``, e.g. ``torch.load(path)`` or a Lightning checkpoint's
``"state_dict"``) and return new state dicts; inputs are never modified.

- :func:`task_vector`: τ = θ_ft − θ_0, by parameter name.
- :func:`task_arithmetic`: θ_0 + s·Σ_t τ_t ("Editing Models with Task Arithmetic",
  Ilharco et al., ICLR 2023).
- :func:`ties_merge`: trim → elect sign → disjoint mean ("TIES-Merging: Resolving Interference
  When Merging Models", Yadav et al., NeurIPS 2023).
- :func:`lines_scale`: θ_0 + λ⊙τ with λ growing linearly with depth ("LiNeS: Post-training Layer
  Scaling Prevents Forgetting and Enhances Model Merging", Wang et al., ICLR 2025).
- :func:`merge`: task arithmetic or TIES, optionally followed by LiNeS with the paper's
  norm-ratio α.

Which entries are "parameters". Only floating-point entries take part in a task vector.
Integer and boolean entries (``num_batches_tracked``, ``position_ids``) and the running
statistics of normalisation layers (names ending in ``running_mean``, ``running_var``) are
buffers: :func:`lines_scale` keeps the fine-tuned model's buffers, the merges average float
buffers over the fine-tuned models and copy integer ones from the pre-trained model. When an
``nn.Module`` is passed, exactly its ``named_parameters()`` are parameters. Tied weights (two
names sharing one tensor, e.g. GPT-2's ``lm_head.weight`` and ``transformer.wte.weight``) are
treated as one parameter under the first name and written back identical under both names.

Depth. LiNeS needs the residual block each parameter belongs to. :func:`block_depths` finds it
from the parameter names with regexes anchored on dotted name components (never substring
matching: ``encoder.layers.encoder_layer_3.mlp.0.weight`` is block 3, not block 0), for
Hugging Face transformers (``h.N``, ``layers.N``, ``layer.N``, ``block.N``), timm
(``blocks.N``, ``stages.S.blocks.M``), torchvision ResNet (``layerK.M``) and ViT
(``encoder_layer_N``), open_clip (``resblocks.N``) and plain ``nn.Sequential`` models; anything
else takes a ``layer_pattern`` regex or an explicit ``depth_map``.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Literal, Optional, Union

import torch
from torch import Tensor, nn

__all__ = [
    "HeadPolicy",
    "DEFAULT_HEAD_PATTERN",
    "task_vector",
    "block_depths",
    "head_names",
    "lines_scales",
    "lines_scale_map",
    "lines_scale",
    "norm_ratio_alpha",
    "task_arithmetic",
    "ties_merge",
    "ties_vector",
    "merge",
]

StateLike = Union[Mapping[str, Tensor], nn.Module]
HeadPolicy = Literal["exclude", "alpha", "alpha_plus_beta", "one"]
MergeMethod = Literal["task_arithmetic", "ties"]

_HEAD_POLICIES = ("exclude", "alpha", "alpha_plus_beta", "one")

#: Default regex of a trainable output head: a name component ``lm_head``, ``classifier``,
#: ``head``, ``heads`` or ``score`` anywhere, or ``fc`` as the first component (torchvision
#: ResNet). Only parameters outside the residual blocks are tested against it.
DEFAULT_HEAD_PATTERN = r"(?:^|\.)(?:lm_head|classifier|head|heads|score)(?:\.|$)|^fc(?:\.|$)"

# Normalisation statistics are float buffers that must never be scaled or merged as weights.
_STAT_BUFFER = re.compile(r"(?:^|\.)(?:running_mean|running_var|num_batches_tracked)$")
# In a LoRA pair ΔW = B·A, scaling B by λ and keeping A scales the delta exactly by λ.
_LORA_A = re.compile(r"(?:^|\.)(?:lora_A|lora_embedding_A)(?:\.|$)")

# Block patterns, each anchored on name components. One capture group: the block index within
# its stack; two groups: (stage, block) counted globally in (stage, block) order.
_AUTO_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("torchvision/timm ResNet stages layerK.M", re.compile(r"(?:^|\.)layer(\d+)\.(\d+)(?=\.|$)")),
    ("timm stages.S.blocks.M", re.compile(r"(?:^|\.)stages\.(\d+)\.blocks\.(\d+)(?=\.|$)")),
    ("torchvision ViT encoder_layer_N", re.compile(r"(?:^|\.)encoder_layer_(\d+)(?=\.|$)")),
    ("open_clip resblocks.N", re.compile(r"(?:^|\.)resblocks\.(\d+)(?=\.|$)")),
    ("timm blocks.N", re.compile(r"(?:^|\.)blocks\.(\d+)(?=\.|$)")),
    ("HF GPT-2 h.N", re.compile(r"(?:^|\.)h\.(\d+)(?=\.|$)")),
    ("HF layers.N (Llama, ViT, Mistral, ...)", re.compile(r"(?:^|\.)layers\.(\d+)(?=\.|$)")),
    ("HF layer.N (BERT, RoBERTa, ...)", re.compile(r"(?:^|\.)layer\.(\d+)(?=\.|$)")),
    ("HF block.N (T5)", re.compile(r"(?:^|\.)block\.(\d+)(?=\.|$)")),
)
_SEQUENTIAL = re.compile(r"^((?:[^.]+\.)*?)(\d+)\.")


# ---------------------------------------------------------------------------------- inputs
def _state_and_params(obj: StateLike, what: str) -> tuple[dict[str, Tensor], list[str]]:
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
    raise TypeError(
        f"`{what}` must be an nn.Module or a state dict (Mapping[str, Tensor]), got "
        f"{type(obj).__name__}."
    )


def _drop_tied_aliases(state: Mapping[str, Tensor], names: list[str]) -> list[str]:
    """Keep the first name of every group of names that share one tensor."""
    seen: set[tuple[int, tuple[int, ...], tuple[int, ...], int]] = set()
    kept = []
    for name in names:
        t = state[name]
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.storage_offset())
        if t.numel() > 0 and key in seen:
            continue
        seen.add(key)
        kept.append(name)
    return kept


def _tied_aliases(state: Mapping[str, Tensor], params: Sequence[str]) -> dict[str, str]:
    """Map every state entry that aliases a parameter in ``params`` to that parameter's name."""
    owner = {}
    for name in params:
        t = state[name]
        owner[(t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.storage_offset())] = name
    aliases = {}
    for name, t in state.items():
        if name in params or not isinstance(t, Tensor) or t.numel() == 0:
            continue
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.storage_offset())
        if key in owner:
            aliases[name] = owner[key]
    return aliases


def _check_pair(base: Mapping[str, Tensor], other: Mapping[str, Tensor], params: Sequence[str], what: str) -> None:
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
    base, _ = _state_and_params(pretrained, "pretrained")
    state, params = _state_and_params(finetuned, "finetuned")
    _check_pair(base, state, params, "finetuned")
    return {n: state[n] - base[n].to(device=state[n].device, dtype=state[n].dtype) for n in params}


# ---------------------------------------------------------------------------------- depth
def _compile_layer_pattern(layer_pattern: Union[str, re.Pattern[str]]) -> re.Pattern[str]:
    try:
        pattern = re.compile(layer_pattern) if isinstance(layer_pattern, str) else layer_pattern
    except re.error as err:
        raise ValueError(f"`layer_pattern`={layer_pattern!r} is not a valid regex: {err}.") from err
    if not isinstance(pattern, re.Pattern) or pattern.groups < 1:
        raise ValueError(
            f"`layer_pattern`={layer_pattern!r} must be a regex with one capture group giving the "
            r"block index, e.g. r'(?:^|\.)blocks\.(\d+)\.'."
        )
    return pattern


def _dense_rank(keys: dict[str, tuple]) -> tuple[dict[str, int], int]:
    """Block indices from captured keys: a single index is used as is (L = max + 1, so a
    parameter-free block still counts); ``(stage, block)`` pairs are ranked in order."""
    if all(len(key) == 1 for key in keys.values()):
        return {name: key[0] for name, key in keys.items()}, max(key[0] for key in keys.values()) + 1
    order = {key: i for i, key in enumerate(sorted(set(keys.values())))}
    return {name: order[key] for name, key in keys.items()}, len(order)


def block_depths(
    names: Sequence[str],
    layer_pattern: Optional[Union[str, re.Pattern[str]]] = None,
    depth_map: Optional[Mapping[str, int]] = None,
) -> tuple[dict[str, Optional[int]], int]:
    """The residual block (0-based depth) of every parameter name, and the number of blocks.

    Discovery order:

    1. ``depth_map`` given: its values are the depths (names it lacks are outside the blocks);
       the number of blocks is ``max + 1``.
    2. ``layer_pattern`` given: a regex searched in each name whose first capture group gives
       the block index (L = largest index + 1); with a second group the pair
       ``(stage, block)`` is counted globally in order (ResNet style).
    3. Otherwise each name is matched against the built-in patterns (see the module docstring)
       and the leftmost match wins (the outermost container is the block). Names in several
       stacks (``encoder.block.N`` and ``decoder.block.N``) are indexed per stack; stacks of
       different lengths trigger a warning.
    4. Failing that, a plain ``nn.Sequential`` (possibly at a fixed attribute path, e.g.
       ``net.0.weight``): the children that hold parameters, in order, are the blocks
       (``Linear, ReLU, Linear`` gives 2 blocks).

    Args:
        names: parameter names, e.g. ``[n for n, _ in model.named_parameters()]``.
        layer_pattern: regex with a capture group giving the block index.
        depth_map: explicit ``name -> depth`` map.

    Returns:
        ``(depths, num_blocks)`` where ``depths[name]`` is the block index or ``None`` for
        parameters outside the blocks.

    Raises:
        ValueError: no block was found (the message lists up to 10 names it saw), or a bad
            ``layer_pattern`` / ``depth_map``.
    """
    names = list(names)
    if depth_map is not None:
        for name, depth in depth_map.items():
            if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
                raise ValueError(f"`depth_map` values must be non-negative ints, got {name!r}: {depth!r}.")
        depths = {n: (int(depth_map[n]) if n in depth_map else None) for n in names}
        found = [d for d in depths.values() if d is not None]
        if not found:
            _raise_no_blocks(names, "none of the `depth_map` keys is a parameter name")
        return depths, max(found) + 1

    if layer_pattern is not None:
        pattern = _compile_layer_pattern(layer_pattern)
        keys: dict[str, tuple] = {}
        for name in names:
            m = pattern.search(name)
            if m is not None:
                keys[name] = tuple(int(g) for g in m.groups()[:2] if g is not None)
        if not keys:
            _raise_no_blocks(names, f"`layer_pattern`={pattern.pattern!r} matched no name")
        ranks, num = _dense_rank(keys)
        return {n: ranks.get(n) for n in names}, num

    stacks: dict[tuple[str, str], dict[str, tuple]] = {}
    for name in names:
        best: Optional[tuple[int, str, re.Match[str]]] = None
        for label, pattern in _AUTO_PATTERNS:
            m = pattern.search(name)
            if m is not None and (best is None or m.start() < best[0]):
                best = (m.start(), label, m)
        if best is not None:
            start, label, m = best
            stack = (label, name[:start])
            stacks.setdefault(stack, {})[name] = tuple(int(g) for g in m.groups())
    if stacks:
        depths: dict[str, Optional[int]] = {n: None for n in names}
        lengths = {}
        for stack, keys in stacks.items():
            ranks, num = _dense_rank(keys)
            depths.update(ranks)
            lengths[stack] = num
        if len(set(lengths.values())) > 1:
            warnings.warn(
                "LiNeS found block stacks of different lengths "
                f"{ {(p or '<root>'): n for (_, p), n in lengths.items()} }; each is indexed from 0 and "
                "scaled against the longest. Pass `depth_map` to control the depths.",
                stacklevel=2,
            )
        return depths, max(lengths.values())

    matches = [_SEQUENTIAL.match(n) for n in names]
    if names and all(m is not None for m in matches) and len({m.group(1) for m in matches}) == 1:  # type: ignore[union-attr]
        children = {n: (0, int(m.group(2))) for n, m in zip(names, matches)}  # type: ignore[union-attr]
        ranks, num = _dense_rank(children)
        return dict(ranks), num
    _raise_no_blocks(names, "no known block naming was recognised")
    raise AssertionError  # pragma: no cover


def _raise_no_blocks(names: Sequence[str], why: str) -> None:
    sample = list(names)[:10]
    raise ValueError(
        f"LiNeS could not infer the residual blocks of this model: {why}. Parameter names seen "
        f"({len(names)} in all, first {len(sample)}): {sample}. Fix: pass "
        r"`layer_pattern` (a regex whose capture group is the block index, e.g. r'(?:^|\.)blocks\.(\d+)\.') "
        "or `depth_map` (a dict parameter name -> depth)."
    )


def head_names(names: Sequence[str], depths: Mapping[str, Optional[int]], head_pattern: Optional[str] = None) -> set[str]:
    """Names of the output-head parameters: outside the blocks and matching ``head_pattern``.

    Args:
        names: parameter names.
        depths: the first output of :func:`block_depths`.
        head_pattern: regex searched in each name (default :data:`DEFAULT_HEAD_PATTERN`).
    """
    try:
        pattern = re.compile(DEFAULT_HEAD_PATTERN if head_pattern is None else head_pattern)
    except re.error as err:
        raise ValueError(f"`head_pattern`={head_pattern!r} is not a valid regex: {err}.") from err
    return {n for n in names if depths.get(n) is None and pattern.search(n)}


# ---------------------------------------------------------------------------------- LiNeS
def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    return float(value)


def lines_scales(num_blocks: int, alpha: float, beta: float) -> list[float]:
    """The LiNeS scale of each block: λ(ℓ) = α + β·(ℓ−1)/(L−1) for ℓ = 1..L.

    The first block gets α, the last α + β; with one block (L = 1) it gets α + β.

    Args:
        num_blocks: number of residual blocks L (≥ 1).
        alpha: scale of the first block (and of every parameter outside the blocks).
        beta: increase from the first to the last block.

    Raises:
        ValueError: ``num_blocks`` is not a positive int, or ``alpha``/``beta`` not finite.
    """
    if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < 1:
        raise ValueError(f"`num_blocks` must be a positive int, got {num_blocks!r}.")
    alpha, beta = _check_real("alpha", alpha), _check_real("beta", beta)
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
        ValueError: bad ``head_policy`` or no block found (see :func:`block_depths`).
    """
    if head_policy not in _HEAD_POLICIES:
        raise ValueError(f"`head_policy` must be one of {_HEAD_POLICIES}, got {head_policy!r}.")
    depths, num_blocks = block_depths(names, layer_pattern=layer_pattern, depth_map=depth_map)
    per_block = lines_scales(num_blocks, alpha, beta)
    heads = head_names(names, depths, head_pattern)
    head_scale = {"exclude": None, "alpha": alpha, "alpha_plus_beta": alpha + beta, "one": 1.0}[head_policy]
    scales: dict[str, Optional[float]] = {}
    for name in names:
        if _LORA_A.search(name):
            scales[name] = None
        elif name in heads:
            scales[name] = head_scale
        elif depths[name] is None:
            scales[name] = float(alpha)
        else:
            scales[name] = per_block[depths[name]]  # type: ignore[index]
    return scales, per_block


def _apply_scaled(
    base: Mapping[str, Tensor],
    delta: Mapping[str, Tensor],
    scales: Mapping[str, Optional[float]],
    out: dict[str, Tensor],
    fallback: Mapping[str, Tensor],
) -> None:
    """Write θ_0 + λ·δ into ``out`` (``fallback[name]`` when λ is None)."""
    for name, d in delta.items():
        scale = scales[name]
        if scale is None:
            out[name] = fallback[name].clone()
        else:
            b = base[name].to(device=d.device, dtype=d.dtype)
            out[name] = b + scale * d


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
        alpha: scale of the first block and of non-block parameters (paper sweeps 0..1).
        beta: increase to the last block; ``None`` → ``1 − alpha`` (the last block keeps its
            full update, the paper's single-task setting).
        layer_pattern: regex with a capture group giving the block index (see
            :func:`block_depths`).
        depth_map: explicit ``name -> depth`` map.
        head_policy: what the output head gets: ``"exclude"`` keeps the fine-tuned head
            unchanged (default; the paper scales only the encoder), ``"alpha"``,
            ``"alpha_plus_beta"`` or ``"one"`` (λ = 1).
        head_pattern: regex of head parameter names (default :data:`DEFAULT_HEAD_PATTERN`).

    Returns:
        A full state dict with ``finetuned``'s keys: scaled parameters, and the fine-tuned
        model's buffers unchanged.

    Raises:
        ValueError: bad arguments, or a model whose blocks cannot be found (the message lists
            parameter names and names ``layer_pattern``/``depth_map``).
        KeyError: a parameter missing from ``pretrained``.
    """
    alpha = _check_real("alpha", alpha)
    beta = 1.0 - alpha if beta is None else _check_real("beta", beta)
    state, params = _state_and_params(finetuned, "finetuned")
    tau = task_vector(pretrained, finetuned)
    base, _ = _state_and_params(pretrained, "pretrained")
    scales, _ = lines_scale_map(params, alpha, beta, layer_pattern, depth_map, head_policy, head_pattern)
    out = {name: t.clone() for name, t in state.items()}
    _apply_scaled(base, tau, scales, out, state)
    for alias, owner in _tied_aliases(state, params).items():
        out[alias] = out[owner]
    return out


# ---------------------------------------------------------------------------------- merging
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
    base, _ = _state_and_params(pretrained, "pretrained")
    states, param_lists = zip(*(_state_and_params(f, f"finetuned_list[{i}]") for i, f in enumerate(finetuned_list)))
    params = list(param_lists[0])
    for i, p in enumerate(param_lists[1:], start=1):
        if set(p) != set(params):
            diff = sorted(set(p) ^ set(params))[:5]
            raise ValueError(
                f"`finetuned_list[{i}]` does not have the same parameters as `finetuned_list[0]` "
                f"(e.g. {diff}); all fine-tuned models must share one architecture."
            )
    taus = [task_vector(base, {n: s[n] for n in params}) for s in states]
    return base, list(states), params, taus


def _merged_buffers(base: Mapping[str, Tensor], states: Sequence[Mapping[str, Tensor]], params: Sequence[str]) -> dict[str, Tensor]:
    """Float buffers averaged over the fine-tuned models; other buffers copied from θ_0."""
    out = {}
    aliases = _tied_aliases(states[0], params)
    for name, t in states[0].items():
        if name in params or name in aliases:
            continue
        if t.is_floating_point():
            out[name] = torch.stack([s[name].to(t.device) for s in states]).mean(0)
        else:
            out[name] = (base[name] if name in base else t).clone()
    return out


def _finish(out: dict[str, Tensor], state0: Mapping[str, Tensor], params: Sequence[str]) -> dict[str, Tensor]:
    for alias, owner in _tied_aliases(state0, params).items():
        out[alias] = out[owner]
    return {name: out[name] for name in state0}


def ties_vector(taus: Sequence[Mapping[str, Tensor]], k: float = 0.2) -> dict[str, Tensor]:
    """The TIES-merged task vector (trim → elect sign → disjoint mean), without scaling.

    1. **Trim**: in each task vector keep the ⌈k·n⌉ entries of largest magnitude over the whole
       flattened vector (ties at the threshold are kept), zero the rest.
    2. **Elect**: the sign of each entry is the sign of the sum of the trimmed vectors.
    3. **Disjoint mean**: each entry is the mean of the trimmed values that are non-zero and
       agree with the elected sign; entries where none agrees stay zero.

    Args:
        taus: task vectors with identical names and shapes.
        k: fraction of entries kept per task vector, in (0, 1].

    Raises:
        ValueError: ``k`` outside (0, 1] or no task vector.
    """
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0.0 < k <= 1.0:
        raise ValueError(f"`k` is the fraction of entries kept per task vector, in (0, 1]; got {k!r}.")
    if not taus:
        raise ValueError("`taus` is empty; pass at least one task vector.")
    names = list(taus[0])
    trimmed = []
    for tau in taus:
        flat = torch.cat([tau[n].reshape(-1).float().abs() for n in names]) if names else torch.zeros(0)
        n_keep = min(flat.numel(), max(1, math.ceil(k * flat.numel())))
        threshold = torch.topk(flat, n_keep, sorted=False).values.min() if flat.numel() else flat.new_tensor(0.0)
        trimmed.append({n: torch.where(tau[n].abs() >= threshold.to(tau[n].dtype), tau[n], torch.zeros_like(tau[n])) for n in names})
    merged = {}
    for n in names:
        stacked = torch.stack([t[n] for t in trimmed])
        elected = torch.sign(stacked.sum(0))
        agree = (torch.sign(stacked) == elected) & (stacked != 0)
        count = agree.sum(0)
        total = (stacked * agree).sum(0)
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
        TypeError, ValueError, KeyError: bad inputs (see :func:`task_vector`).
    """
    scaling = _check_real("scaling", scaling)
    base, states, params, taus = _task_vectors(pretrained, finetuned_list)
    total = {n: sum(t[n] for t in taus) for n in params}
    out = _merged_buffers(base, states, params)
    _apply_scaled(base, total, {n: scaling for n in params}, out, states[0])
    return _finish(out, states[0], params)


def ties_merge(
    pretrained: StateLike, finetuned_list: Sequence[StateLike], k: float = 0.2, scaling: float = 1.0
) -> dict[str, Tensor]:
    """TIES-merging: θ_0 + s·TIES(τ_1..τ_T).

    From "TIES-Merging: Resolving Interference When Merging Models" (Yadav et al., NeurIPS
    2023). See :func:`ties_vector` for the trim / elect-sign / disjoint-mean steps.

    Args:
        pretrained: θ_0.
        finetuned_list: the fine-tuned models.
        k: fraction of each task vector's entries kept by magnitude (paper default 0.2).
        scaling: coefficient s of the merged vector (1.0 for the disjoint mean).

    Returns:
        The merged state dict.

    Raises:
        TypeError, ValueError, KeyError: bad inputs.
    """
    scaling = _check_real("scaling", scaling)
    base, states, params, taus = _task_vectors(pretrained, finetuned_list)
    merged = ties_vector(taus, k)
    out = _merged_buffers(base, states, params)
    _apply_scaled(base, merged, {n: scaling for n in params}, out, states[0])
    return _finish(out, states[0], params)


def _l1(vec: Mapping[str, Tensor]) -> float:
    return float(sum(t.detach().double().abs().sum() for t in vec.values()))


def norm_ratio_alpha(taus: Sequence[Mapping[str, Tensor]], merged: Mapping[str, Tensor]) -> float:
    """LiNeS' α for merging: (1/T)·‖Σ_t τ_t‖₁ / ‖τ_MTL‖₁ (1/T for plain task arithmetic).

    Raises:
        ValueError: the merged vector is all zeros.
    """
    total = {n: sum(t[n] for t in taus) for n in merged}
    denom = _l1(merged)
    if denom == 0.0:
        raise ValueError("The merged task vector is all zeros, so LiNeS' norm-ratio α is undefined; pass `alpha`.")
    return _l1(total) / (len(taus) * denom)


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
        lines_beta: β of LiNeS; ``None`` disables LiNeS.
        alpha: α of LiNeS (default: the norm ratio); only with ``lines_beta``.
        k: TIES' kept fraction.
        scaling: coefficient of the merged vector without LiNeS (with LiNeS the scaled vector
            is added with coefficient 1, as in the paper, and ``scaling`` must stay 1.0).
        layer_pattern, depth_map, head_pattern: see :func:`lines_scale`.
        head_policy: LiNeS scale of a trainable output head shared by the merged models. The
            default ``"alpha_plus_beta"`` treats it as the deepest layer. There is no single
            fine-tuned head to keep in a merge: ``"exclude"`` and ``"one"`` both add the
            head's merged update with coefficient 1 (for task arithmetic, the sum of T
            updates, usually too large). The paper merges encoders only (frozen heads).

    Returns:
        The merged state dict.

    Raises:
        ValueError: bad ``method``, ``alpha`` without ``lines_beta``, ``scaling`` with
            ``lines_beta``, or the errors of the functions above.
    """
    if method not in ("task_arithmetic", "ties"):
        raise ValueError(f"`method` must be 'task_arithmetic' or 'ties', got {method!r}.")
    scaling = _check_real("scaling", scaling)
    if lines_beta is None:
        if alpha is not None:
            raise ValueError(
                f"`alpha`={alpha!r} is LiNeS' first-block scale and needs `lines_beta`; to scale "
                "a plain merge use `scaling`."
            )
        if method == "ties":
            return ties_merge(pretrained, finetuned_list, k=k, scaling=scaling)
        return task_arithmetic(pretrained, finetuned_list, scaling=scaling)
    lines_beta = _check_real("lines_beta", lines_beta)
    if scaling != 1.0:
        raise ValueError(
            f"`scaling`={scaling!r} cannot be combined with `lines_beta`: LiNeS adds the "
            "depth-scaled merged vector with coefficient 1. Drop `scaling` (or tune `alpha`)."
        )
    base, states, params, taus = _task_vectors(pretrained, finetuned_list)
    merged = ties_vector(taus, k) if method == "ties" else {n: sum(t[n] for t in taus) for n in params}
    alpha = norm_ratio_alpha(taus, merged) if alpha is None else _check_real("alpha", alpha)
    scales, _ = lines_scale_map(params, alpha, lines_beta, layer_pattern, depth_map, head_policy, head_pattern)
    scales = {n: (1.0 if s is None else s) for n, s in scales.items()}
    out = _merged_buffers(base, states, params)
    _apply_scaled(base, merged, scales, out, states[0])
    return _finish(out, states[0], params)
