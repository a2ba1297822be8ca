"""Gradients outside the DDP-wrapped training step, and parameters broadcast from rank 0.

Some methods need a gradient that is not the training step's: refresh learning's unlearn step
(a gradient-ascent step on the current batch before the usual update, Wang et al., "A Unified
and General Framework for Continual Learning", ICLR 2024) and k-FPF's inner fine-tuning loop on
the buffer (Zhao et al., "Does Continual Learning Equally Forget All Parameters?", ICML 2023).
Two rules make such a gradient safe:

1. It is computed with :func:`torch.autograd.grad`, which returns the gradients instead of
   adding them into ``param.grad``. Under ``accumulate_grad_batches > 1`` the ``.grad`` of every
   parameter holds the partial sum of the micro-batches seen so far; a ``backward()`` from a
   hook would add a foreign gradient into it (and DDP's reducer would not be involved).
2. Under DDP every rank sees different data, so the gradient differs per rank. It is averaged
   across ranks through ``trainer.strategy.reduce(..., reduce_op="mean")``: one flattened
   collective per dtype, not one per tensor. Every rank must call it (it is a collective).

Sharded parameters (FSDP2 through ``ModelParallelStrategy``) are out of autograd's reach (it
differentiates the gathered copies each forward makes): :func:`compute_gradients` then takes the
gradient with ``backward()``, with every ``.grad`` stashed and put back, and FSDP2's
reduce-scatter makes it the data-parallel mean already (rule 2 then has nothing left to do).

Weight edits decided on one rank (an inner loop run only on rank 0, a choice made from rank 0's
data) are made identical everywhere with :func:`broadcast_parameters`, one
``trainer.strategy.broadcast`` of the flattened tensors.

Only the ``strategy`` object is used (anything with Lightning's ``reduce`` and ``broadcast``
signatures works), so the maths here is testable without a Trainer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Union

import torch
from torch import Tensor, nn

from lightning_forget.sharding import _is_dtensor, is_sharded

__all__ = [
    "average_gradients",
    "broadcast_parameters",
    "compute_gradients",
    "flatten_tensors",
    "input_vjp",
    "synced_gradients",
    "unflatten_tensors",
]

NamedParameters = Union[nn.Module, Mapping[str, Tensor], Iterable[tuple[str, Tensor]]]


def _named(params: NamedParameters, *, trainable_only: bool) -> dict[str, Tensor]:
    if isinstance(params, nn.Module):
        named = dict(params.named_parameters())
    elif isinstance(params, Mapping):
        named = dict(params)
    else:
        named = dict(params)
    if trainable_only:
        named = {name: p for name, p in named.items() if p.requires_grad}
    for name, value in named.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"parameter {name!r} must be a Tensor, got {type(value).__name__}.")
    return named


def compute_gradients(
    loss: Tensor, params: NamedParameters, *, retain_graph: bool = False, create_graph: bool = False
) -> dict[str, Tensor]:
    """Gradients of a scalar ``loss`` with respect to named parameters, without touching ``.grad``.

    Args:
        loss: a scalar tensor.
        params: a module (its trainable parameters), a mapping name → tensor, or ``(name, tensor)``
            pairs. Tensors that do not require gradients are skipped when a module is given and
            refused otherwise.
        retain_graph: keep the graph for a second call.
        create_graph: build a graph of the gradient (for higher-order terms).

    Returns:
        name → gradient (same shape, dtype and device as the parameter); a parameter the loss
        does not depend on gets zeros.

    Raises:
        ValueError: ``loss`` is not a scalar, a given tensor does not require gradients, or a
            sharded module whose parameters are FSDP2's gathered copies (collect them before the forward).
        NotImplementedError: ``create_graph`` with sharded (FSDP2) parameters.

    Sharded parameters (FSDP2 DTensors): autograd differentiates the gathered copies FSDP2 makes
    for each forward, never the sharded parameters, so :func:`torch.autograd.grad` cannot reach
    them. The gradient is then taken with ``loss.backward()``: the existing ``.grad`` of every
    given parameter is stashed, backward runs (FSDP2 reduce-scatters the gathered gradients into
    the sharded ``.grad``, averaged over the data-parallel group), the new ``.grad`` is read and
    the stash is put back, so ``.grad`` is as before. The result for a sharded parameter is a
    DTensor of its layout holding **the data-parallel mean** of every rank's local gradient
    (what :func:`average_gradients` makes of the local gradients under DDP; it passes DTensors
    through), a collective every rank must join with the same forward/backward. Collect the
    parameters before the forward (during it FSDP2 puts gathered copies into the module until
    the backward; a module whose parameters are such copies is refused). A parameter
    that requires gradients but is not in ``params`` would get its ``.grad`` changed: pass every
    trainable parameter the loss depends on (or freeze the others first).
    """
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"`loss` must be a scalar tensor, got {shape}. Fix: reduce it (e.g. `.mean()`) first.")
    named = _named(params, trainable_only=isinstance(params, nn.Module))
    frozen = [name for name, p in named.items() if not p.requires_grad]
    if frozen:
        raise ValueError(
            f"`params` must require gradients, got frozen tensors {frozen[:5]}. "
            "Fix: pass only parameters with requires_grad=True."
        )
    if not named:
        return {}
    if any(is_sharded(p) for p in named.values()):
        gathered = [name for name, p in named.items() if not _is_dtensor(p)]
        if isinstance(params, nn.Module) and gathered:
            raise ValueError(
                f"compute_gradients: the module's parameters {gathered[:3]} are FSDP2's gathered copies (a unit "
                "holds them from its forward until its backward), not the sharded parameters whose gradient "
                "FSDP2 writes. Fix: collect the parameters before the forward, e.g. "
                "`params = dict(model.named_parameters())`, then `compute_gradients(loss, params)`."
            )
        if create_graph:
            raise NotImplementedError(
                "compute_gradients(create_graph=True) is not available for sharded (FSDP2) parameters: their "
                "gradient is taken with backward(), which FSDP2 reduce-scatters into shards. Fix: use strategy='ddp'."
            )
        return _sharded_gradients(loss, named, retain_graph=retain_graph)
    grads = torch.autograd.grad(
        loss, list(named.values()), retain_graph=retain_graph, create_graph=create_graph, allow_unused=True
    )
    return {
        name: torch.zeros_like(p) if g is None else g for (name, p), g in zip(named.items(), grads)
    }


def _sharded_gradients(loss: Tensor, named: dict[str, Tensor], *, retain_graph: bool) -> dict[str, Tensor]:
    """``loss.backward()`` with the parameters' ``.grad`` stashed and put back (see compute_gradients)."""
    stash = {name: p.grad for name, p in named.items()}
    for p in named.values():
        p.grad = None
    try:
        loss.backward(retain_graph=retain_graph)
        return {name: torch.zeros_like(p) if p.grad is None else p.grad.detach() for name, p in named.items()}
    finally:
        for name, p in named.items():
            p.grad = stash[name]


