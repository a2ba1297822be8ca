"""Refresh learning: unlearn the current batch a little, then learn it as usual.

Wang, Li, Shen and Huang, "A Unified and General Framework for Continual Learning" (ICLR 2024).
Before each normal update, the model takes one small, Fisher-preconditioned, noisy
gradient-**ascent** step on the current batch (it "unlearns" it); the base method's usual step
then "relearns" from the perturbed weights. The paper derives it as an approximate minimisation
of a Fisher-weighted gradient norm, which favours flatter minima.

:func:`unlearn_step` is the step on its own (usable without Lightning); :class:`RefreshLearning`
is the plug-in callback that runs it before every ``training_step`` of any base method
(fine-tuning, :class:`~lightning_forget.callbacks.ExperienceReplay`,
:class:`~lightning_forget.callbacks.DarkExperienceReplay`, a user's module) and re-estimates the
Fisher at every task end with :func:`lightning_forget.fisher.fisher_diagonal`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset, default_collate

from lightning_forget.batch import BatchFields, logits_of
from lightning_forget.distributed import rank_generator
from lightning_forget.fisher import fisher_diagonal
from lightning_forget.forward import ModelForward
from lightning_forget.gradients import average_gradients, compute_gradients, flatten_tensors, unflatten_tensors
from lightning_forget.optim_step import OptimizerStepHooks
from lightning_forget.precision import forward_context
from lightning_forget.sharding import (
    draw_like, full_tensor, global_norms, global_slice, global_sums, is_sharded, local_view, reshard, shard_like,
)
from lightning_forget.tasks import DDP_STRATEGIES, SHARDED_STRATEGIES, ContinualCallback, task_schedule
from lightning_forget.validation import check_float, check_int, check_type

try:  # Python 3.12+
    from typing import override
except ImportError:  # pragma: no cover
    from typing_extensions import override

__all__ = ["Displacement", "RefreshLearning", "unlearn_step"]

LossFn = Callable[[nn.Module, Any], Tensor]
FieldKey = Union[str, int, None]

#: Salt of the noise generator's seed, so it never coincides with another callback's draws.
_NOISE_SALT = 0x5EF5
_FISHER_SALT = 0xF15E
#: Parameter dtypes in which the unlearn step may round away (checked, with a warning).
_HALF = (torch.bfloat16, torch.float16)


def _buffers_of(model: nn.Module) -> list[tuple[nn.Module, str, Tensor]]:
    """Copies of every buffer of ``model`` (running statistics, batch counters, AdaB²N's momentum
    recursion and task index, ...), to put back after a forward that must leave them alone."""
    saved = []
    for module in model.modules():
        for name, value in module.named_buffers(recurse=False):
            if isinstance(value, Tensor):
                saved.append((module, name, value.detach().clone()))
    return saved


@torch.no_grad()
def _restore(saved: list[tuple[nn.Module, str, Tensor]]) -> None:
    for module, name, value in saved:
        getattr(module, name).copy_(value)


class Displacement(dict):
    """Parameter name → the displacement :func:`unlearn_step` applied (new minus old value, in the
    parameter's dtype), with :attr:`intended_norm`, the norm of the float32 step it meant to add.

    Under ``bf16-true``/``16-true`` the two differ: a step below half a unit in the last place of
    a weight rounds away, so :attr:`applied_norm` shows what the step really did.
    """

    intended_norm: Tensor
    #: Norm of the part of the step that rounding lost (intended minus applied; 0 for parameters
    #: in float32 or wider, whose rounding error is not measured).
    lost_norm: Tensor
    #: name → the parameter whose layout each value has (sharded parameters: the values are this
    #: rank's local shards, and the norms are reduced over the shards).
    like: dict[str, Tensor]

    @property
    def applied_norm(self) -> Tensor:
        """Norm (float32) of the applied displacement over all parameters (a collective when sharded)."""
        return _norm_of(self, getattr(self, "like", None))


def _randn32(shape: tuple[int, ...], *, generator: torch.Generator, dtype: torch.dtype, device: Any) -> Tensor:
    """float32 standard normal noise whatever the parameter's dtype (for :func:`draw_like`)."""
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)


