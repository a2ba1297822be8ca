"""Parameters split across ranks (FSDP2 through Lightning's ``ModelParallelStrategy``).

With ``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)`` a user's
``configure_model`` calls :func:`torch.distributed.fsdp.fully_shard` on its layers, and every
parameter becomes a :class:`~torch.distributed.tensor.DTensor` whose rank ``r`` holds only the
``r``-th ``torch.chunk`` of dim 0 (its *local shard*). A method that touches parameters must then
never read a whole tensor on one rank. This module is the one place that knows how:

- :func:`is_sharded`, :func:`local_view`, :func:`global_slice`: what a rank holds, and where it
  sits in the full tensor.
- :func:`sum_of_squares`, :func:`global_norms`, :func:`global_dots`: whole-tensor reductions,
  a local partial sum per tensor and one ``all_reduce`` over the shard group for all of them.
- :func:`topk_mask`: the ``k`` largest scores over many tensors, as local boolean shards; ties at
  the threshold are broken by position (tensor order, then the full tensor's row-major index),
  so the sharded and the unsharded selection are the same set.
- :func:`draw_like`: a random draw equal to the unsharded run's: the full shape is drawn from the
  seeded generator (one parameter at a time) and the rank keeps its slice.
- :func:`shard_like`, :func:`local_clone`, :func:`full_tensor`: per-parameter state held as
  local shards of the parameters' own layout (memory ≈ 1/world size), cut from a full tensor
  on load and gathered to a full tensor only for checkpoints, export and reports.
- :func:`edit_local`: an elementwise weight edit applied to each rank's shard.
- :func:`as_layout`: a local shard seen as a tensor of its parameter's layout (a DTensor), for a
  sharded state dict or a whole-tensor reduction of kept local state.

Every helper also takes plain tensors (one process, DDP): then nothing is reduced, sliced or
gathered, so a callback written with them runs unchanged on every strategy. Only placements a
data-parallel ``fully_shard`` produces (``Shard(d)`` and ``Replicate()``) are handled; tensor
parallelism (``_StridedShard``, ``Partial``) is refused with a ``NotImplementedError``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

__all__ = [
    "batches_per_rank",
    "edit_local",
    "as_layout",
    "full_tensor",
    "global_dots",
    "global_norms",
    "global_slice",
    "global_sums",
    "broadcast_buffers",
    "reshard",
    "is_sharded",
    "kth_largest",
    "local_clone",
    "local_view",
    "named_local",
    "reshard",
    "sharding_refusal",
    "shard_like",
    "draw_like",
    "sum_of_squares",
    "topk_mask",
]

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor = None  # type: ignore[assignment,misc]
    Replicate = Shard = None  # type: ignore[assignment,misc]


def _is_fsdp(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, FSDPModule)


def _is_dtensor(value: Any) -> bool:
    return DTensor is not None and isinstance(value, DTensor)


def _shard_dims(tensor: "DTensor") -> list[tuple[int, int]]:
    """``(mesh_dim, tensor_dim)`` for each mesh dimension that splits ``tensor``."""
    dims = []
    for mesh_dim, placement in enumerate(tensor.placements):
        if type(placement) is Shard:
            dims.append((mesh_dim, int(placement.dim)))
        elif not isinstance(placement, Replicate):
            raise NotImplementedError(
                f"lightning_forget.sharding handles the placements of a data-parallel `fully_shard` "
                f"(Shard(dim) and Replicate()), not {placement!r}. Fix: use "
                "ModelParallelStrategy(tensor_parallel_size=1) or strategy='ddp'."
            )
    return dims


def is_sharded(obj: Union[Tensor, nn.Module]) -> bool:
    """Whether a tensor is split across ranks, or a module has any such parameter."""
    if isinstance(obj, nn.Module):
        # A unit between a forward and its reshard holds plain gathered weights: the FSDP2 wrapper
        # class still says the module is sharded.
        return any(_is_fsdp(m) for m in obj.modules()) or any(is_sharded(p) for p in obj.parameters())
    return _is_dtensor(obj) and bool(_shard_dims(obj))


def local_view(tensor: Tensor) -> Tensor:
    """The part of ``tensor`` this rank holds (a view sharing its storage); a plain tensor as is."""
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def global_slice(tensor: Tensor) -> tuple[slice, ...]:
    """Where :func:`local_view` sits in the full tensor: one ``slice`` per dimension.

    DTensor's ``Shard(d)`` follows ``torch.chunk``: chunks of ``ceil(size / n)`` rows, the last
    ones shorter or empty.
    """
    slices = [slice(0, int(size)) for size in tensor.shape]
    if not _is_dtensor(tensor):
        return tuple(slices)
    mesh = tensor.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:  # this rank is not in the mesh: it holds nothing
        return tuple(slice(0, 0) for _ in slices)
    for mesh_dim, dim in _shard_dims(tensor):
        n, c = int(mesh.size(mesh_dim)), int(coordinate[mesh_dim])
        outer = slices[dim]
        length = outer.stop - outer.start
        chunk = -(-length // n) if length else 0
        start = min(outer.start + c * chunk, outer.stop)
        slices[dim] = slice(start, min(start + chunk, outer.stop))
    return tuple(slices)


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """This rank's slice of ``full`` (a tensor of ``like``'s full shape), as a plain tensor.

    Cuts per-parameter state saved whole (a checkpoint, a pre-trained snapshot) back to the
    layout of ``like``. A plain ``like`` returns ``full`` unchanged.
    """
    if tuple(full.shape) != tuple(like.shape):
        raise ValueError(f"shard_like: full tensor of shape {tuple(full.shape)} for a parameter of shape {tuple(like.shape)}.")
    return full[global_slice(like)] if _is_dtensor(like) else full


def local_clone(tensor: Tensor, *, device: Optional[Union[str, torch.device]] = None, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A detached copy of this rank's shard: per-parameter state in the parameter's layout."""
    local = local_view(tensor).detach()
    return local.to(device=device or local.device, dtype=dtype or local.dtype, copy=True)