def input_vjp(fn: Any, x: Tensor, grad: Tensor) -> Tensor:
    """``(∂fn(x)/∂x)ᵀ · grad``: the gradient of ``⟨fn(x), grad⟩`` with respect to the input ``x`` only.

    ``fn`` runs on a detached copy of ``x`` (with gradients enabled, whatever the caller's mode) and
    its backward reaches that copy alone: no parameter's ``.grad`` is written (under FSDP2 nothing
    is reduce-scattered). A frozen network's input gradient can so be taken at once, e.g. while
    another set of weights is swapped in, instead of in a later backward.
    """
    leaf = x.detach().requires_grad_(True)
    with torch.enable_grad():
        out = fn(leaf)
        (value,) = torch.autograd.grad(out, leaf, grad_outputs=grad.to(out.dtype))
    return value


def flatten_tensors(tensors: Mapping[str, Tensor]) -> dict[torch.dtype, Tensor]:
    """Concatenate tensors into one flat vector per dtype (in the mapping's order)."""
    groups: dict[torch.dtype, list[Tensor]] = {}
    for value in tensors.values():
        groups.setdefault(value.dtype, []).append(value.detach().reshape(-1))
    return {dtype: torch.cat(parts) for dtype, parts in groups.items()}


def unflatten_tensors(flat: Mapping[torch.dtype, Tensor], like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`flatten_tensors`: split flat vectors back into tensors shaped as ``like``."""
    offsets = {dtype: 0 for dtype in flat}
    out: dict[str, Tensor] = {}
    for name, ref in like.items():
        start = offsets[ref.dtype]
        stop = start + ref.numel()
        out[name] = flat[ref.dtype][start:stop].view_as(ref).to(ref.device)
        offsets[ref.dtype] = stop
    return out


def _world_size(strategy: Any) -> int:
    return int(getattr(strategy, "world_size", 1) or 1)


def average_gradients(strategy: Any, grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Mean of per-rank gradients across ranks: one ``strategy.reduce`` per dtype.

    Every rank must call this with the same names in the same order (it is a collective). On one
    process the gradients come back unchanged (as new tensors). DTensor gradients (of sharded
    parameters, already averaged by FSDP2's reduce-scatter) are passed through as they are.

    Args:
        strategy: ``trainer.strategy`` (or any object with Lightning's ``reduce`` signature).
        grads: name → gradient, e.g. from :func:`compute_gradients`.
    """
    if not grads:
        return {}
    # A DTensor gradient (a sharded parameter's, from compute_gradients) is already the mean.
    local = {name: g for name, g in grads.items() if not _is_dtensor(g)}
    if not local:
        return dict(grads)
    flat = flatten_tensors(local)
    if _world_size(strategy) > 1:
        # `reduce` averages in place and returns the result; the flat buffers are ours.
        flat = {dtype: strategy.reduce(value.clone(), reduce_op="mean") for dtype, value in flat.items()}
    averaged = unflatten_tensors(flat, local)
    return {name: averaged.get(name, g) for name, g in grads.items()}


def synced_gradients(
    trainer: Any, loss: Tensor, params: NamedParameters, *, retain_graph: bool = False
) -> dict[str, Tensor]:
    """:func:`compute_gradients` then :func:`average_gradients` through ``trainer.strategy``.

    The result is what one process would compute from the union of every rank's batch when the
    ranks hold equal batch sizes and ``loss`` is a per-sample mean.
    """
    grads = compute_gradients(loss, params, retain_graph=retain_graph)
    return average_gradients(trainer.strategy, grads)


@torch.no_grad()
def broadcast_parameters(strategy: Any, params: NamedParameters, *, src: int = 0) -> None:
    """Copy rank ``src``'s values of named tensors into every rank, in place.

    One ``strategy.broadcast`` of the flattened tensors (per dtype, in one object). Every rank
    must call it with the same names in the same order. Frozen parameters are included when a
    module is given: a broadcast is about values, not about training.

    Args:
        strategy: ``trainer.strategy`` (or any object with Lightning's ``broadcast`` signature).
        params: a module, a mapping name → tensor, or ``(name, tensor)`` pairs.
        src: the rank whose values win.
    """
    named = _named(params, trainable_only=False)
    if not named or _world_size(strategy) <= 1:
        return
    names = list(named)
    flat = flatten_tensors(named)
    received = strategy.broadcast({"names": names, "flat": flat}, src=src)
    if received["names"] != names:
        raise RuntimeError(
            "broadcast_parameters: ranks passed different parameter names "
            f"(rank {src} sent {received['names'][:5]}..., this rank has {names[:5]}...). "
            "Fix: call it with the same parameters on every rank."
        )
    for name, value in unflatten_tensors(received["flat"], named).items():
        named[name].copy_(value)