def _norm_of(values: Mapping[str, Tensor], like: Optional[Mapping[str, Tensor]]) -> Tensor:
    """Norm (float32) over all ``values`` (local shards of ``like``'s layout), summed over shards."""
    return _sum_sqrt({name: v.detach().double().square().sum() for name, v in values.items()}, like or values)


def _default_loss(model: nn.Module, batch: Any) -> Tensor:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, Tensor) for t in batch)):
        raise TypeError(
            f"unlearn_step: the default loss needs an (x, y) pair of tensors, got a {type(batch).__name__}. "
            "Fix: pass `loss_fn=` (a function `loss_fn(model, batch) -> scalar loss`) for other batches."
        )
    x, y = batch
    return nn.functional.cross_entropy(logits_of(model(x)).float(), y)


def unlearn_step(
    model: nn.Module,
    batch: Any,
    fisher: Optional[Mapping[str, Tensor]] = None,
    *,
    delta: float = 1e-5,
    damping: float = 1e-3,
    noise_std: float = 1e-3,
    generator: Optional[torch.Generator] = None,
    loss_fn: Optional[LossFn] = None,
    strategy: Any = None,
) -> Displacement:
    """One refresh-learning unlearn step, in place on the model's trainable parameters.

    With ``g_p`` the gradient of the loss for parameter tensor ``p`` (averaged across ranks when
    ``strategy`` is given), the step is the noisy, Fisher-preconditioned ascent

        u_p = ‖θ_p‖ · g_p / ‖g_p‖        (``u_p = 0`` where ``g_p = 0``)
        θ_p ← θ_p + δ · (u_p + σ·ε_p) / (1 + c·F_p),     ε_p ~ N(0, I),

    with norms in float32 whatever the parameters' dtype. The ascent direction is rescaled to
    the norm of the parameter tensor itself, so ``δ`` is a relative step size. The defaults are
    those of the authors' code (δ = 1e-5, c = 1e-3, σ = 1e-3; the noise is absolute, not scaled
    by ‖θ_p‖). The forward runs in the model's current mode, and every buffer of the model is
    restored afterwards (BatchNorm's running mean, variance and batch counter; AdaB²N's running
    statistics, step counter and momentum recursion; any other buffer a train-mode forward
    updates), so the step changes parameters only. Frozen parameters (``requires_grad=False``)
    are neither read nor changed. ``.grad`` is not touched.

    The float32 step is added to each parameter with one rounding to the parameter's dtype. In
    bfloat16 or float16 (``bf16-true``/``16-true``) an element moves only where its step reaches
    half a unit in the last place of the weight (about ``2^-9·|θ|`` in bfloat16), far above the
    default ``δ = 1e-5``: most of the step is then lost. The returned :class:`Displacement`
    holds what was really applied and the norm of what was meant and of the part rounding lost
    (the callback warns when that is more than half). With the default damping ``c = 1e-3`` the
    preconditioner ``1/(1 + c·F)`` is 1 to within ``c·max F`` (at most 7e-5 on the Split MNIST
    MLP and 1.9e-3 on the small ResNet in this library's benchmarks), and the noise ``δ·σ = 1e-8`` per element is far below the ascent term: at the
    authors' defaults the step is, to measurable precision, a norm-rescaled gradient-ascent step.

    Args:
        model: the model to edit.
        batch: ``(x, y)`` for the default loss, cross-entropy of the logits of ``model(x)``
            against ``y``; anything ``loss_fn`` accepts otherwise.
        fisher: parameter name → diagonal Fisher (same shape), e.g. from
            :func:`~lightning_forget.fisher.fisher_diagonal`; ``None`` means F = 0. It must cover
            every trainable parameter.
        delta: step size δ (≥ 0).
        damping: Fisher damping c (≥ 0).
        noise_std: noise scale σ (≥ 0); ``0`` draws no noise.
        generator: the ``torch.Generator`` of the noise (its device decides where noise is
            drawn); ``None`` uses torch's global generator. Under DDP pass one seeded alike on
            every rank.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor`` replacing the default loss.
        strategy: ``trainer.strategy`` (anything with Lightning's ``reduce``): the gradient is
            averaged across ranks; ``None`` on one process.

    Returns:
        a :class:`Displacement`: parameter name → the displacement really applied (new minus
        old value, in the parameter's dtype; for a sharded parameter, this rank's local shard),
        and the norm of the intended float32 step (over all shards).

    Raises:
        TypeError: a wrong argument type; the default loss on a batch that is not ``(x, y)``.
        ValueError: a negative or non-finite ``delta``/``damping``/``noise_std``.
        KeyError: ``fisher`` lacks a trainable parameter.
    """
    delta = check_float("delta", delta, min=0.0, fix="pass a relative step size >= 0, e.g. 1e-5")
    damping = check_float("damping", damping, min=0.0, fix="pass a Fisher damping >= 0, e.g. 1e-3")
    noise_std = check_float("noise_std", noise_std, min=0.0, fix="pass a noise scale >= 0, e.g. 1e-3")
    check_type("generator", generator, torch.Generator, allow_none=True)
    reshard(model)  # FSDP2: the sharded parameters, also after an evaluation forward
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if fisher is not None:
        missing = [name for name in params if name not in fisher]
        if missing:
            raise KeyError(
                f"unlearn_step: `fisher` has no entry for the trainable parameters {missing[:5]} "
                f"(it has {list(fisher)[:5]}...). Fix: estimate it on this model, or pass fisher=None (F = 0)."
            )
    saved = _buffers_of(model)
    try:
        with torch.enable_grad():
            loss = (loss_fn or _default_loss)(model, batch)
            # sharded parameters: the data-parallel mean already (backward through FSDP2)
            grads = compute_gradients(loss, params)
    finally:
        _restore(saved)
    if strategy is not None:
        grads = average_gradients(strategy, grads)
    # Whole-tensor norms (over all shards when sharded), one collective for all parameters.
    g_norms = global_norms(grads)
    p_norms = global_norms({name: p.detach() for name, p in params.items()})
    tiny = torch.finfo(torch.float32).tiny
    displacement = Displacement()
    displacement.like = dict(params)
    intended: dict[str, Tensor] = {}
    lost: dict[str, Tensor] = {}
    with torch.no_grad():
        # The step is built in place in the float32 gradient (a tensor of our own): the work is a
        # few passes over every parameter, which on small batches costs more than the forward.
        # Everything per parameter is on this rank's local shard (the whole tensor unsharded).
        for name, p in params.items():
            local = local_view(p)
            step = local_view(grads[name]).float()
            g_norm = g_norms[name].float().to(step.device)
            p_norm = p_norms[name].float().to(step.device)
            step.mul_(torch.where(g_norm > 0, p_norm / g_norm.clamp_min(tiny), torch.zeros_like(g_norm)))
            if noise_std > 0:
                if generator is not None:  # the full tensor's draw, this rank's slice
                    noise = draw_like(p, generator, sample=_randn32)
                else:
                    noise = torch.randn(p.shape, device=local.device, dtype=torch.float32)[global_slice(p)]
                step.add_(noise.to(local.device), alpha=noise_std)
            if fisher is not None:
                step.div_(fisher[name].to(local.device, torch.float32).mul(damping).add_(1.0))
            step.mul_(delta)
            intended[name] = step.double().square().sum()
            old = local.detach().clone()
            # one rounding of the float32 sum to the parameter's dtype (a bf16 weight moves only
            # where the step reaches half a unit in its last place)
            wide = torch.promote_types(old.dtype, torch.float32)
            local.copy_(old.to(wide) + step.to(wide))
            displacement[name] = local.detach() - old
            if p.dtype in _HALF:
                lost[name] = step.sub_(displacement[name].float()).double().square().sum()
    displacement.intended_norm = _sum_sqrt(intended, params)
    displacement.lost_norm = _sum_sqrt(lost, params)
    return displacement