def full_tensor(tensor: Tensor, like: Optional[Tensor] = None) -> Tensor:
    """The whole tensor on every rank (a collective): for export, checkpoints and reports only.

    Args:
        tensor: a DTensor, or a local shard of ``like``'s layout (state kept by
            :func:`local_clone`), or a plain tensor (returned as is).
        like: the parameter whose layout a local shard ``tensor`` has.
    """
    if like is not None and not _is_dtensor(tensor):
        tensor = as_layout(tensor, like)
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor


def as_layout(local: Tensor, like: Tensor) -> Tensor:
    """A local shard of ``like``'s layout as a tensor of that layout (no collective, no copy).

    A DTensor ``like`` gives a DTensor of its mesh, placements and full shape whose local part is
    ``local`` (moved to ``like``'s device): what a sharded state dict holds, or what a whole-tensor
    reduction of local state (:func:`global_norms` of a kept delta) needs to see as sharded. A
    plain ``like`` returns ``local`` as is.
    """
    if not _is_dtensor(like):
        return local
    if tuple(local.shape) != tuple(like.to_local().shape):
        raise ValueError(f"as_layout: local shard of shape {tuple(local.shape)} for a local part of shape "
                         f"{tuple(like.to_local().shape)}.")
    return DTensor.from_local(local.to(like.to_local().device), like.device_mesh, like.placements,
                              run_check=False, shape=like.shape, stride=like.stride())


def _shard_groups(tensor: Tensor) -> list[Any]:
    if not _is_dtensor(tensor):
        return []
    return [tensor.device_mesh.get_group(mesh_dim) for mesh_dim, _ in _shard_dims(tensor)]


def _all_reduce_partials(partials: Tensor, like: Sequence[Tensor], op: Any = None) -> Tensor:
    """Sum (or ``op``) per-tensor partial values over the shard group(s) of the tensors in ``like``."""
    groups = next((g for g in map(_shard_groups, like) if g), [])
    for group in groups:
        torch.distributed.all_reduce(partials, op=op or torch.distributed.ReduceOp.SUM, group=group)
    return partials


