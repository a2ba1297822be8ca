"""Concept erasure in diffusion models: the maths as plain functions (no Lightning).

- :func:`parameter_set`: the parameters (and the Linear/Conv modules holding them) of a named
  parameter set of a diffusers UNet, as ESD and concept ablation name them;
- :func:`esd_target`: ESD's negative-guidance target;
- :func:`uce_closed_form` / :func:`uce_edit_projections`: UCE's closed-form edit of the
  cross-attention key/value projections.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from lightning_forget.validation import message

__all__ = ["PARAMETER_SETS", "cross_attention_projections", "esd_target", "parameter_set", "uce_closed_form",
           "uce_edit_projections"]

#: Named parameter sets. ``UNet2DConditionModel`` (ESD's names): ``"x"`` every Linear/Conv of the
#: cross-attentions (``attn2``), ``"x-strict"`` (also CA's ``"cross-attn"``) only ``attn2.to_k``/``to_v``,
#: ``"u"`` every Linear/Conv **not** in ``attn2``, ``"attn"`` the q/k/v/out projections of every
#: attention, ``"ffn"`` the transformer feed-forwards, ``"conv"`` the resnets' convolutions,
#: ``"all"`` every Linear/Conv, ``"full"`` every parameter (also norms and the concept table).
#: ``UNet2DModel`` (no cross-attention, the class embedding added to the time embedding):
#: ``"x"`` the conditioning path (``class_embedding`` and each resnet's ``time_emb_proj``),
#: ``"x-strict"`` the class embedding alone, ``"u"`` every other Linear/Conv. ``"re:<regex>"``
#: selects the parameters whose name matches.
PARAMETER_SETS = ("x", "x-strict", "cross-attn", "u", "attn", "ffn", "conv", "all", "full")

_LAYERS = (nn.Linear, nn.Conv2d, nn.Embedding)


def _has_cross_attention(unet: nn.Module) -> bool:
    return any(name.endswith("attn2") for name, _ in unet.named_modules())


def _leaf_layers(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    out = []
    for name, module in unet.named_modules():
        base = getattr(module, "base_layer", None)  # a PEFT-wrapped layer: select its base
        if isinstance(module, _LAYERS) and ".lora_" not in name and not name.endswith("base_layer"):
            out.append((name, module))
        elif base is not None and isinstance(base, _LAYERS):
            out.append((name, base))
    return out


def _in_set(name: str, set_name: str, cross: bool) -> bool:
    if cross:
        in_x = ".attn2." in f".{name}."
        if set_name == "x":
            return in_x
        if set_name in ("x-strict", "cross-attn"):
            return bool(re.search(r"attn2\.(to_k|to_v)$", name))
        if set_name == "u":
            return not in_x
        if set_name == "attn":
            return bool(re.search(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$", name))
        if set_name == "ffn":
            return ".ff." in f".{name}."
    else:
        conditioning = name == "class_embedding" or name.endswith("time_emb_proj")
        if set_name == "x":
            return conditioning
        if set_name in ("x-strict", "cross-attn"):
            return name == "class_embedding"
        if set_name == "u":
            return not conditioning
        if set_name == "attn":
            return bool(re.search(r"attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)$", name))
        if set_name == "ffn":
            return False
    if set_name == "conv":
        return bool(re.search(r"resnets\.\d+\.(conv1|conv2)$", name))
    return set_name == "all"


def parameter_set(unet: nn.Module, set_name: str) -> tuple[list[str], list[str]]:
    """``(parameter names, layer names)`` of the named set in ``unet`` (see :data:`PARAMETER_SETS`).

    Layer names are the Linear/Conv/Embedding modules (LoRA targets); parameter names are their
    weights and biases (``"full"`` and ``"re:"``: every matching parameter, layers holding them).

    Raises:
        ValueError: an unknown set name, or a set that is empty on this UNet.
    """
    cross = _has_cross_attention(unet)
    names: list[str]
    layers: list[str]
    if set_name.startswith("re:"):
        pattern = re.compile(set_name[3:])
        names = [n for n, _ in unet.named_parameters() if pattern.search(n)]
        layers = [n for n, _ in _leaf_layers(unet) if any(p.startswith(n + ".") for p in names)]
    elif set_name == "full":
        names = [n for n, _ in unet.named_parameters()]
        layers = [n for n, _ in _leaf_layers(unet)]
    elif set_name in PARAMETER_SETS:
        layers = [n for n, _ in _leaf_layers(unet) if _in_set(n, set_name, cross)]
        prefixes = tuple(n + "." for n in layers)
        names = [n for n, _ in unet.named_parameters()
                 if n.replace(".base_layer.", ".").startswith(prefixes) and ".lora_" not in n]
    else:
        raise ValueError(message("parameters", f"one of {PARAMETER_SETS} or 're:<regex>'", set_name,
                                 "name a parameter set, e.g. parameters='x' (cross-attention, ESD-x)"))
    if not names:
        kind = "UNet2DConditionModel (cross-attention)" if cross else "UNet2DModel (class embedding)"
        raise ValueError(message("parameters", f"a set with parameters on this {kind}", set_name,
                                 f"pick another set of {PARAMETER_SETS}"))
    return names, layers


def esd_target(eps_cond: Tensor, eps_base: Tensor, negative_guidance: float) -> Tensor:
    """ESD's target ``ε*(x_t, base) − η·(ε*(x_t, c) − ε*(x_t, base))`` (``base`` = ∅, or ``erase_from``)."""
    return eps_base - negative_guidance * (eps_cond - eps_base)


