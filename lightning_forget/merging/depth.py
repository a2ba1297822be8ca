"""Depth discovery for LiNeS: which residual block each parameter belongs to, and the output head.

LiNeS scales a parameter's update by the depth of the block it sits in, so it needs a map
``parameter name -> block index``. :func:`block_depths` builds it from the names alone, with
regexes anchored on dotted name components (never substring matching:
``encoder.layers.encoder_layer_3.mlp.0.weight`` is block 3, not block 0), for the architecture
families below; anything else takes a ``layer_pattern`` regex or an explicit ``depth_map``.

============================  ==========================================
family                        block names
============================  ==========================================
Hugging Face transformers     ``h.N`` (GPT-2), ``layers.N`` (Llama, ViT, Mistral),
                              ``layer.N`` (BERT, RoBERTa), ``block.N`` (T5)
timm                          ``blocks.N``, ``stages.S.blocks.M``
torchvision                   ``layerK.M`` (ResNet), ``encoder_layer_N`` (ViT)
open_clip                     ``resblocks.N``
``nn.Sequential``             the children that hold parameters, in order
============================  ==========================================

For a known architecture the captured index is the depth (L = largest index + 1: in these
families the indices are consecutive). With a ``layer_pattern`` (and for ``nn.Sequential``) the
blocks are the *distinct* indices found, ranked in order: a pattern that matches ``encoder.1``
and ``encoder.3`` (an ``nn.Sequential`` with activations between) gives two blocks, depths 0
and 1, not four.

The output head is found among the parameters outside the blocks by :data:`DEFAULT_HEAD_PATTERN`
(or ``head_pattern``); :data:`HEAD_POLICIES` names what LiNeS does with it.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Literal, Optional, Union

from lightning_forget.validation import check_choice, message

__all__ = [
    "DEFAULT_HEAD_PATTERN",
    "HEAD_POLICIES",
    "HeadPolicy",
    "block_depths",
    "check_head_pattern",
    "check_head_policy",
    "check_layer_pattern",
    "head_names",
]

HeadPolicy = Literal["exclude", "alpha", "alpha_plus_beta", "one"]

#: The values of ``head_policy``: ``"exclude"`` leaves the head as it is, ``"alpha"`` scales it
#: like the first block, ``"alpha_plus_beta"`` like the last block, ``"one"`` by 1.
HEAD_POLICIES: tuple[str, ...] = ("exclude", "alpha", "alpha_plus_beta", "one")

#: Default regex of a trainable output head: a name component ``lm_head``, ``classifier``,
#: ``head``, ``heads`` or ``score`` anywhere, or ``fc`` as the first component (torchvision
#: ResNet). Only parameters outside the residual blocks are tested against it.
DEFAULT_HEAD_PATTERN = r"(?:^|\.)(?:lm_head|classifier|head|heads|score)(?:\.|$)|^fc(?:\.|$)"

# Block patterns, each anchored on name components. One capture group: the block index within
# its stack; two groups: (stage, block), ranked globally in (stage, block) order.
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
_PATTERN_FIX = r"pass a regex with a capture group giving the block index, e.g. r'(?:^|\.)blocks\.(\d+)\.'"


def check_layer_pattern(layer_pattern: Union[str, re.Pattern[str]]) -> re.Pattern[str]:
    """``layer_pattern`` compiled, after checking it has a capture group for the block index.

    Raises:
        TypeError: neither a ``str`` nor a compiled pattern.
        ValueError: not a valid regex, or no capture group.
    """
    if not isinstance(layer_pattern, (str, re.Pattern)):
        raise TypeError(message("layer_pattern", "a regex str", layer_pattern, _PATTERN_FIX))
    try:
        pattern = re.compile(layer_pattern) if isinstance(layer_pattern, str) else layer_pattern
    except re.error as err:
        raise ValueError(message("layer_pattern", f"a valid regex ({err})", layer_pattern, _PATTERN_FIX)) from err
    if pattern.groups < 1:
        raise ValueError(message("layer_pattern", "a regex with one capture group", layer_pattern, _PATTERN_FIX))
    return pattern


def check_head_pattern(head_pattern: Optional[str]) -> re.Pattern[str]:
    """``head_pattern`` compiled (:data:`DEFAULT_HEAD_PATTERN` when ``None``).

    Raises:
        TypeError: not a ``str``.
        ValueError: not a valid regex.
    """
    if head_pattern is None:
        return re.compile(DEFAULT_HEAD_PATTERN)
    if not isinstance(head_pattern, str):
        raise TypeError(message("head_pattern", "a regex str or None", head_pattern))
    try:
        return re.compile(head_pattern)
    except re.error as err:
        raise ValueError(message("head_pattern", f"a valid regex ({err})", head_pattern)) from err


def check_head_policy(head_policy: str) -> HeadPolicy:
    """``head_policy`` if it is one of :data:`HEAD_POLICIES` (``ValueError`` otherwise)."""
    return check_choice("head_policy", head_policy, HEAD_POLICIES)  # type: ignore[return-value]


def _dense_rank(keys: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, int], int]:
    """Depths from captured block keys: the distinct keys ranked in order (0, 1, ...), and their number."""
    order = {key: i for i, key in enumerate(sorted(set(keys.values())))}
    return {name: order[key] for name, key in keys.items()}, len(order)


def _index_or_rank(keys: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, int], int]:
    """Depths for a known architecture: a single index is the depth itself (L = max + 1, so a
    block without parameters of its own, or one left out of ``names``, still counts);
    ``(stage, block)`` pairs are ranked in order."""
    if all(len(key) == 1 for key in keys.values()):
        return {name: key[0] for name, key in keys.items()}, max(key[0] for key in keys.values()) + 1
    return _dense_rank(keys)


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
       the block index; with a second group the pair ``(stage, block)`` is the key. The
       distinct keys found are the blocks, ranked in order (indices 1 and 3 are blocks 0, 1).
    3. Otherwise each name is matched against the built-in patterns (see the module docstring)
       and the leftmost match wins (the outermost container is the block); the index is the
       depth and L is the largest index + 1. Names in several stacks (``encoder.block.N`` and
       ``decoder.block.N``) are indexed per stack; stacks of
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
                raise ValueError(message("depth_map", "a dict of non-negative int depths", {name: depth}))
        depths = {n: (int(depth_map[n]) if n in depth_map else None) for n in names}
        found = [d for d in depths.values() if d is not None]
        if not found:
            _raise_no_blocks(names, "none of the `depth_map` keys is a parameter name")
        return depths, max(found) + 1

    if layer_pattern is not None:
        pattern = check_layer_pattern(layer_pattern)
        keys: dict[str, tuple[int, ...]] = {}
        for name in names:
            m = pattern.search(name)
            if m is not None:
                keys[name] = tuple(int(g) for g in m.groups()[:2] if g is not None)
        if not keys:
            _raise_no_blocks(names, f"`layer_pattern`={pattern.pattern!r} matched no name")
        ranks, num = _dense_rank(keys)
        return {n: ranks.get(n) for n in names}, num

    stacks: dict[tuple[str, str], dict[str, tuple[int, ...]]] = {}
    for name in names:
        best: Optional[tuple[int, str, re.Match[str]]] = None
        for label, auto in _AUTO_PATTERNS:
            m = auto.search(name)
            if m is not None and (best is None or m.start() < best[0]):
                best = (m.start(), label, m)
        if best is not None:
            start, label, m = best
            stacks.setdefault((label, name[:start]), {})[name] = tuple(int(g) for g in m.groups())
    if stacks:
        depths = {n: None for n in names}
        lengths = {}
        for stack, stack_keys in stacks.items():
            ranks, num = _index_or_rank(stack_keys)
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
        children = {n: (int(m.group(2)),) for n, m in zip(names, matches)}  # type: ignore[union-attr]
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

    Raises:
        TypeError, ValueError: a bad ``head_pattern`` (see :func:`check_head_pattern`).
    """
    pattern = check_head_pattern(head_pattern)
    return {n for n in names if depths.get(n) is None and pattern.search(n)}