def sum_of_squares(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``Σ x²`` of each whole tensor (float64), with one collective for all of them.

    Every rank must call it with the same names in the same order (it is a collective when any
    tensor is sharded). All sharded tensors must share one mesh (one ``fully_shard`` mesh).
    """
    names = list(tensors)
    if not names:
        return {}
    partial = torch.stack([local_view(tensors[n]).detach().double().square().sum() for n in names])
    total = _all_reduce_partials(partial, [tensors[n] for n in names])
    return {name: total[i] for i, name in enumerate(names)}


def global_norms(tensors: Mapping[str, Tensor], p: float = 2.0) -> dict[str, Tensor]:
    """The ``p``-norm (L2 by default; 1 or ``inf`` too) of each whole tensor (float64); see
    :func:`sum_of_squares` (one collective for all names)."""
    if p == 2:
        return {name: value.sqrt() for name, value in sum_of_squares(tensors).items()}
    if p == 1:
        return global_sums({name: local_view(t).abs() for name, t in tensors.items()}, like=tensors)
    if p != float("inf"):
        raise ValueError(f"global_norms: p must be 1, 2 or inf, got {p!r}.")
    names = list(tensors)
    if not names:
        return {}
    local = [local_view(tensors[n]).detach().double().abs() for n in names]
    partial = torch.stack([x.max() if x.numel() else x.new_zeros(()) for x in local])
    total = _all_reduce_partials(partial, [tensors[n] for n in names], torch.distributed.ReduceOp.MAX)
    return {name: total[i] for i, name in enumerate(names)}


def global_dots(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``⟨a[n], b[n]⟩`` over the whole tensors (float64), one collective for all names.

    ``a[n]`` and ``b[n]`` have one layout (both DTensors of one placement, both local shards of
    it, or both plain); a cosine is ``dot / (norm_a · norm_b)`` from these and
    :func:`global_norms`.
    """
    if list(a) != list(b):
        raise ValueError("global_dots: both mappings must hold the same names in the same order.")
    names = list(a)
    if not names:
        return {}
    partial = torch.stack([(local_view(a[n]).double() * local_view(b[n]).double()).sum() for n in names])
    reference = [x for n in names for x in (a[n], b[n])]
    total = _all_reduce_partials(partial, reference)
    return {name: total[i] for i, name in enumerate(names)}


def _gather_values(values: Tensor, group: Any) -> Tensor:
    """All ranks' ``values`` (1-D, padded with ``-inf`` to a common length), concatenated."""
    world = torch.distributed.get_world_size(group)
    length = torch.tensor([values.numel()], dtype=torch.int64)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    torch.distributed.all_gather(lengths, length, group=group)
    longest = int(max(int(x) for x in lengths))
    padded = torch.full((longest,), -float("inf"), dtype=values.dtype)
    padded[: values.numel()] = values
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded, group=group)
    return torch.cat(parts)


def kth_largest(tensors: Sequence[Tensor], k: int) -> Tensor:
    """The ``k``-th largest entry over all ``tensors`` (float64, 0-dim; every rank gets it).

    A tensor listed twice counts twice. Sharded tensors (one mesh) are reduced with one
    ``all_gather`` of each rank's local top-``k``; plain tensors need no collective.
    """
    local = [local_view(t).detach().reshape(-1).double().cpu() for t in tensors]
    flat = torch.cat(local) if local else torch.zeros(0, dtype=torch.float64)
    candidates = torch.topk(flat, min(int(k), flat.numel())).values if flat.numel() else flat
    group = next((g[0] for g in map(_shard_groups, tensors) if g), None)
    if group is not None:
        candidates = _gather_values(candidates, group)
    if not 1 <= int(k) <= candidates.numel():
        raise ValueError(f"kth_largest: k={k} must be between 1 and the number of entries.")
    return torch.topk(candidates, int(k)).values[-1]


