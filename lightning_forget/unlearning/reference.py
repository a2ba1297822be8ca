"""The frozen reference (teacher) model of an unlearning run, without a second copy where possible.

- The module carries PEFT LoRA adapters (``peft.inject_adapter_in_model``, ``get_peft_model``) and
  its base weights are frozen: the reference is **the same module with its adapters disabled**
  (no copy, no extra memory; exactly the base model's outputs).
- Otherwise: a frozen deep copy of the module as it was when the reference was taken, on the
  module's device or, with ``offload=True``, on the CPU (inputs go to the CPU for its forward and
  the outputs come back), for models whose second copy does not fit on the accelerator.

The reference never changes: its parameters do not require gradients, it runs in eval mode
under ``torch.no_grad()``, and the copy's weights are kept as CPU tensors that a checkpoint can
carry (:meth:`ReferenceModel.state`), so a resumed run rebuilds the same reference.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn

__all__ = ["ReferenceModel", "adapters_disabled", "has_lora_adapters", "load_pretrained", "tuner_layers"]


def load_pretrained(module: nn.Module, path: str, owner: str) -> None:
    """Load the weights to unlearn (a Lightning checkpoint or a state dict at ``path``) into ``module``.

    Raises:
        ValueError: the file's parameter names do not match the module's (named as ``pretrained_ckpt``).
    """
    from lightning.pytorch.utilities import rank_zero_info

    from lightning_forget.callbacks.lines import load_weights

    state, _ = load_weights(str(path))
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{owner}: `pretrained_ckpt`={path!r} holds weights of another module (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}). Fix: build the module as the checkpoint's run did."
        )
    rank_zero_info(f"{owner}: loaded the weights to unlearn from {path}")


def tuner_layers(module: nn.Module) -> list[nn.Module]:
    """The PEFT tuner layers (LoRA and the like) inside ``module``; empty without PEFT."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return []
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def has_lora_adapters(module: nn.Module) -> bool:
    """Whether ``module`` carries PEFT adapter layers."""
    return bool(tuner_layers(module))


@contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[None]:
    """Run the ``with`` block with every PEFT adapter of ``module`` switched off (restored after).

    Only the layers' "disabled" flag is flipped: ``requires_grad`` flags are left alone (PEFT's
    ``enable_adapters`` would reset them, which a DDP-wrapped model must not see mid-step).
    """
    layers = tuner_layers(module)
    previous = [bool(getattr(layer, "_disable_adapters", False)) for layer in layers]
    try:
        for layer in layers:
            layer._disable_adapters = True  # PEFT's flag read by every tuner layer's forward
        yield
    finally:
        for layer, value in zip(layers, previous):
            layer._disable_adapters = value


def _base_trainable(module: nn.Module) -> list[str]:
    adapter_ids = {id(p) for layer in tuner_layers(module) for name, p in layer.named_parameters()
                   if "lora_" in name or "adapter" in name}
    return [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in adapter_ids]


class ReferenceModel:
    """The frozen reference of ``module``: adapters disabled, or a frozen copy (see the module docstring).

    Args:
        module: the model being unlearned (a LightningModule or any ``nn.Module``).
        offload: keep the copy on the CPU (ignored when adapters are disabled instead of copying).
        use_adapters: ``None`` (default) disables the adapters when the module has PEFT adapters
            and no trainable base weight; ``False`` always copies.
        state: weights of an earlier reference (from :meth:`state`) to rebuild instead of copying
            the module as it is now (used on resume).

    Attributes:
        kind: ``"adapters_disabled"`` or ``"copy"``.

    Example::

        reference = ReferenceModel(model)
        with torch.no_grad():
            teacher_logits = reference(lambda m: m(x))
    """

    def __init__(self, module: nn.Module, offload: bool = False, use_adapters: Optional[bool] = None,
                 state: Optional[dict[str, Tensor]] = None) -> None:
        self.module = module
        self.offload = bool(offload)
        adapters = has_lora_adapters(module) and not _base_trainable(module)
        if use_adapters is True and not adapters:
            raise RuntimeError(
                "ReferenceModel(use_adapters=True) needs a module with PEFT adapters and frozen base weights; "
                f"trainable base weights: {_base_trainable(module)[:5]}. Fix: freeze them, or use_adapters=None."
            )
        self.kind = "adapters_disabled" if adapters and use_adapters is not False else "copy"
        self.copy: Optional[nn.Module] = None
        self._state: Optional[dict[str, Tensor]] = None
        if self.kind == "copy":
            self._build_copy(state)

    def _build_copy(self, state: Optional[dict[str, Tensor]]) -> None:
        trainer = getattr(self.module, "_trainer", None)
        if trainer is not None:  # a LightningModule: do not deep-copy the trainer behind it
            self.module._trainer = None
        try:
            clone = copy.deepcopy(self.module)
        finally:
            if trainer is not None:
                self.module._trainer = trainer
        if state is not None:
            clone.load_state_dict(state)
        for p in clone.parameters():
            p.requires_grad_(False)
        clone.eval()
        if self.offload:
            clone.to("cpu")
        self.copy = clone
        self._state = {k: v.detach().cpu().clone() for k, v in clone.state_dict().items()}

    def state(self) -> Optional[dict[str, Tensor]]:
        """CPU copies of the reference's weights (``None`` when the adapters are disabled instead)."""
        return self._state

    def __call__(self, forward: Callable[[nn.Module], Any]) -> Any:
        """``forward(model)`` run on the reference, in eval mode, under ``no_grad``.

        ``forward`` gets the model to call (the module itself with adapters off, or the copy); with
        ``offload`` the caller's tensors are moved to the CPU by :meth:`inputs_to` and back.
        """
        with torch.no_grad():
            if self.kind == "adapters_disabled":
                was_training = self.module.training
                self.module.eval()
                try:
                    with adapters_disabled(self.module):
                        return forward(self.module)
                finally:
                    self.module.train(was_training)
            assert self.copy is not None
            return forward(self.copy)

    def device(self) -> torch.device:
        """Where the reference's inputs must be."""
        model = self.module if self.copy is None else self.copy
        for p in model.parameters():
            return p.device
        return torch.device("cpu")
