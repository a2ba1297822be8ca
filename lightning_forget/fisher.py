"""Diagonal Fisher information estimates from per-sample gradients.

The diagonal of the Fisher information matrix measures, parameter by parameter, how sharply the
model's log-likelihood reacts to a change of that parameter. Methods that protect or
precondition parameters by their importance (refresh learning, online EWC, ...) use it.

:func:`fisher_diagonal` computes, for a classifier ``f_θ`` and samples ``(x_i, y_i)``,

    F_p = (1/N) · Σ_i w_i · (∂ log p_θ(y_i | x_i) / ∂θ_p)²,

with ``p_θ(y|x) = softmax(f_θ(x))_y`` and ``w_i = p_θ(y_i | x_i)`` (``loss="nll"``: the
empirical Fisher on the true label weighted by the model's confidence in it, the estimate used
by refresh learning, Wang et al., "A Unified and General Framework for Continual Learning",
ICLR 2024) or ``w_i = 1`` (``loss="empirical"``: the plain empirical Fisher). The weight is a
constant (no gradient flows through it).

Per-sample gradients are computed in one vectorised pass per batch with
:func:`torch.func.vmap` over :func:`torch.func.grad` of a :func:`torch.func.functional_call`;
``vectorized=False`` computes them one sample at a time instead (for models whose forward
``vmap`` cannot trace). The model is put in eval mode for the estimate (BatchNorm uses its
running statistics and does not update them; dropout is off) and its mode is restored after.

A model with sharded parameters (FSDP2 ``fully_shard``, DTensors) cannot go through
``functional_call``/``vmap`` (FSDP2 swaps its own gathered weights in for every forward): each
sample then takes one forward and one ``backward()`` through
:func:`lightning_forget.gradients.compute_gradients`, whose sharded gradient is the mean over the
data-parallel ranks, so **every rank must pass the same samples** (the mean of equal gradients is
that gradient); the result is each parameter's local shard.

No Lightning in this module.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from lightning_forget.batch import logits_of
from lightning_forget.sharding import is_sharded, local_view, reshard
from lightning_forget.validation import check_bool, check_choice, check_int, check_type

__all__ = ["fisher_diagonal"]

FisherLoss = Literal["nll", "empirical"]


def _pair(batch: Any, index: int) -> tuple[Tensor, Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], Tensor) and isinstance(batch[1], Tensor):
        return batch[0], batch[1]
    raise TypeError(
        f"`batches` must yield (x, y) pairs of tensors, but item {index} is a {type(batch).__name__}. "
        "Fix: map each batch to (inputs, integer labels) first, e.g. `((b['image'], b['label']) for b in loader)`."
    )


def _log_likelihood(model: nn.Module, state: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    """log p(y | x) of one sample (``x`` without its batch dimension)."""
    logits = logits_of(functional_call(model, state, (x.unsqueeze(0),)))
    return torch.log_softmax(logits.float(), dim=-1)[0].gather(0, y.reshape(1).long())[0]


def fisher_diagonal(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    loss: FisherLoss = "nll",
    max_samples: Optional[int] = None,
    progress: bool = True,
    vectorized: bool = True,
) -> dict[str, Tensor]:
    """The diagonal (confidence-weighted) empirical Fisher of a classifier, per parameter.

    Args:
        model: a classifier whose forward maps a batch of inputs to logits (a tensor, or an output
            with ``logits``). Only its trainable parameters (``requires_grad=True``) get an entry;
            frozen parameters and buffers are used as constants.
        batches: an iterable of ``(x, y)`` pairs (``x``: a batch of inputs, ``y``: integer class
            labels), e.g. a ``DataLoader`` of a ``TensorDataset``. Moved to the model's device.
        loss: ``"nll"`` weights each sample's squared gradient of ``log p(y|x)`` by ``p(y|x)``
            (refresh learning's estimate); ``"empirical"`` does not weight.
        max_samples: stop after this many samples (the last batch is cut); ``None`` uses all.
        progress: show a progress bar (``tqdm``) over the batches.
        vectorized: per-sample gradients with ``torch.func.vmap`` (one pass per batch); ``False``
            loops over the samples (same result, for forwards that ``vmap`` cannot trace).
            Ignored for a sharded model (always one sample at a time, see the module docstring).

    Returns:
        parameter name → the Fisher diagonal (same shape, dtype and device as the parameter;
        for a sharded parameter its local shard), the mean over all samples seen.

    Raises:
        TypeError: a wrong argument type, or an item of ``batches`` that is not an ``(x, y)`` pair.
        ValueError: ``loss`` is not one of the choices, ``max_samples < 1``, the model has no
            trainable parameter, or ``batches`` yields no sample.
    """
    check_type("model", model, nn.Module, fix="pass the torch.nn.Module whose Fisher to estimate")
    loss = check_choice("loss", loss, ("nll", "empirical"))
    max_samples = check_int("max_samples", max_samples, min=1, allow_none=True,
                            fix="pass the number of samples to use, or None for all")
    check_bool("progress", progress)
    check_bool("vectorized", vectorized)
    reshard(model)  # FSDP2: the sharded parameters, also after an evaluation forward
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError(
            f"`model` has no trainable parameter (all {sum(1 for _ in model.parameters())} are frozen), so it "
            "has no Fisher to estimate. Fix: unfreeze the parameters whose Fisher you need."
        )
    constants = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
    constants.update({name: b for name, b in model.named_buffers()})
    device = next(iter(trainable.values())).device

    def log_lik(params: dict[str, Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        value = _log_likelihood(model, {**constants, **params}, x, y)
        return value, value.detach()

    sharded = any(is_sharded(p) for p in trainable.values())

    def sharded_sample(x: Tensor, y: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        from lightning_forget.gradients import compute_gradients

        with torch.enable_grad():
            logits = logits_of(model(x.unsqueeze(0)))
            value = torch.log_softmax(logits.float(), dim=-1)[0].gather(0, y.reshape(1).long())[0]
            grads = compute_gradients(value, trainable)
        return {name: local_view(g) for name, g in grads.items()}, value.detach()

    per_sample = grad(log_lik, has_aux=True)
    batched = vmap(per_sample, in_dims=(None, 0, 0))

    sums = {name: torch.zeros_like(local_view(p), dtype=torch.float32) for name, p in trainable.items()}
    seen = 0
    was_training = model.training
    model.eval()
    try:
        from tqdm.auto import tqdm

        total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
        bar = tqdm(batches, total=total, desc="Fisher", unit="batch", disable=not progress, leave=False)
        for index, batch in enumerate(bar):
            x, y = _pair(batch, index)
            if max_samples is not None:
                x, y = x[: max_samples - seen], y[: max_samples - seen]
            if x.shape[0] == 0:
                break
            x, y = x.to(device), y.to(device)
            params = {name: p.detach() for name, p in trainable.items()}
            if sharded:
                for i in range(x.shape[0]):
                    grads, log_p = sharded_sample(x[i], y[i])
                    weight = log_p.exp() if loss == "nll" else torch.ones_like(log_p)
                    for name, g in grads.items():
                        sums[name] += weight * g.float().pow(2)
            elif vectorized:
                grads, log_p = batched(params, x, y)
                weight = log_p.exp() if loss == "nll" else torch.ones_like(log_p)
                for name, g in grads.items():
                    w = weight.reshape(-1, *([1] * (g.dim() - 1)))
                    sums[name] += (w * g.float().pow(2)).sum(0)
            else:
                for i in range(x.shape[0]):
                    grads, log_p = per_sample(params, x[i], y[i])
                    weight = log_p.exp() if loss == "nll" else torch.ones_like(log_p)
                    for name, g in grads.items():
                        sums[name] += weight * g.float().pow(2)
            seen += int(x.shape[0])
            if max_samples is not None and seen >= max_samples:
                break
        bar.close()
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("`batches` yielded no sample, so there is no Fisher to average. Fix: pass a non-empty loader.")
    return {name: (total_ / seen).to(trainable[name].dtype) for name, total_ in sums.items()}