def topk_mask(scores: Mapping[str, Tensor], k: int) -> dict[str, Tensor]:
    """Boolean masks (in each score's local layout) marking the ``k`` largest scores of all.

    The set is the one an unsharded run selects: every score above the ``k``-th largest value,
    and of the scores equal to it, the first by position (the mappings' order, then the full
    tensor's row-major index) until ``k`` are chosen. Sharded scores (DTensors of one mesh,
    ``Shard(0)``, as ``fully_shard`` makes them) are handled with two small ``all_gather``s:
    each rank's local top-``k`` values, then each rank's count of ties per tensor.

    Args:
        scores: name → score tensor (e.g. a gradient magnitude per weight).
        k: how many entries to select over all tensors (``0 ≤ k ≤`` total size).
    """
    names = list(scores)
    locals_ = [local_view(scores[n]).detach().reshape(-1).double().cpu() for n in names]
    total = sum(int(scores[n].numel()) for n in names)
    if not 0 <= int(k) <= total:
        raise ValueError(f"topk_mask: k={k} must be between 0 and the number of scores ({total}).")
    k = int(k)
    group = next((g[0] for g in map(_shard_groups, scores.values()) if g), None)
    if k == 0:
        return {n: torch.zeros_like(local_view(scores[n]), dtype=torch.bool) for n in names}
    threshold = kth_largest([scores[n] for n in names], k)
    above = [x > threshold for x in locals_]
    ties = [x == threshold for x in locals_]
    count_above = torch.tensor([float(sum(int(a.sum()) for a in above))], dtype=torch.float64)
    if group is not None:
        torch.distributed.all_reduce(count_above, group=group)
    needed = k - int(count_above.item())
    if group is not None:
        counts = torch.tensor([int(t.sum()) for t in ties], dtype=torch.int64)
        world = torch.distributed.get_world_size(group)
        rank = torch.distributed.get_rank(group)
        every = [torch.zeros_like(counts) for _ in range(world)]
        torch.distributed.all_gather(every, counts, group=group)
        table = torch.stack(every)  # rank × tensor: Shard(0) chunks are in rank order
        before = [int(table[:, :i].sum()) + int(table[:rank, i].sum()) for i in range(len(names))]
    else:
        counts = [int(t.sum()) for t in ties]
        before = [int(sum(counts[:i])) for i in range(len(names))]
    masks = {}
    for i, name in enumerate(names):
        take = max(0, min(int(ties[i].sum()), needed - before[i]))
        chosen = above[i].clone()
        if take:
            positions = ties[i].nonzero().flatten()[:take]
            chosen[positions] = True
        local = local_view(scores[name])
        masks[name] = chosen.reshape(local.shape).to(local.device)
    return masks


def draw_like(
    tensor: Tensor,
    generator: torch.Generator,
    sample: Callable[..., Tensor] = torch.randn,
) -> Tensor:
    """A random tensor for ``tensor``'s local shard, equal to the unsharded run's draw.

    ``sample(shape, generator=..., dtype=...)`` (``torch.randn``, ``torch.rand``) draws the full
    shape on the generator's device (the generator advances exactly as in the unsharded run);
    the rank keeps its slice, moved to the shard's device. The full draw is a temporary of one
    parameter's size at a time.
    """
    local = local_view(tensor)
    full = sample(tuple(tensor.shape), generator=generator, dtype=local.dtype, device=generator.device)
    return full[global_slice(tensor)].to(local.device)


@torch.no_grad()
def edit_local(tensor: Tensor, edit: Callable[[Tensor], Tensor], *others: Tensor) -> None:
    """Write ``edit(local, *others_local)`` into ``tensor``'s local shard, in place.

    ``edit`` is elementwise (a scaling, a merge ``θ_0 + λ·τ``, a masked copy); ``others`` are
    tensors of the same layout (DTensors or local shards), passed as their local views.
    """
    local = local_view(tensor)
    local.copy_(edit(local, *(local_view(o) for o in others)))


