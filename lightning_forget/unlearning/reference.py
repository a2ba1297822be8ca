"""The frozen reference (teacher) model of an unlearning run, without a second copy where possible.

- The module carries PEFT LoRA adapters (``peft.inject_adapter_in_model``, ``get_peft_model``) and
  its base weights are frozen: the reference is **the same module with its adapters disabled**
  (no copy, no extra memory; exactly the base model's outputs).
- Otherwise: a frozen copy of the module's *weights* as they were when the reference was taken,
  run through the module's own forward (``torch.func.functional_call``), on the module's device
  or, with ``offload=True``, kept on the CPU and moved over for each reference forward.

Under FSDP2 (``ModelParallelStrategy``, a module sharded with ``fully_shard``) the frozen copy is
**this rank's local shards** of the weights (memory ≈ 1/world size): a reference forward swaps them
into the parameters' shards in place, runs the module (the sharded forward gathers them as it
gathers the live weights: a collective, so every rank runs the same reference forwards) and swaps
the live shards back before anything else runs. Adapters-disabled references need no copy here either.

The reference never changes: its parameters do not require gradients, it runs in eval mode
under ``torch.no_grad()``, and its weights go into the callback's checkpoint as CPU tensors
(:meth:`ReferenceModel.state`), so a resumed run rebuilds the same reference.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module  # what functional_call uses

from lightning_forget.sharding import edit_local, full_tensor, is_sharded, local_clone, reshard, shard_like

__all__ = ["ReferenceModel", "adapters_disabled", "has_lora_adapters", "load_pretrained", "local_shards_swapped", "tuner_layers"]


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


@contextmanager
def local_shards_swapped(module: nn.Module, layout: dict[str, Tensor], weights: dict[str, Tensor]) -> Iterator[None]:
    """``weights`` (local shards of ``layout``'s tensors, by name) written into the module's own shards, the live ones after.

    FSDP2 gathers every unit's weights from the local shards at its forward (and, for a unit
    resharded after its forward, again at its backward): a forward, or a forward and its
    backward, run inside the ``with`` block read ``weights``. Units that keep their gathered
    weights after a forward (``reshard_after_forward=False``) are resharded before and after, so
    the backward of the live step regathers the live weights. Names of ``layout`` missing from
    ``weights`` keep their live values. Used by :class:`ReferenceModel`'s sharded mode and by
    trainable weight sets kept as shards (SFD's fake score network).
    """
    reshard(module)
    names = [k for k in layout if k in weights]
    live = {k: local_clone(layout[k]) for k in names}
    try:
        for k in names:
            edit_local(layout[k], lambda now, ref: ref.to(now.device, now.dtype), weights[k])
        yield
    finally:
        reshard(module)
        for k in names:
            edit_local(layout[k], lambda _, value: value, live[k])


def _base_trainable(module: nn.Module) -> list[str]:
    adapter_ids = {id(p) for layer in tuner_layers(module) for name, p in layer.named_parameters()
                   if "lora_" in name or "adapter" in name}
    return [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in adapter_ids]


class ReferenceModel:
    """The frozen reference of ``module``: adapters disabled, or frozen weights run through the module itself.

    Without usable adapters the reference keeps a copy of the module's **weights** (parameters and
    buffers) as they were, and runs the module's own forward with them swapped in
    (``torch.func.functional_call``): no second module object is built, so whatever else the module
    holds (its trainer, optimizer factories, data) is never copied.

    Args:
        module: the model being unlearned (a LightningModule or any ``nn.Module``).
        offload: keep the reference weights on the CPU and move them to the module's device for each
            reference forward (ignored when the adapters are disabled instead).
        use_adapters: ``None`` (default) disables the adapters when the module has PEFT adapters
            and no trainable base weight; ``False`` always keeps frozen weights.
        state: weights of an earlier reference (from :meth:`state`) to use instead of the module's
            current ones (used on resume).

    Attributes:
        kind: ``"adapters_disabled"`` or ``"copy"``.

    Example::

        reference = ReferenceModel(model)
        teacher_logits = reference(x)      # no_grad, eval mode, the reference weights
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
        self.weights: Optional[dict[str, Tensor]] = None
        #: Whether the weights are this rank's local shards of a module sharded with FSDP2.
        self.sharded = self.kind == "copy" and is_sharded(module)
        self._layout: dict[str, Tensor] = {}
        if self.sharded:
            reshard(module)  # a root unit may hold its gathered weights since a forward: the shards instead
        if self.kind == "copy":
            current = dict(module.named_parameters())
            current.update(dict(module.named_buffers()))
            source = state if state is not None else current
            missing = sorted(set(current) - set(source))
            if missing:
                raise RuntimeError(f"ReferenceModel: the saved reference weights lack {missing[:5]}; the module changed.")
            device = torch.device("cpu") if self.offload else None
            if self.sharded:
                self._layout = current
                # the rank's shards: of the live weights, or cut from the whole saved ones
                self.weights = {k: local_clone(shard_like(source[k], current[k]) if state is not None else current[k],
                                               device=device) for k in current}
            else:
                self.weights = {k: source[k].detach().to(device or current[k].device, copy=True) for k in current}

    def state(self) -> Optional[dict[str, Tensor]]:
        """CPU copies of the reference's weights (``None`` when the adapters are disabled instead).

        Whole tensors: held as shards, they are gathered (a collective under FSDP2: every rank calls
        it, as at a checkpoint).
        """
        if self.weights is None:
            return None
        if self.sharded:
            return {k: full_tensor(v.to(self._layout[k].device), like=self._layout[k]).detach().cpu()
                    for k, v in self.weights.items()}
        return {k: v.detach().cpu().clone() for k, v in self.weights.items()}

    def _shards_swapped(self) -> Any:
        """The reference's local shards in the parameters' shards (and its buffers), the live ones after."""
        assert self.weights is not None
        return local_shards_swapped(self.module, self._layout, self.weights)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The reference's forward on ``args``/``kwargs``: eval mode, ``no_grad``, the module restored after.

        Called with one callable instead (``reference(lambda model: ...)``), it returns what the
        callable returns when given the module with the reference weights in place (adapters
        disabled, or the frozen weights substituted without touching the live ones), for a
        computation other than the forward (e.g. an inner layer's activations).
        """
        call = args[0] if len(args) == 1 and not kwargs and callable(args[0]) and not isinstance(args[0], Tensor) else None
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad():
                if self.kind == "adapters_disabled":
                    with adapters_disabled(self.module):
                        return call(self.module) if call is not None else self.module(*args, **kwargs)
                assert self.weights is not None
                if self.sharded:
                    with self._shards_swapped():
                        return call(self.module) if call is not None else self.module(*args, **kwargs)
                weights = self.weights
                if self.offload:
                    device = self.device()
                    weights = {k: v.to(device, non_blocking=True) for k, v in weights.items()}
                if call is not None:
                    with _reparametrize_module(self.module, weights, tie_weights=True, strict=True):
                        return call(self.module)
                return torch.func.functional_call(self.module, weights, args, kwargs, strict=True)
        finally:
            self.module.train(was_training)

    def device(self) -> torch.device:
        """Where the reference's inputs must be (the module's device)."""
        for p in self.module.parameters():
            return p.device
        return torch.device("cpu")
