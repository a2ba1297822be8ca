"""Loss terms and batch edits that callbacks contribute inside the training step.

Under DDP, Lightning calls ``training_step`` inside the ``DistributedDataParallel`` forward. Any
forward pass a method needs (replay logits, consistency terms, ...) must happen there too, and
its loss must be part of the one tensor Lightning calls ``backward`` on, so that DDP reduces all
gradients exactly once. Callbacks therefore never call ``backward`` themselves and never write
into a shared ``loss`` attribute; they register with :func:`training_step_hooks`:

- a **batch transform** ``fn(pl_module, batch, batch_idx) -> batch`` runs before the user's
  ``training_step`` sees the batch (replay joins buffer samples here);
- a **loss term** ``fn(pl_module, batch, batch_idx, output) -> Tensor | None`` runs after it, and
  its value is added to the step's loss (``output`` is what ``training_step`` returned; ``batch``
  is the batch the user's step saw).

How several callbacks compose
-----------------------------
- **Order.** Transforms run in registration order, which is the order of the callbacks'
  ``setup`` calls, i.e. their order in ``Trainer(callbacks=[...])``; then the user's step; then
  the loss terms, in registration order. Each transform receives the batch as the transforms
  before it left it, so the user's step and every loss term see the batch after *all*
  transforms.
- **Rows.** A transform may only *append* rows to the batch (or leave it unchanged): the rows
  the loader produced stay first and in order, so ``batch[:context.stream_size]`` is always the
  loader's batch. A transform that adds rows records them in the step's :class:`StepContext`
  (:meth:`StepContext.add_replay`).
- **After the step.** Lightning hands the *loader's* batch (before any transform) to
  ``on_train_batch_end``; callbacks that store samples there store the stream rows only, and
  read per-row outputs of the step through ``[:context.stream_size]``.

The per-step context
--------------------
:func:`step_context` returns the :class:`StepContext` of the current (or last) step: which rows of
the batch the user's step saw are replayed, from which callback and stream, with their stored
fields and task ids when the buffer keeps them. It is created at the start of each step and kept
until the next one, so ``on_train_batch_end`` hooks of any callback can read it.

What the wrapped step accepts
-----------------------------
A ``training_step(self, batch)`` without ``batch_idx`` is called without it (as Lightning does). A
step that returns ``None`` (Lightning's "skip this batch") is returned as is: loss terms are not
computed for it, and :attr:`StepContext.skipped` is set, so callbacks do not store its samples.

Manual optimization (``automatic_optimization=False``): the user's step calls
``manual_backward`` itself, so terms added to what it returns would change nothing. Such a step
must add the terms itself, before its backward, with :func:`add_loss_terms`::

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = add_loss_terms(self, self.compute_loss(batch), batch, batch_idx)
        opt.zero_grad(); self.manual_backward(loss); opt.step()

A manual step that does not call it while terms are registered raises a ``RuntimeError`` at its
first step (never silently trains without the terms).

The hooks wrap the module's ``training_step`` on the instance (the class is untouched; an instance
``training_step`` the user set before is kept and restored) and are removed with
:func:`remove_training_step_hooks` at teardown. A ``copy.deepcopy`` or pickle of the module does
not carry the hooks (nor the callbacks and buffers behind them): the copy gets the module's own
``training_step``.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import Tensor

from lightning_forget.validation import message

import lightning.pytorch as pl

__all__ = [
    "CopySafeHook",
    "ReplaySegment",
    "StepContext",
    "TrainingStepHooks",
    "add_loss_terms",
    "hidden_consistency_loss",
    "output_loss",
    "remove_training_step_hooks",
    "replace_output_loss",
    "step_context",
    "training_step_hooks",
]

BatchTransform = Callable[["pl.LightningModule", Any, int], Any]
LossTerm = Callable[["pl.LightningModule", Any, int, Any], Optional[Tensor]]


@dataclass
class ReplaySegment:
    """Rows a transform appended to the batch: ``rows`` ``[start, stop)`` of its stream.

    Attributes:
        source: the name the transform was registered under (the callback's ``state_key``).
        start: first row (in the stream's sub-batch as the user's step saw it).
        stop: one past the last row.
        fields: the stored fields of those rows, as drawn from the buffer (by buffer field name).
        task_ids: the task each row was stored in, when the buffer keeps it, else ``None``.
        stream: the stream of a two-stream batch the rows were joined to (``None``: one stream).
    """

    source: str
    start: int
    stop: int
    fields: dict[str, Tensor] = field(default_factory=dict)
    task_ids: Optional[Tensor] = None
    stream: Union[str, int, None] = None

    @property
    def rows(self) -> Tensor:
        return torch.arange(self.start, self.stop)


@dataclass
class StepContext:
    """What the batch transforms did to this step's batch (see the module docstring).

    Attributes:
        batch_idx: the step's batch index.
        stream_size: rows the loader produced, per stream (key ``None`` for a one-stream batch).
        segments: replayed rows, one :class:`ReplaySegment` per transform that added rows.
        skipped: the user's step returned ``None`` (Lightning skipped the batch).
        stored_forward: while a callback runs a forward of stored samples outside the user's
            step (DER++'s replay forwards in its loss term), the rows of that forward (``start``
            0, their fields and task ids); ``None`` otherwise. Set with :meth:`forward_of_stored`.
        joined_forward: while the module's forward runs with stored rows a callback appended to
            its input only (not to the batch the user's step sees: DER++'s buffer draws joined to
            the step's one forward when AdaB²N is present), those rows, in order after the
            step's own rows (``start`` counted from 0 within the appended rows); empty otherwise.
    """

    batch_idx: int = 0
    stream_size: dict[Union[str, int, None], int] = field(default_factory=dict)
    segments: list[ReplaySegment] = field(default_factory=list)
    skipped: bool = False
    stored_forward: Optional[ReplaySegment] = None
    joined_forward: list[ReplaySegment] = field(default_factory=list)

    @contextmanager
    def forward_of_stored(
        self, source: str, rows: int, fields: Optional[dict[str, Tensor]] = None, task_ids: Optional[Tensor] = None
    ) -> Iterator[ReplaySegment]:
        """Mark the forwards run inside the ``with`` block as forwards of ``rows`` stored samples
        (so that layers needing per-row information, such as AdaB²N's task ids, can find it)."""
        previous = self.stored_forward
        self.stored_forward = ReplaySegment(source, 0, int(rows), dict(fields or {}), task_ids)
        try:
            yield self.stored_forward
        finally:
            self.stored_forward = previous

    def loader_size(self, stream: Union[str, int, None] = None) -> Optional[int]:
        """Rows the loader produced in ``stream`` (``None`` when no transform recorded it)."""
        return self.stream_size.get(stream)

    def add_replay(
        self,
        source: str,
        stream_size: int,
        added: int,
        fields: Optional[dict[str, Tensor]] = None,
        task_ids: Optional[Tensor] = None,
        stream: Union[str, int, None] = None,
    ) -> ReplaySegment:
        """Record that ``source`` appended ``added`` rows to a sub-batch of ``stream_size`` rows.

        ``stream_size`` is the size of the sub-batch the transform received; the first call for
        a stream fixes the loader's size of that stream.
        """
        self.stream_size.setdefault(stream, stream_size - sum(
            s.stop - s.start for s in self.segments if s.stream == stream))
        segment = ReplaySegment(source, stream_size, stream_size + added, dict(fields or {}), task_ids, stream)
        self.segments.append(segment)
        return segment

    def replay_rows(self, stream: Union[str, int, None] = None) -> Tensor:
        """Indices of the replayed rows of ``stream`` in the batch the user's step saw."""
        rows = [s.rows for s in self.segments if s.stream == stream]
        return torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)

    def is_replay(self, num_rows: int, stream: Union[str, int, None] = None) -> Tensor:
        """A boolean mask over ``num_rows`` rows: ``True`` where the row is replayed."""
        mask = torch.zeros(num_rows, dtype=torch.bool)
        mask[self.replay_rows(stream)] = True
        return mask

    def replay_task_ids(self, stream: Union[str, int, None] = None) -> Optional[Tensor]:
        """Task ids of the replayed rows (in row order), or ``None`` when a buffer keeps none."""
        segments = [s for s in self.segments if s.stream == stream]
        if not segments or any(s.task_ids is None for s in segments):
            return None
        return torch.cat([s.task_ids.cpu() for s in segments])  # type: ignore[union-attr]


class CopySafeHook:
    """A module (forward or pre-forward) hook that calls ``fn``; a ``copy.deepcopy`` or pickle of
    the module gets a no-op instead (a copy is a model, not a second trainee of the callback)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        return _no_hook

    def __reduce__(self) -> Any:
        return (_no_hook_factory, ())


def _no_hook(*args: Any) -> None:
    return None


def _no_hook_factory() -> Any:
    return _no_hook


def output_loss(output: Any) -> Optional[Tensor]:
    """The loss tensor in what ``training_step`` returned (a tensor, or a dict with ``"loss"``)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict):
        return output.get("loss")
    return None


def replace_output_loss(output: Any, loss: Tensor) -> Any:
    """``output`` with its loss replaced by ``loss`` (same structure as returned)."""
    if isinstance(output, Tensor):
        return loss
    if isinstance(output, dict):
        new = dict(output)
        new["loss"] = loss
        return new
    raise TypeError(  # pragma: no cover - guarded by the caller
        f"training_step returned {type(output).__name__}; expected a Tensor or a dict with 'loss'."
    )


def _takes_batch_idx(fn: Callable[..., Any]) -> bool:
    """Whether ``fn(batch, batch_idx)`` is a valid call (Lightning's own rule for training_step)."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins, odd callables: assume the usual signature
        return True
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return True
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.name == "batch_idx" for p in parameters)


class TrainingStepHooks:
    """The registry of batch transforms and loss terms of one LightningModule.

    It replaces ``pl_module.training_step`` on the instance by itself (it is callable with the
    same signature) and calls the original in between its transforms and terms. It is the only
    thing it adds to the module's ``__dict__``; a deep copy or pickle of the module gets the
    module's own ``training_step`` instead (see :meth:`__deepcopy__`).
    """

    def __init__(self, pl_module: "pl.LightningModule") -> None:
        self.module = pl_module
        #: what ``training_step`` was in the instance ``__dict__`` before (``None``: the class's).
        self.instance_step = pl_module.__dict__.get("training_step")
        self.original = pl_module.training_step
        # Lightning's `is_overridden` follows `__wrapped__` to the user's method.
        self.__wrapped__ = self.original
        self.transforms: "OrderedDict[str, BatchTransform]" = OrderedDict()
        self.terms: "OrderedDict[str, LossTerm]" = OrderedDict()
        self.context = StepContext()
        self._terms_applied = False
        self._step_batch: Optional[tuple[Any, int]] = None

    # ------------------------------------------------------------------ registration
    def add_batch_transform(self, name: str, fn: BatchTransform) -> None:
        """Register ``fn`` under ``name`` (replacing an earlier one of the same name)."""
        self.transforms[name] = fn

    def add_loss_term(self, name: str, fn: LossTerm) -> None:
        """Register ``fn`` under ``name`` (replacing an earlier one of the same name)."""
        self.terms[name] = fn

    def remove(self, name: str) -> None:
        """Forget the transform and/or term registered under ``name``."""
        self.transforms.pop(name, None)
        self.terms.pop(name, None)

    @property
    def is_empty(self) -> bool:
        return not self.transforms and not self.terms

    # ------------------------------------------------------------------ copies
    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        # A copy of the module (a teacher, an EMA, a snapshot) is a model, not a second trainee:
        # it gets the module's own training_step, not the callbacks (and their buffers).
        import copy

        if self.instance_step is not None:
            return copy.deepcopy(self.instance_step, memo)
        new_module = memo.get(id(self.module))
        if new_module is None:  # the registry copied on its own: copy the original step
            return copy.deepcopy(self.original, memo)
        return type(self.module).training_step.__get__(new_module)

    def __reduce__(self) -> Any:
        # Pickling the module (ddp_spawn, torch.save of a whole module) leaves the hooks behind.
        if self.instance_step is not None:
            return (_identity, (self.instance_step,))
        return (_class_step, (self.module,))

    # ------------------------------------------------------------------ the step
    def apply_terms(self, batch: Any, batch_idx: int, output: Any, loss: Tensor) -> Tensor:
        """``loss`` plus every registered term (each gets ``output``, what the step returned)."""
        self._terms_applied = True
        for fn in self.terms.values():
            term = fn(self.module, batch, batch_idx, output)
            if term is not None:
                loss = loss + term
        return loss

    def __call__(self, batch: Any, batch_idx: int = 0, *args: Any, **kwargs: Any) -> Any:
        self.context = StepContext(batch_idx=batch_idx)
        for fn in self.transforms.values():
            batch = fn(self.module, batch, batch_idx)
        self._step_batch = (batch, batch_idx)
        self._terms_applied = False
        if _takes_batch_idx(self.original):
            output = self.original(batch, batch_idx, *args, **kwargs)
        else:
            output = self.original(batch, *args, **kwargs)
        self._step_batch = None
        if output is None:  # Lightning's "skip this batch"
            self.context.skipped = True
            return None
        if not self.terms:
            return output
        if not getattr(self.module, "automatic_optimization", True):
            if not self._terms_applied:
                raise RuntimeError(
                    f"{type(self.module).__name__} uses manual optimization "
                    "(`automatic_optimization=False`) and its training_step ran its own backward, so the "
                    f"loss terms of {', '.join(self.terms)} would change nothing. Fix: add them before "
                    "`manual_backward` with `loss = lightning_forget.losses.add_loss_terms(self, loss, "
                    "batch, batch_idx)`, or use automatic optimization."
                )
            return output
        loss = output_loss(output)
        if loss is None:
            raise TypeError(
                f"{type(self.module).__name__}.training_step returned {type(output).__name__}, but a "
                f"callback adds loss terms ({', '.join(self.terms)}) and needs the step's loss: "
                "return the loss tensor, a dict with a 'loss' key, or None to skip the batch."
            )
        return replace_output_loss(output, self.apply_terms(batch, batch_idx, output, loss))


def _identity(value: Any) -> Any:
    return value


def _class_step(module: "pl.LightningModule") -> Any:
    return type(module).training_step.__get__(module)


def _installed(pl_module: "pl.LightningModule") -> Optional[TrainingStepHooks]:
    hooks = pl_module.__dict__.get("training_step")
    return hooks if isinstance(hooks, TrainingStepHooks) else None


def training_step_hooks(pl_module: "pl.LightningModule") -> TrainingStepHooks:
    """The hook registry of ``pl_module``, installed on first use."""
    hooks = _installed(pl_module)
    if hooks is None:
        hooks = TrainingStepHooks(pl_module)
        pl_module.__dict__["training_step"] = hooks
    return hooks


def remove_training_step_hooks(pl_module: "pl.LightningModule", name: str) -> None:
    """Remove ``name``; when nothing is left, give the module its own ``training_step`` back
    (the instance attribute the user had set before, or the class's method)."""
    hooks = _installed(pl_module)
    if hooks is None:
        return
    hooks.remove(name)
    if hooks.is_empty:
        if hooks.instance_step is not None:
            pl_module.__dict__["training_step"] = hooks.instance_step
        else:
            del pl_module.__dict__["training_step"]


def step_context(pl_module: "pl.LightningModule") -> StepContext:
    """The :class:`StepContext` of the current (or last) training step of ``pl_module``.

    An empty context (no replayed rows) when no callback registered hooks.
    """
    hooks = _installed(pl_module)
    return hooks.context if hooks is not None else StepContext()


def add_loss_terms(pl_module: "pl.LightningModule", loss: Tensor, batch: Any = None, batch_idx: Optional[int] = None) -> Tensor:
    """``loss`` plus the registered loss terms: for ``training_step``s with manual optimization.

    Call it before ``manual_backward``. ``batch``/``batch_idx`` default to the step's own (after
    the batch transforms). Under automatic optimization the terms are added for you: do not call it.

    Raises:
        RuntimeError: called under automatic optimization, or outside a training step.
    """
    hooks = _installed(pl_module)
    if hooks is None or not hooks.terms:
        return loss
    if getattr(pl_module, "automatic_optimization", True):
        raise RuntimeError(
            "add_loss_terms is for training steps with manual optimization; under automatic "
            "optimization the loss terms are added to what training_step returns. Fix: remove the call."
        )
    step = getattr(hooks, "_step_batch", None)
    if step is None:
        raise RuntimeError("add_loss_terms must be called inside the module's training_step.")
    batch = step[0] if batch is None else batch
    batch_idx = step[1] if batch_idx is None else batch_idx
    return hooks.apply_terms(batch, batch_idx, {"loss": loss}, loss)


def cross_entropy_on(pl_module: "pl.LightningModule", x: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy of ``pl_module(x)`` against ``y`` (a helper for loss terms)."""
    return torch.nn.functional.cross_entropy(pl_module(x), y)


def hidden_consistency_loss(
    fast: "list[Tensor] | tuple[Tensor, ...]",
    slow: "list[Tensor] | tuple[Tensor, ...]",
    mask: Optional[Tensor] = None,
    layers: Optional[list[int]] = None,
) -> Tensor:
    """One-sided hidden-state consistency: the mean of ``ReLU(h_slow - h_fast)²`` over layers and elements.

    The target of each activation is ``max(h_fast, h_slow)`` (the slow learner's value only where
    it is larger), so only activations where the fast learner falls *below* the slow one are
    penalised; the squared error to that target is ``ReLU(h_slow - h_fast)²``. The slow states
    are detached. Computed in float32.

    Args:
        fast: per-layer ``(B, L, H)`` (or ``(B, N, H)``) hidden states of the trained learner.
        slow: the same layers of the reference learner.
        mask: ``(B, L)`` with 1 (or ``True``) at real positions; padded positions are left out of
            the mean. ``None``: every position counts.
        layers: indices into ``fast``/``slow`` (negative allowed) of the layers to use; ``None``:
            all of them.

    Returns:
        A scalar: the sum of squared violations over the chosen layers and real positions,
        divided by (layers × real positions × hidden size); 0 when no position is real.

    Raises:
        ValueError: ``fast`` and ``slow`` differ in length or shapes, or ``layers`` indexes past them.
    """
    if len(fast) != len(slow):
        raise ValueError(f"`fast` has {len(fast)} layers but `slow` has {len(slow)}; pass the same layers of both.")
    chosen = list(range(len(fast))) if layers is None else list(layers)
    bad = [i for i in chosen if not -len(fast) <= i < len(fast)]
    if bad or not chosen:
        raise ValueError(message("layers", f"indices of the {len(fast)} hidden-state layers (negative allowed)", layers,
                                 "e.g. layers=[-1] for the last one, or None for all"))
    total: Optional[Tensor] = None
    count = 0.0
    for i in chosen:
        h_fast, h_slow = fast[i].float(), slow[i].detach().float()
        if h_fast.shape != h_slow.shape:
            raise ValueError(f"Layer {i}: fast hidden states {tuple(h_fast.shape)} and slow {tuple(h_slow.shape)} differ.")
        violation = torch.relu(h_slow - h_fast).pow(2)
        if mask is not None:
            weight = mask.to(violation.device, torch.float32).reshape(*mask.shape, *([1] * (violation.dim() - mask.dim())))
            violation = violation * weight
            count += float(weight.sum()) * float(violation[0, 0].numel() if violation.dim() > 2 else 1)
        else:
            count += float(violation.numel())
        part = violation.sum()
        total = part if total is None else total + part
    assert total is not None
    return total / count if count > 0 else total * 0.0
