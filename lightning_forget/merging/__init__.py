"""Task vectors, model merging and LiNeS layer scaling as pure functions on state dicts.

Nothing here imports Lightning: the functions take ``nn.Module`` objects or state dicts
(``Mapping[str, Tensor]``, e.g. ``torch.load(path)`` or a Lightning checkpoint's
``"state_dict"``) and return new state dicts; inputs are never modified.

- :func:`task_vector`: τ = θ_ft − θ_0 (:mod:`~lightning_forget.merging.vectors`).
- :func:`task_arithmetic`, :func:`ties_merge`, :func:`merge`: merges of several fine-tuned
  models (:mod:`~lightning_forget.merging.combine`).
- :func:`lines_scale`: LiNeS, θ_0 + λ⊙τ with λ growing linearly with depth
  (:mod:`~lightning_forget.merging.scaling`).
- :func:`block_depths`, :func:`head_names`: which residual block each parameter is in, and the
  output head (:mod:`~lightning_forget.merging.depth`).
"""

from lightning_forget.merging.combine import (
    MergeMethod,
    TiesCountTied,
    TiesTrim,
    TiesZeroSign,
    merge,
    task_arithmetic,
    ties_merge,
    ties_vector,
)
from lightning_forget.merging.depth import (
    DEFAULT_HEAD_PATTERN,
    HEAD_POLICIES,
    HeadPolicy,
    block_depths,
    check_head_pattern,
    check_head_policy,
    check_layer_pattern,
    head_names,
)
from lightning_forget.merging.scaling import (
    check_alpha,
    check_beta,
    lines_scale,
    lines_scale_map,
    lines_scales,
    norm_ratio_alpha,
)
from lightning_forget.merging.vectors import StateLike, task_vector

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
    # added with the package split
    "HEAD_POLICIES",
    "MergeMethod",
    "StateLike",
    "TiesCountTied",
    "TiesTrim",
    "TiesZeroSign",
    "check_alpha",
    "check_beta",
    "check_head_pattern",
    "check_head_policy",
    "check_layer_pattern",
]
