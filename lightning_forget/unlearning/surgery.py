"""Gradient surgery between an unlearning and a preservation gradient (no Lightning).

DoCo's *concept-preserving gradient* (Wu et al., "Unlearning Concepts in Diffusion Model via
Concept Domain Correction and Concept Preserving Gradient", AAAI 2025): for each parameter tensor,
when the unlearning gradient ``g_u`` points against the preservation gradient ``g_p``
(``cos(g_u, g_p) < 0``), the part of ``g_u`` along ``g_p`` is taken out, so a step on ``g_u`` no
longer undoes what ``g_p`` preserves; otherwise ``g_u`` is kept. Two forms of that removal:

- ``"project"``: ``g_u − λ·(g_u·g_p / ‖g_p‖²)·g_p``, the exact projection onto the plane
  orthogonal to ``g_p`` (PCGrad's rule, per tensor) at ``λ = 1``; it does not depend on the
  gradients' scale.
- ``"doco"``: ``g_u − λ·cos(g_u, g_p)·ĝ_p`` with ``ĝ = g / (‖g‖ + 1e-8)``, the rule of the DoCo
  training code (``adjust_gradient``, identical in the reimplementations ``fmp453/erase-eval``
  ``train_methods/utils_doco.py`` and ``justinhylee135/CUIG``; the official repository could not be
  read). It subtracts a vector of length ``|cos|`` rather than ``‖g_u‖·|cos|``, so it equals
  ``"project"`` only when ``‖g_u‖ = 1``: for a smaller ``g_u`` it overshoots the projection (the
  result then has a positive component along ``g_p``), for a larger one it removes only part of
  the conflict.

Both act per parameter tensor (DoCo's granularity), never on the concatenation of all of them. The
whole-tensor quantities (the dot product and the two squared norms) are computed in one place,
:func:`whole_tensor_products`; for sharded gradients (FSDP2 ``DTensor`` s) they are reduced over all
shards there (:func:`lightning_forget.sharding.global_dots`), and the rest of the surgery is
elementwise on each rank's shards.

:class:`GradientSurgery` is the piece callbacks use: the unlearning gradient of each micro-batch is
computed with :func:`torch.autograd.grad` (so the DDP-reduced ``.grad`` holds only the
preservation gradient), accumulated, and at the optimizer step averaged across ranks and combined
with the reduced ``.grad``: the surgery sees the gradients of the whole global batch, as one process
with that batch would.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterable, Literal, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from lightning_forget.gradients import average_gradients, compute_gradients
from lightning_forget.sharding import edit_local, global_dots, is_sharded, local_view, reshard, sum_of_squares
from lightning_forget.validation import check_choice, check_float

__all__ = ["GradientSurgery", "SurgeryResult", "SURGERY_MODES", "clip_global_norm", "concept_preserving_gradient",
           "whole_tensor_products"]

SurgeryMode = Literal["project", "doco"]
SURGERY_MODES: tuple[str, ...] = ("project", "doco")
#: The DoCo code's guard against a zero norm when it normalises each gradient.
DOCO_EPS = 1e-8


class SurgeryResult(NamedTuple):
    """The adjusted unlearning gradients and, per tensor, ``cos(g_u, g_p)`` (0 where a norm is 0)."""

    gradients: dict[str, Tensor]
    cosines: dict[str, Tensor]

    @property
    def conflict_fraction(self) -> float:
        """Share of tensors whose gradients conflicted (``cos < 0``), i.e. were adjusted."""
        if not self.cosines:
            return 0.0
        return float((torch.stack([c.float() for c in self.cosines.values()]) < 0).float().mean())


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def whole_tensor_products(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """Per name present in both: ``(a·b, ‖a‖², ‖b‖²)`` over the whole tensor, in at least float32.

    The one place whole-tensor reductions of the surgery happen. Sharded tensors (DTensors) are
    reduced over all shards, with one collective per quantity for all names (every rank calls it
    with the same names).
    """
    shared = [name for name in a if name in b]
    if any(is_sharded(a[n]) or is_sharded(b[n]) for n in shared):
        for name in shared:
            if a[name].numel() != b[name].numel():
                raise ValueError(f"gradient {name!r} has {a[name].numel()} entries in `unlearn` but {b[name].numel()} in "
                                 "`preserve`. Fix: pass gradients of the same parameters.")
        first, second = {n: a[n].detach() for n in shared}, {n: b[n].detach() for n in shared}
        dots, uu, pp = global_dots(first, second), sum_of_squares(first), sum_of_squares(second)
        return {n: tuple(x[n].to(_compute_dtype(a[n])) for x in (dots, uu, pp)) for n in shared}  # type: ignore[misc]
    out: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
    for name, u in a.items():
        if name not in b:
            continue
        dtype = _compute_dtype(u)
        uf, pf = u.detach().to(dtype).reshape(-1), b[name].detach().to(dtype).reshape(-1)
        if uf.numel() != pf.numel():
            raise ValueError(f"gradient {name!r} has {uf.numel()} entries in `unlearn` but {pf.numel()} in `preserve`. "
                             "Fix: pass gradients of the same parameters.")
        out[name] = (torch.dot(uf, pf), torch.dot(uf, uf), torch.dot(pf, pf))
    return out


def clip_global_norm(grads: Mapping[str, Tensor], max_norm: float) -> dict[str, Tensor]:
    """``grads`` scaled by ``min(1, max_norm / (‖grads‖ + 1e-6))``, ``‖·‖`` over all tensors together
    (``torch.nn.utils.clip_grad_norm_``'s rule, without touching ``.grad``)."""
    products = whole_tensor_products(grads, grads)
    total = torch.stack([uu for _, uu, _ in products.values()]).sum().sqrt() if products else torch.zeros(())
    coeff = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return {name: (g.to(coeff.dtype) * coeff).to(g.dtype) for name, g in grads.items()}


def concept_preserving_gradient(
    unlearn: Mapping[str, Tensor],
    preserve: Mapping[str, Tensor],
    *,
    mode: SurgeryMode = "project",
    strength: float = 1.0,
) -> SurgeryResult:
    """DoCo's concept-preserving gradient: per tensor, remove the part of ``unlearn`` that conflicts with ``preserve``.

    Args:
        unlearn: name → unlearning gradient ``g_u``.
        preserve: name → preservation gradient ``g_p`` (same shapes). A name missing here, or a
            zero ``g_p``, leaves ``g_u`` as it is.
        mode: ``"project"`` (``g_u − λ(g_u·g_p/‖g_p‖²)g_p``) or ``"doco"`` (the DoCo code's
            ``g_u − λ·cos·g_p/(‖g_p‖+1e-8)``); see the module docstring.
        strength: ``λ`` (DoCo's ``lambda_``, default 1).

    Returns:
        :class:`SurgeryResult`: the adjusted ``g_u`` for every name of ``unlearn`` (new tensors, the
        inputs are untouched; this rank's local shards for sharded gradients) and the per-tensor
        cosines (over the whole tensors). The preservation gradient is *not* added:
        callers decide whether the step also follows ``g_p``.
    """
    check_choice("mode", mode, SURGERY_MODES)
    strength = check_float("strength", strength, min=0)
    products = whole_tensor_products(unlearn, preserve)
    gradients: dict[str, Tensor] = {}
    cosines: dict[str, Tensor] = {}
    for name, g_u in unlearn.items():
        if name not in products:
            gradients[name] = local_view(g_u).detach().clone()
            continue
        dot, uu, pp = products[name]
        norm_u, norm_p = uu.sqrt(), pp.sqrt()
        if mode == "project":
            cos = torch.where((norm_u > 0) & (norm_p > 0), dot / (norm_u * norm_p).clamp_min(torch.finfo(dot.dtype).tiny),
                              torch.zeros_like(dot))
            coeff = torch.where((dot < 0) & (pp > 0), dot / pp.clamp_min(torch.finfo(pp.dtype).tiny), torch.zeros_like(dot))
        else:
            cos = dot / ((norm_u + DOCO_EPS) * (norm_p + DOCO_EPS))
            coeff = torch.where(cos < 0, cos / (norm_p + DOCO_EPS), torch.zeros_like(cos))
        # elementwise: on each rank's shard of sharded gradients
        g_p = local_view(preserve[name]).detach().to(coeff.dtype)
        adjusted = local_view(g_u).detach().to(coeff.dtype) - (strength * coeff) * g_p
        gradients[name] = adjusted.to(g_u.dtype)
        cosines[name] = cos
    return SurgeryResult(gradients, cosines)


class GradientSurgery:
    """Collects a step's unlearning gradient apart from the DDP-reduced one, and combines the two at the optimizer step.

    Use inside a training step whose returned loss holds only the preservation term(s):

    1. :meth:`add` the unlearning loss of each micro-batch (its gradient, divided by the
       accumulation factor as Lightning divides the step's loss, is summed here; ``.grad`` is not
       touched);
    2. in ``on_before_optimizer_step`` (after DDP's reduction and the precision plugin's unscaling),
       :meth:`apply`: every rank averages the collected gradient across ranks, reads the reduced
       ``.grad`` as the preservation gradient, and writes ``g_u' (+ g_p)`` into ``.grad``.

    Args:
        mode: ``"project"`` or ``"doco"`` (:func:`concept_preserving_gradient`).
        strength: ``λ``.
        add_preservation: whether the step follows ``g_p`` too (``g_u' + g_p``, a GradDiff-style
            step with the conflict removed) or only ``g_u'`` (the DoCo code: the preservation loss
            only steers the unlearning gradient).
        clip_norm: ``None`` or the norm each of ``g_u`` and ``g_p`` is clipped to (over all the
            trained tensors together) before the surgery, as the DoCo code clips both to
            ``max_grad_norm`` = 1.
    """

    def __init__(self, mode: SurgeryMode = "project", strength: float = 1.0, add_preservation: bool = True,
                 clip_norm: Optional[float] = None) -> None:
        self.mode = check_choice("mode", mode, SURGERY_MODES)
        self.strength = check_float("strength", strength, min=0)
        self.add_preservation = bool(add_preservation)
        self.clip_norm = check_float("clip_norm", clip_norm, min=0, min_inclusive=False, allow_none=True)
        self.pending: Optional[dict[str, Tensor]] = None
        self.last: Optional[SurgeryResult] = None

    def add(self, loss: Tensor, params: Union[nn.Module, Mapping[str, Tensor]], *, scale: float = 1.0) -> None:
        """Accumulate ``scale·∇loss`` over ``params`` (a module's trainable parameters, or name →
        trainable tensor); the graph is kept.

        Sharded parameters (FSDP2), which ``torch.autograd.grad`` does not reach: a backward of
        ``scale·loss`` alone into ``.grad`` (set aside before and put back after), which FSDP2
        reduce-scatters: the collected gradient is then already the mean over ranks, and every rank
        must call this in the same steps (a collective).
        """
        if isinstance(params, nn.Module):
            reshard(params)  # FSDP2: the sharded parameters, not a root unit's weights gathered since the forward
            params = {n: p for n, p in params.named_parameters() if p.requires_grad}
        grads = compute_gradients(loss * scale, params, retain_graph=True)
        if self.pending is None:
            self.pending = grads
        else:
            for name, g in grads.items():
                self.pending[name] = self.pending[name] + g

    def reset(self) -> None:
        self.pending = None

    def apply(self, strategy: Any, named_parameters: Iterable[tuple[str, nn.Parameter]]) -> Optional[SurgeryResult]:
        """Combine the collected unlearning gradient with ``.grad``; a collective when ``strategy`` has several ranks.

        Every rank must call it at every optimizer step. Returns ``None`` (``.grad`` untouched) when
        no rank collected a gradient since the last call.
        """
        pending, self.pending = self.pending, None
        params = {name: p for name, p in named_parameters if p.requires_grad}
        if int(getattr(strategy, "world_size", 1) or 1) > 1:
            if not strategy.reduce_boolean_decision(pending is not None, all=False):
                return None
        elif pending is None:
            return None
        if pending is None:  # this rank had no unlearning term; it still takes part in the average
            pending = {name: torch.zeros_like(p) for name, p in params.items()}
        missing = sorted(set(params) - set(pending))
        if missing:
            raise RuntimeError(f"GradientSurgery: no unlearning gradient was collected for {missing[:5]}; the "
                               "trainable parameters changed within an optimizer step.")
        sharded = any(is_sharded(p) for p in params.values())
        # sharded: collected by FSDP2's reduce-scatter, already the mean over ranks
        unlearn = {name: pending[name] for name in params} if sharded else average_gradients(
            strategy, {name: pending[name] for name in params})
        if sharded:
            for p in params.values():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        preserve = {name: p.grad if p.grad is not None else torch.zeros_like(p) for name, p in params.items()}
        if self.clip_norm is not None:
            unlearn, preserve = clip_global_norm(unlearn, self.clip_norm), clip_global_norm(preserve, self.clip_norm)
        result = concept_preserving_gradient(unlearn, preserve, mode=self.mode, strength=self.strength)  # type: ignore[arg-type]
        with torch.no_grad():
            for name, p in params.items():
                step = result.gradients[name].to(p.dtype)
                if sharded:  # shard-wise, into the DTensor gradient
                    edit_local(p.grad, lambda g: (step + g) if self.add_preservation else step)
                    continue
                p.grad = (step + preserve[name].to(p.dtype)) if self.add_preservation else step.clone()
        self.last = result
        return result