def _sum_sqrt(partials: dict[str, Tensor], like: Mapping[str, Tensor]) -> Tensor:
    """``sqrt(Σ partials)`` over every shard (float32); ``partials`` are per-parameter local sums of squares."""
    if not partials:
        return torch.zeros(())
    sums = global_sums(partials, like={name: like[name] for name in partials})
    return torch.stack(list(sums.values())).sum().sqrt().float()


def _total_norm(norms: list[Tensor]) -> Tensor:
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))


class RefreshLearning(OptimizerStepHooks, ContinualCallback):
    """Refresh learning: before each update, unlearn the current batch by a small noisy ascent step.

    Wang, Li, Shen and Huang, "A Unified and General Framework for Continual Learning" (ICLR
    2024). A plug-in for any continual method: in ``on_train_batch_start``, before the base
    method's ``training_step``, the model takes :func:`unlearn_step` (a gradient-ascent step on
    the cross-entropy of the current batch, rescaled per tensor to the parameter's norm,
    preconditioned by ``1/(1 + c·F)`` and with Gaussian noise); the base method's normal update
    then relearns from there. The unlearn step sees the loader's batch only: replay callbacks
    (:class:`~lightning_forget.callbacks.ExperienceReplay`,
    :class:`~lightning_forget.callbacks.DarkExperienceReplay`) join their buffer rows inside
    ``training_step``, after this hook, whatever the order of the callbacks.

    At every task end (one fit per task, or each task of a continual datamodule) the Fisher
    diagonal is re-estimated on the finished task's training set, ``F ← τ·F + F_new`` (F = 0
    during the first task), with :func:`~lightning_forget.fisher.fisher_diagonal` on up to
    ``fisher_samples`` samples drawn without replacement (a seeded subset, the same on every
    rank; under DDP the ranks split it and their sums are all-reduced).

    Defaults (δ, c, σ, τ, one unlearn step per batch, on every batch) are those of the authors'
    code. Deliberate deviations: the unlearn forward runs on the live model with every buffer
    restored afterwards (normalisation statistics, AdaB²N's counter and momentum recursion; the
    authors use a copy of the network); the Fisher is estimated in eval mode on a capped subset
    (the authors iterate the whole training loader one sample at a time in train mode); the
    unlearn noise comes from a generator seeded from ``(seed, task, global step, batch index,
    unlearn step)``, so it is rank-shared, differs from task to task also with one fit per task
    (where ``global_step`` restarts), and a resumed run draws the same noise without storing
    generator state.

    What the defaults amount to: with c = 1e-3 the preconditioner ``1/(1 + c·F)`` differs from 1
    by at most ``c·max F``: after every task of Split MNIST at most 7e-5 on an MLP and 1.9e-3 on
    the small ResNet (its largest Fisher entries), so the preconditioner changes the step by at
    most 0.2%, on a few elements; the noise adds ``δ·σ = 1e-8`` per element against an ascent step of ``δ·‖θ_p‖·g/‖g‖``;
    so at the authors' defaults refresh is, to measurable precision, a norm-rescaled gradient-
    ascent step on the current batch. The Fisher matters only with a larger damping ``c``.

    Precision: the step is added with one rounding to the parameters' dtype. Under
    ``bf16-true``/``16-true`` a relative step of 1e-5 is below the weights' resolution and most
    of it rounds away; the callback then warns once, and ``refresh/displacement`` logs what was
    really applied. Use ``bf16-mixed``/``16-mixed`` (float32 weights) or a larger ``delta``.

    Sharded models (``ModelParallelStrategy``, FSDP2): the unlearn gradient is taken with
    ``backward()`` through :func:`~lightning_forget.gradients.compute_gradients` (the
    data-parallel mean, as under DDP; ``.grad`` left as it was), the norms ``‖θ_p‖``, ``‖g_p‖``
    are reduced over the shards, the noise is the unsharded run's draw sliced to each shard, and
    the Fisher is kept as local shards (gathered to full tensors only in the checkpoint). The
    Fisher's per-sample gradients then take one forward and backward per sample, every rank on
    every sample (not split across ranks, not vectorised): its cost is ``fisher_samples``
    sequential backwards per task end.

    Args:
        delta: unlearn step size δ, relative to each parameter tensor's norm (authors' code:
            1e-5).
        damping: Fisher damping c in ``1/(1 + c·F)`` (authors' code: 1e-3).
        noise_std: absolute standard deviation σ of the unlearn noise (authors' code: 1e-3).
        tau: decay τ of the previous Fisher, ``F ← τ·F + F_new`` (authors' code: 1e-5).
        every_n_steps: unlearn on the batches of every n-th optimizer update (1: every batch, as
            the authors do); counted in real optimizer steps, so gradient accumulation and
            steps skipped by AMP are accounted for.
        unlearn_steps: unlearn steps per such batch (authors' code: 1).
        fisher_samples: samples of the finished task used for its Fisher; ``0`` keeps F = 0
            (the default 1000 is this library's, to bound the cost).
        fisher_batch_size: batch size of the Fisher pass (vectorised per-sample gradients).
        seed: seed of the noise and of the Fisher subset.
        input_key: the model input's field of the batch (see
            :class:`~lightning_forget.batch.BatchFields`).
        target_key: the labels' field.
        stream: the sub-batch of a two-stream batch to unlearn.
        loss_fn: ``loss_fn(pl_module, batch) -> scalar tensor``, the unlearn loss on the loader's
            batch, for modules whose batch is not an input and class labels (default:
            cross-entropy of ``pl_module(x)`` against ``y``). The Fisher still needs ``(x, y)``
            fields; pass ``fisher_samples=0`` where the batch has none.
        forward_fn: the module's logits function for the default unlearn loss and the Fisher:
            ``None`` for its ``forward``, or a submodule or method name (``"net"``) for a module
            without one (see :class:`~lightning_forget.forward.ModelForward`).

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: a negative or non-finite ``delta``/``damping``/``noise_std``/``tau``,
            ``every_n_steps`` or ``unlearn_steps`` below 1, negative ``fisher_samples``.
        KeyError: the batch has no input/target field and no ``loss_fn`` was given, or (with
            ``fisher_samples > 0``) no labels for the Fisher (first step).
        RuntimeError: a module without ``forward`` and no ``forward_fn``
            (``setup``); with ``fisher_samples > 0``, a training loader without a sized dataset
            (first step).

    Note:
        Logged keys: ``refresh/intended_displacement`` (norm of the float32 step meant, per
        step); ``refresh/displacement`` (norm of the displacement really applied to the
        parameters, after rounding to their dtype, per step). Saved state: the Fisher (name → CPU tensor), the number of
        Fisher estimates, the count of optimizer steps, and the task counters.
    """

    #: Tested single-process, under DDP and under ModelParallelStrategy (FSDP2).
    supported_strategies: tuple[str, ...] = DDP_STRATEGIES + SHARDED_STRATEGIES
    #: Constructor arguments whose change a resume refuses (see ContinualCallback.state_arguments).
    state_arguments: tuple[str, ...] = ()
    #: Whether the task end edits weights (then it runs inside tasks.atomic_edit).
    task_end_edits_weights = False

    def __init__(
        self,
        delta: float = 1e-5,
        damping: float = 1e-3,
        noise_std: float = 1e-3,
        tau: float = 1e-5,
        every_n_steps: int = 1,
        unlearn_steps: int = 1,
        fisher_samples: int = 1000,
        fisher_batch_size: int = 64,
        seed: int = 0,
        input_key: FieldKey = None,
        target_key: FieldKey = None,
        stream: FieldKey = None,
        loss_fn: Optional[LossFn] = None,
        forward_fn: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.delta = check_float("delta", delta, min=0.0, fix="pass a relative step size >= 0, e.g. 1e-5")
        self.damping = check_float("damping", damping, min=0.0, fix="pass a Fisher damping >= 0, e.g. 1e-3")
        self.noise_std = check_float("noise_std", noise_std, min=0.0, fix="pass a noise scale >= 0, e.g. 1e-3")
        self.tau = check_float("tau", tau, min=0.0, fix="pass a decay >= 0 of the old Fisher, e.g. 1e-5")
        self.every_n_steps = check_int("every_n_steps", every_n_steps, min=1, fix="pass 1 to unlearn before every update")
        self.unlearn_steps = check_int("unlearn_steps", unlearn_steps, min=1, fix="pass the unlearn steps per batch, e.g. 1")
        self.fisher_samples = check_int("fisher_samples", fisher_samples, min=0,
                                        fix="pass the samples per task for the Fisher, or 0 to keep F = 0")
        self.fisher_batch_size = check_int("fisher_batch_size", fisher_batch_size, min=1, fix="e.g. 64")
        self.seed = check_int("seed", seed)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"`loss_fn` must be a callable loss_fn(pl_module, batch) -> Tensor or None, got {loss_fn!r}.")
        self.loss_fn = loss_fn
        self.model_forward = ModelForward(forward_fn, owner="RefreshLearning")
        self.forward_fn = forward_fn
        self._first_batch_checked = False
        self.fields = BatchFields(input_key, target_key, owner="RefreshLearning", stream=stream)
        #: How the training set's own (one-stream) batches are read for the Fisher.
        self.dataset_fields = BatchFields(input_key, target_key, owner="RefreshLearning")
        self.input_key, self.target_key, self.stream = input_key, target_key, stream
        self._warned_resolution = False
        #: name → Fisher diagonal (CPU, float32); empty while F = 0.
        self.fisher: dict[str, Tensor] = {}
        self.fisher_estimates = 0
        self._fisher_device: dict[str, Tensor] = {}
        #: name → parameter: the layout the Fisher's local shards have (sharded models).
        self._layout: dict[str, Tensor] = {}
        #: The Fisher holds full tensors (loaded from a checkpoint), not yet cut to this rank's shards.
        self._fisher_full = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            delta=self.delta, damping=self.damping, noise_std=self.noise_std, tau=self.tau, seed=self.seed
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fisher_device"] = {}
        state["_layout"] = {}
        return state

    # ------------------------------------------------------------------ the unlearn step
    def unlearn_batch(self, batch: Any) -> Any:
        """What :func:`unlearn_step` receives: ``(x, y)`` of the loader's batch, or the batch itself
        when ``loss_fn`` is given."""
        if self.loss_fn is not None:
            return batch
        return self._inputs_and_labels(
            batch, "RefreshLearning unlearns with the cross-entropy of the model's logits against the batch's "
            "labels; for a batch without them pass `loss_fn=` (a function loss_fn(pl_module, batch) -> scalar loss)."
        )

    def _inputs_and_labels(self, batch: Any, hint: str, fields: Optional[BatchFields] = None) -> tuple[Tensor, Tensor]:
        try:
            split = (fields or self.fields).split(batch)
        except (KeyError, TypeError) as error:
            raise type(error)(f"{error.args[0] if error.args else error} {hint}") from error
        return split.input, split.target  # type: ignore[return-value]

    def _loss(self, model: nn.Module, batch: Any) -> Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(model, batch)
        x, y = batch
        return nn.functional.cross_entropy(self.model_forward(model, x).float(), y)

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._first_batch_checked = False
        if stage == "fit" and (self.loss_fn is None or self.fisher_samples > 0):
            self.model_forward.check(pl_module)

    def _check_first_batch(self, trainer: "pl.Trainer", batch: Any) -> None:
        """What the task end's Fisher needs, checked on the first batch instead of after the task."""
        self._first_batch_checked = True
        RefreshLearning.unlearn_batch(self, batch)  # the unlearn step's own message first
        if self.fisher_samples == 0:
            return
        # The Fisher reads the training set's own (one-stream) batches: check one of those.
        dataset, collate = self.fisher_dataset(trainer, self.current_task(trainer))
        if len(dataset):
            self.unlearn_batch_fields((collate or default_collate)([dataset[0]]))

    def _watch_layout(self, pl_module: "pl.LightningModule") -> None:
        """Remember the parameters whose layout the Fisher's shards have; cut a loaded (full) Fisher."""
        reshard(pl_module)
        self._layout = {name: p for name, p in pl_module.named_parameters() if p.requires_grad}
        if self._fisher_full and self.fisher:
            self.fisher = {name: shard_like(value, self._layout[name]).clone() if name in self._layout
                           and is_sharded(self._layout[name]) else value for name, value in self.fisher.items()}
            self._fisher_device = {}
        self._fisher_full = False

    def _fisher_on(self, device: torch.device) -> Optional[dict[str, Tensor]]:
        if not self.fisher:
            return None
        first = next(iter(self._fisher_device.values()), None)
        if len(self._fisher_device) != len(self.fisher) or first is None or first.device != device:
            self._fisher_device = {name: value.to(device) for name, value in self.fisher.items()}
        return self._fisher_device

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if not self._first_batch_checked:
            self._check_first_batch(trainer, batch)
            self._watch_layout(pl_module)
        if self.optimizer_steps % self.every_n_steps != 0 or self.delta == 0.0:
            return
        target = self.unlearn_batch(batch)
        fisher = self._fisher_on(pl_module.device)
        task = self.current_task(trainer)
        applied = intended = lost = None
        for j in range(self.unlearn_steps):
            # Seeded by the task as well as the step: with one fit per task, `global_step` restarts
            # at 0 in every fit and the noise of every task would repeat the first task's.
            generator = rank_generator(self.seed, _NOISE_SALT, task, trainer.global_step, batch_idx, j)
            with forward_context(trainer):
                moved = unlearn_step(
                    pl_module, target, fisher, delta=self.delta, damping=self.damping, noise_std=self.noise_std,
                    generator=generator, loss_fn=self._loss,
                    strategy=trainer.strategy,
                )
            applied = dict(moved) if applied is None else {name: applied[name] + value for name, value in moved.items()}
            intended = moved.intended_norm if intended is None else _total_norm([intended, moved.intended_norm])
            lost = moved.lost_norm if lost is None else _total_norm([lost, moved.lost_norm])
        if applied:
            norm = _norm_of(applied, moved.like)
            pl_module.log("refresh/displacement", norm, on_step=True, on_epoch=False)
            pl_module.log("refresh/intended_displacement", intended, on_step=True, on_epoch=False)
            if not self._warned_resolution and any(v.dtype in _HALF for v in applied.values()):
                self._check_representable(pl_module, norm, intended, lost)

    def _check_representable(self, pl_module: "pl.LightningModule", applied: Tensor, intended: Tensor,
                             lost: Tensor) -> None:
        """Warn (once) when rounding to the parameters' half-precision dtype lost most of the step."""
        if float(lost) <= 0.5 * float(intended):
            return
        self._warned_resolution = True
        dtypes = sorted({str(p.dtype).replace("torch.", "") for p in pl_module.parameters() if p.requires_grad})
        rank_zero_warn(
            f"RefreshLearning: the unlearn step is below the resolution of the parameters ({', '.join(dtypes)}): "
            f"it meant to move them by {float(intended):.3g} (norm) but rounding to their dtype kept "
            f"{float(applied):.3g} (the part lost has norm {float(lost):.3g}), so most of the step is not made. Fix: train with float32 master weights "
            "(`precision='bf16-mixed'` or `'16-mixed'` instead of `'bf16-true'`/`'16-true'`), or raise `delta` "
            "(bfloat16 resolves relative changes of about 4e-3, float16 about 5e-4). `refresh/displacement` "
            "logs the applied step, `refresh/intended_displacement` the intended one.",
            category=UserWarning,
        )

    # ------------------------------------------------------------------ the Fisher
    def update_fisher(self, new: Mapping[str, Tensor]) -> None:
        """``F ← τ·F + F_new`` (F = ``new`` when no Fisher was estimated yet)."""
        new = {name: local_view(value).detach().float().cpu() for name, value in new.items()}
        if self.fisher:
            new = {name: self.tau * self.fisher[name] + value if name in self.fisher else value
                   for name, value in new.items()}
        self.fisher = new
        self._fisher_device = {}
        self.fisher_estimates += 1

    def fisher_dataset(self, trainer: "pl.Trainer", task: int) -> tuple[Any, Any]:
        """The finished task's training set and the collate function of its loader."""
        datamodule = task_schedule(trainer)
        if datamodule is not None:
            return datamodule.train_dataset(task), None
        loader = trainer.train_dataloader
        if isinstance(loader, Mapping):
            loader = loader[self.stream]
        elif isinstance(loader, (list, tuple)):
            loader = loader[self.stream if isinstance(self.stream, int) else 0]
        dataset = getattr(loader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__len__"):
            raise RuntimeError(
                "RefreshLearning estimates the Fisher on the finished task's training set, but the train "
                f"loader ({type(loader).__name__}) has no sized `dataset`. Fix: use a DataLoader over a map-style "
                "dataset, or pass `fisher_samples=0` to keep F = 0."
            )
        return dataset, getattr(loader, "collate_fn", None)

    def estimate_fisher(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> dict[str, Tensor]:
        """The Fisher of ``pl_module`` on ``fisher_samples`` samples of ``task`` (all ranks' mean)."""
        dataset, collate = self.fisher_dataset(trainer, task)
        n = min(len(dataset), self.fisher_samples)
        order = torch.randperm(len(dataset), generator=rank_generator(self.seed, _FISHER_SALT, task))[:n]
        world, rank = int(trainer.world_size), int(trainer.global_rank)
        sharded = is_sharded(pl_module)
        # Sharded: every rank passes every sample (fisher_diagonal's per-sample backward through
        # FSDP2 averages the ranks' gradients, equal when the samples are); DDP: the ranks split them.
        local = order.tolist() if sharded else order[rank::world].tolist()
        kwargs = {"collate_fn": collate} if collate is not None else {}
        loader = DataLoader(Subset(dataset, local), batch_size=self.fisher_batch_size, shuffle=False, **kwargs)
        batches = (self.unlearn_batch_fields(batch) for batch in loader)
        device = pl_module.device
        if local:
            model, prefix = self.model_forward.as_module(pl_module)
            with torch.inference_mode(False), torch.enable_grad(), forward_context(trainer):
                fisher = fisher_diagonal(model, batches, progress=trainer.is_global_zero)
            fisher = {name[len(prefix):]: value for name, value in fisher.items()}
        else:  # more ranks than samples
            fisher = {name: torch.zeros_like(p) for name, p in pl_module.named_parameters() if p.requires_grad}
        if world > 1 and not sharded:
            sums = {name: value.float() * len(local) for name, value in fisher.items()}
            sums["__count__"] = torch.tensor([float(len(local))], device=device)
            flat = {dtype: trainer.strategy.reduce(v.clone(), reduce_op="sum") for dtype, v in flatten_tensors(sums).items()}
            summed = unflatten_tensors(flat, sums)
            count = summed.pop("__count__")
            fisher = {name: value / count for name, value in summed.items()}
        return fisher

    def unlearn_batch_fields(self, batch: Any) -> tuple[Tensor, Tensor]:
        """``(x, y)`` of a batch of the training set, on the model's device later."""
        # The training set's batches are one-stream batches, whatever `stream` says of the step's.
        return self._inputs_and_labels(
            batch, "RefreshLearning's Fisher needs the inputs and class labels of the training set; pass "
            "`input_key=`/`target_key=`, or `fisher_samples=0` to keep F = 0.", self.dataset_fields,
        )

    @override
    def on_task_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        if self.fisher_samples == 0:
            return
        self._watch_layout(pl_module)
        self.update_fisher(self.estimate_fisher(trainer, pl_module, task))

    # ------------------------------------------------------------------ state
    @override
    def method_state(self) -> dict[str, Any]:
        # Sharded: the Fisher's local shards gathered to full tensors (a collective on every rank).
        fisher = {name: value.clone() if self._fisher_full else
                  full_tensor(value, like=self._layout.get(name)).detach().cpu().clone() for name, value in self.fisher.items()}
        return {
            "fisher": fisher,
            "fisher_estimates": int(self.fisher_estimates),
            "optimizer_steps": int(self.optimizer_steps),
        }

    @override
    def load_method_state(self, state: dict[str, Any]) -> None:
        self.fisher = {name: value.detach().float().cpu().clone() for name, value in state["fisher"].items()}
        self.fisher_estimates = int(state["fisher_estimates"])
        self.optimizer_steps = int(state["optimizer_steps"])
        self._fisher_device = {}
        self._fisher_full = True  # cut to this rank's shards at the first batch (sharded models)
