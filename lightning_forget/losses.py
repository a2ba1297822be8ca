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

Both run in registration order. The hooks wrap the module's ``training_step`` on the instance
(the class is untouched) and are removed with :func:`remove_training_step_hooks` at teardown.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Optional

import torch
from torch import Tensor

import lightning.pytorch as pl

__all__ = [
    "TrainingStepHooks",
    "training_step_hooks",
    "remove_training_step_hooks",
    "output_loss",
    "replace_output_loss",
]

BatchTransform = Callable[["pl.LightningModule", Any, int], Any]
LossTerm = Callable[["pl.LightningModule", Any, int, Any], Optional[Tensor]]

_ATTR = "_lightning_forget_step_hooks"


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


class TrainingStepHooks:
    """The registry of batch transforms and loss terms of one LightningModule.

    It replaces ``pl_module.training_step`` on the instance by itself (it is callable with the
    same signature) and calls the original in between its transforms and terms.
    """

    def __init__(self, pl_module: "pl.LightningModule") -> None:
        self.module = pl_module
        self.original = pl_module.training_step
        # Lightning's `is_overridden` follows `__wrapped__` to the user's method.
        self.__wrapped__ = self.original
        self.transforms: "OrderedDict[str, BatchTransform]" = OrderedDict()
        self.terms: "OrderedDict[str, LossTerm]" = OrderedDict()

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

    def __call__(self, batch: Any, batch_idx: int = 0, *args: Any, **kwargs: Any) -> Any:
        for fn in self.transforms.values():
            batch = fn(self.module, batch, batch_idx)
        output = self.original(batch, batch_idx, *args, **kwargs)
        if not self.terms:
            return output
        loss = output_loss(output)
        if loss is None:
            raise TypeError(
                f"{type(self.module).__name__}.training_step returned {type(output).__name__}, but a "
                f"callback adds loss terms ({', '.join(self.terms)}) and needs the step's loss: "
                "return the loss tensor or a dict with a 'loss' key. Manual optimization is not "
                "supported by loss-term callbacks."
            )
        for fn in self.terms.values():
            term = fn(self.module, batch, batch_idx, output)
            if term is not None:
                loss = loss + term
        return replace_output_loss(output, loss)


def training_step_hooks(pl_module: "pl.LightningModule") -> TrainingStepHooks:
    """The hook registry of ``pl_module``, installed on first use."""
    hooks = pl_module.__dict__.get(_ATTR)
    if hooks is None:
        hooks = TrainingStepHooks(pl_module)
        pl_module.__dict__[_ATTR] = hooks
        pl_module.training_step = hooks  # type: ignore[method-assign]
    return hooks


def remove_training_step_hooks(pl_module: "pl.LightningModule", name: str) -> None:
    """Remove ``name``; when nothing is left, give the module its own ``training_step`` back."""
    hooks = pl_module.__dict__.get(_ATTR)
    if hooks is None:
        return
    hooks.remove(name)
    if not hooks.transforms and not hooks.terms:
        del pl_module.__dict__[_ATTR]
        pl_module.__dict__.pop("training_step", None)


def cross_entropy_on(pl_module: "pl.LightningModule", x: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy of ``pl_module(x)`` against ``y`` (a helper for loss terms)."""
    return torch.nn.functional.cross_entropy(pl_module(x), y)