def uce_closed_form(
    weight: Tensor,
    erase: Tensor,
    guide: Tensor,
    preserve: Optional[Tensor] = None,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
    lamb: float = 0.5,
) -> Tensor:
    """UCE's edited projection ``W = (λW₀ + s_e Σ v*_i c_iᵀ + s_p Σ W₀c_j c_jᵀ)(λI + s_e Σ c_i c_iᵀ + s_p Σ c_j c_jᵀ)⁻¹``.

    Gandikota et al., "Unified Concept Editing in Diffusion Models" (WACV 2024),
    ``trainscripts/uce_sd_erase.py``: the minimiser of ``s_e Σ‖W c_i − v*_i‖² + s_p Σ‖W c_j −
    W₀ c_j‖² + λ‖W − W₀‖²_F`` with ``v*_i = W₀ c_guide(i)``.

    Args:
        weight: ``W₀`` ``(out, d)``.
        erase: the erased concepts' embeddings ``c_i`` ``(n_e, d)``.
        guide: their guide concepts' embeddings ``(n_e, d)`` (``v*_i = W₀ guide_i``).
        preserve: the preserved concepts' embeddings ``c_j`` ``(n_p, d)`` or ``None``.
        erase_scale: ``s_e`` (default 1).
        preserve_scale: ``s_p`` (default 1).
        lamb: ``λ`` (default 0.5).
    """
    w0 = weight.detach().double()
    d = w0.shape[1]
    c_e, c_g = erase.detach().double(), guide.detach().double()
    targets = c_g @ w0.T  # v*_i as rows
    left = lamb * w0 + erase_scale * targets.T @ c_e
    right = lamb * torch.eye(d, dtype=w0.dtype, device=w0.device) + erase_scale * c_e.T @ c_e
    if preserve is not None and preserve.numel():
        c_p = preserve.detach().double()
        left = left + preserve_scale * (c_p @ w0.T).T @ c_p
        right = right + preserve_scale * c_p.T @ c_p
    return torch.linalg.solve(right, left, left=False).to(weight.dtype)


def cross_attention_projections(unet: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The cross-attention key/value projections (``attn2.to_k``/``to_v``) of a ``UNet2DConditionModel``."""
    out = []
    for name, module in unet.named_modules():
        if re.search(r"attn2\.(to_k|to_v)$", name):
            layer = getattr(module, "base_layer", module)
            if isinstance(layer, nn.Linear):
                out.append((name, layer))
    return out


@torch.no_grad()
def uce_edit_projections(
    unet: nn.Module,
    erase: Tensor,
    guide: Tensor,
    preserve: Optional[Tensor] = None,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
    lamb: float = 0.5,
    layers: Optional[Sequence[str]] = None,
) -> list[str]:
    """Apply :func:`uce_closed_form` in place to every cross-attention k/v projection (or ``layers``); returns their names.

    Sharded projections (FSDP2 ``DTensor`` weights) are edited shard-wise: each weight is gathered
    for its solve only (one projection at a time, :func:`~lightning_forget.sharding.full_tensor`),
    and every rank writes its own slice of the result into its shard
    (:func:`~lightning_forget.sharding.edit_local`); the concept embeddings must be whole tensors.

    Raises:
        ValueError: the UNet has no cross-attention k/v projections (UCE needs cross-attention).
    """
    projections = cross_attention_projections(unet)
    if layers is not None:
        projections = [(n, m) for n, m in projections if n in set(layers)]
    if not projections:
        raise ValueError(message("unet", "a UNet with cross-attention (attn2.to_k / to_v)", type(unet).__name__,
                                 "use DiffusionModule(unet='conditional'); a UNet2DModel has no cross-attention to edit"))
    from lightning_forget.sharding import edit_local, full_tensor, shard_like

    for _, layer in projections:
        edited = uce_closed_form(full_tensor(layer.weight), erase, guide, preserve, erase_scale, preserve_scale, lamb)
        edit_local(layer.weight, lambda _local, new: new, shard_like(edited, layer.weight))
    return [n for n, _ in projections]
