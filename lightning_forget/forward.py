"""One way for every callback to call the model's logits function.

Callbacks that run the model themselves (DER++'s replay forwards, refresh learning's unlearn
step and Fisher, k-FPF/FPF's fine-tuning, GS-LoRA's forgetting loss, the evaluations) call "the
logits function" of the user's LightningModule through one :class:`ModelForward`, built from the
same constructor argument in each of them, ``forward_fn``:

- ``None`` (default): the module's own ``forward`` (``pl_module(x)``). A module written without
  one (its ``training_step`` calls ``self.net(x)``, as the README's example module does) is
  refused in ``setup`` with an error that names ``forward_fn`` and lists the module's submodules.
- ``"net"`` (any dotted path, ``"backbone.classifier"``): that submodule, ``pl_module.net(x)``.
- ``"logits"``: a method of the module, ``pl_module.logits(x)``.

The function must map a batch of inputs to logits: a tensor, a dict or model output with
``logits``, or a tuple starting with them (:func:`~lightning_forget.batch.logits_of`).

Lightning is imported only to recognise ``LightningModule``'s own (unimplemented) ``forward``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import Tensor, nn

from lightning_forget.batch import logits_of
from lightning_forget.validation import check_str

__all__ = ["ModelForward", "has_own_forward"]


def has_own_forward(module: nn.Module) -> bool:
    """Whether ``module``'s class defines a ``forward`` (``nn.Module``'s and ``LightningModule``'s do not)."""
    base_forwards = {nn.Module.forward}
    try:
        import lightning.pytorch as pl

        base_forwards.add(pl.LightningModule.forward)
    except ImportError:  # pragma: no cover - lightning is a dependency
        pass
    return type(module).forward not in base_forwards


class _LogitsModule(nn.Module):
    """``forward(x)`` = the logits function of ``owner`` (the owner is its only child, ``owner``),
    so ``torch.func.functional_call`` on it sees the owner's parameters as ``owner.<name>``."""

    def __init__(self, owner: nn.Module, forward: "ModelForward") -> None:
        super().__init__()
        self.owner = owner
        self._forward = forward

    def forward(self, x: Any) -> Tensor:
        return self._forward(self.owner, x)


class ModelForward:
    """The logits function of a module, named once (see the module docstring).

    Args:
        forward_fn: ``None`` for the module's ``forward``; else the dotted path of a submodule
            or the name of a method of the module, called with the inputs.
        owner: the name of the class using it, for error messages.

    Raises:
        TypeError / ValueError: ``forward_fn`` is not ``None`` or a non-empty ``str``.
    """

    def __init__(self, forward_fn: Optional[str] = None, owner: str = "callback") -> None:
        self.forward_fn = check_str(
            "forward_fn", forward_fn, allow_none=True,
            fix="pass the name of the submodule or method that maps inputs to logits (e.g. forward_fn='net'), "
            "or None for the module's forward",
        )
        self.owner = owner

    def __repr__(self) -> str:
        return f"ModelForward(forward_fn={self.forward_fn!r})"

    def _submodules(self, module: nn.Module) -> list[str]:
        return [name for name, _ in module.named_children()]

    def _error(self, module: nn.Module, why: str) -> RuntimeError:
        children = self._submodules(module)
        example = f"forward_fn={children[0]!r}" if children else "forward_fn='<submodule>'"
        return RuntimeError(
            f"{self.owner} runs the model itself and needs its logits function, but {why}. Fix: give "
            f"{type(module).__name__} a `forward(x)` that returns the logits, or pass `{self.owner}(forward_fn=...)` "
            f"naming the submodule or method that does (its submodules: {children}; e.g. {example})."
        )

    def target(self, module: nn.Module) -> Callable[..., Any]:
        """The callable that maps inputs to logits.

        Raises:
            RuntimeError: the module has no ``forward`` and ``forward_fn`` is ``None``, or
                ``forward_fn`` names neither a submodule nor a method.
        """
        name = self.forward_fn
        if name is None:
            if not has_own_forward(module):
                raise self._error(module, f"{type(module).__name__} defines no `forward` (and `forward_fn` is None)")
            return module
        try:
            return module.get_submodule(name)
        except AttributeError:
            pass
        value = getattr(module, name, None) if "." not in name else None
        if callable(value) and not isinstance(value, type):
            return value
        raise self._error(module, f"`forward_fn`={name!r} names neither a submodule nor a method of "
                                  f"{type(module).__name__}")

    def check(self, module: nn.Module) -> None:
        """Resolve the logits function now (in ``setup``), so a module without one fails before training."""
        self.target(module)

    def hook_module(self, module: nn.Module) -> nn.Module:
        """The ``nn.Module`` whose forward computes the logits (for forward hooks).

        Raises:
            RuntimeError: as :meth:`target`, or ``forward_fn`` names a method (it has no hooks).
        """
        target = self.target(module)
        if not isinstance(target, nn.Module):
            raise RuntimeError(
                f"{self.owner} reads the logits from a forward hook, which a method (`forward_fn`="
                f"{self.forward_fn!r}) does not have. Fix: pass `forward_fn=` naming a submodule, or give "
                f"{type(module).__name__} a `forward(x)` that returns the logits."
            )
        return target

    def __call__(self, module: nn.Module, x: Any, **kwargs: Any) -> Tensor:
        """The logits of ``module`` for the inputs ``x`` (keyword arguments passed on, e.g. a causal
        LM's ``attention_mask``)."""
        return logits_of(self.target(module)(x, **kwargs))

    def as_module(self, module: nn.Module) -> tuple[nn.Module, str]:
        """``(model, prefix)``: an ``nn.Module`` whose ``forward(x)`` returns the logits, and the prefix
        its parameter names have before ``module``'s own names (``""`` when it is ``module``)."""
        if self.forward_fn is None:
            self.check(module)
            return module, ""
        return _LogitsModule(module, self), "owner."