def batches_per_rank(size: int, world: int, batch_size: int) -> int:
    """Batches of the rank with the most rows when ``size`` rows are split ``rank::world``.

    A sharded forward is collective: every rank must run this many (a rank with fewer rows runs
    the rest on a padding row and drops the results), as :class:`DistributedSampler`'s padding does.
    """
    if size < 0 or world < 1 or batch_size < 1:
        raise ValueError(f"batches_per_rank: size={size}, world={world}, batch_size={batch_size} must be >= 0, >= 1, >= 1.")
    return -(-(-(-size // world)) // batch_size)


def named_local(params: Union[nn.Module, Iterable[tuple[str, Tensor]]]) -> dict[str, Tensor]:
    """``name → local shard`` of a module's parameters (plain tensors for unsharded ones)."""
    items = params.named_parameters() if isinstance(params, nn.Module) else params
    return {name: local_view(p) for name, p in items}


def global_sums(values: Mapping[str, Tensor], like: Optional[Mapping[str, Tensor]] = None) -> dict[str, Tensor]:
    """``Σ`` over each whole tensor (float64), one collective for all names.

    ``values[n]`` is a DTensor, a plain tensor, or (with ``like``) this rank's local shard of a
    tensor in the layout of ``like[n]`` (e.g. ``(θ_local - θ0_local).abs()`` for an L1 change of
    per-parameter state kept by :func:`local_clone`, or the square of a local step for its norm).
    Every rank must call it with the same names in the same order.
    """
    names = list(values)
    if not names:
        return {}
    reference = [like[n] for n in names] if like is not None else [values[n] for n in names]
    partial = torch.stack([local_view(values[n]).detach().double().sum() for n in names])
    total = _all_reduce_partials(partial, reference)
    return {name: total[i] for i, name in enumerate(names)}


def reshard(module: nn.Module) -> None:
    """Put every FSDP2 unit of ``module`` back to its sharded parameters (a no-op unsharded).

    FSDP2 keeps the root unit's parameters gathered after a forward that no backward follows (an
    evaluation forward): until the next backward, ``named_parameters()`` then gives plain full
    tensors instead of the sharded DTensors. Call it before reading or editing parameters
    outside the training step (a gradient, a weight edit).
    """
    for unit in module.modules():
        if _is_fsdp(unit):
            unit.reshard()


@torch.no_grad()
def broadcast_buffers(modules: Iterable[nn.Module], *, src: int = 0) -> None:
    """Copy rank ``src``'s buffers of ``modules`` (their own, not their children's) into every rank.

    What DDP's ``broadcast_buffers=True`` does before each training forward, for modules whose
    buffers FSDP2 leaves per rank (it neither shards nor synchronises buffers). One broadcast of
    the flattened buffers per dtype over the default process group; nothing on one process.
    Every rank must call it with the same modules in the same order.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() <= 1:
        return
    buffers = [b for m in modules for _, b in m.named_buffers(recurse=False) if isinstance(b, Tensor)]
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for buffer in buffers:
        by_dtype.setdefault(buffer.dtype, []).append(buffer)
    for dtype, group in by_dtype.items():
        flat = torch.cat([local_view(b).detach().reshape(-1) for b in group])
        torch.distributed.broadcast(flat, src=src)
        offset = 0
        for buffer in group:
            local = local_view(buffer)
            local.copy_(flat[offset: offset + local.numel()].view_as(local).to(local.device))
            offset += local.numel()


#: Why a method does not run under ``ModelParallelStrategy`` yet (by class name, through the MRO),
#: quoted by :func:`lightning_forget.tasks.check_strategy` in its refusal.
_REFUSALS: dict[str, str] = {
    # concept erasure (callbacks/erasure.py and the methods built on ErasureMethod)
    "ErasureMethod": "A method built on it runs sharded once its own step is checked against DDP (the library's "
    "ESD, UCE, ConceptAblation, DoCo, SalUnDiffusion and SFD are: declare supported_strategies to opt in).",
    "SFD": "Its fake-score network is a second set of whole UNet weights run through the module "
    "(torch.func.functional_call) and trained by the callback's own optimizer with torch.autograd.grad outside "
    "the training step, neither of which works on FSDP2's sharded parameters.",
}


def sharding_refusal(cls: type) -> str:
    """The reason :data:`_REFUSALS` gives for ``cls`` (or a base class), with a trailing space; ``""`` if none."""
    for base in cls.__mro__:
        if base.__name__ in _REFUSALS:
            return _REFUSALS[base.__name__] + " "
    return ""
