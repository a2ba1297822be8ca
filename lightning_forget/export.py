"""Get a plain model back: the weights of the user's own module, without the layers a method added.

:class:`~lightning_forget.callbacks.AdaB2N` replaces ``BatchNorm2d`` layers by
:class:`~lightning_forget.nn.AdaB2NBatchNorm2d` (extra task weights and counters);
:class:`~lightning_forget.callbacks.GSLoRA` puts PEFT LoRA layers around linears
(``fc1.weight`` becomes ``fc1.base_layer.weight`` beside ``fc1.lora_A.default.weight``);
:class:`~lightning_forget.callbacks.ILoRA` wraps the backbone in a ``PeftModel``
(``model.transformer...`` becomes ``model.base_model.model.transformer...``). A fresh copy of
the user's module then refuses the trained weights (``load_state_dict``: missing and unexpected
keys; ``MyModule.load_from_checkpoint``: the same).

:func:`export_plain_state_dict` gives the weights under the module's original names, computed
from the trained module without changing it:

- every AdaB²N layer as the ``BatchNorm2d`` it replaced (affine parameters and running
  statistics; the task weights and counters are dropped — in eval mode both layers compute the
  same function);
- every LoRA layer as its base layer with the active adapters merged, ``W + scale·B·A`` (for
  I-LoRA: the adapter the module holds now, i.e. the slow learner after a fit with
  ``inference_learner="slow"``);
- every ``PeftModel`` unwrapped (``base_model.model.`` dropped from the names).

:func:`export_plain_checkpoint` writes them as a checkpoint that ``MyModule.load_from_checkpoint``
reads.

A sharded strategy (``ModelParallelStrategy``: FSDP2) saves a checkpoint *folder* of per-rank
shards; :func:`consolidate_sharded_checkpoint` joins it in one process and
:func:`load_sharded_checkpoint` loads its weights into a plain module (docs/sharding.md).
"""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from lightning_forget.nn.adab2n import AdaB2NBatchNorm2d
from lightning_forget.validation import check_type

__all__ = [
    "consolidate_sharded_checkpoint",
    "export_plain_checkpoint",
    "export_plain_state_dict",
    "is_sharded_checkpoint",
    "load_sharded_checkpoint",
]

#: The file Lightning writes beside the ``.distcp`` shards of a distributed checkpoint (callback
#: states, loops, hyperparameters: everything but weights and optimizer states).
_SHARDED_METADATA = "meta.pt"


def is_sharded_checkpoint(path: Union[str, "os.PathLike[str]"]) -> bool:
    """Whether ``path`` is a distributed checkpoint folder (``ModelParallelStrategy``/FSDP)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ".metadata"))


def consolidate_sharded_checkpoint(path: Union[str, "os.PathLike[str]"]) -> dict[str, Any]:
    """A distributed (sharded) checkpoint folder as one plain checkpoint dict, in one process.

    ``ModelParallelStrategy`` (and ``FSDPStrategy(state_dict_type="sharded")``) save a folder:
    every rank's ``.distcp`` shards of the weights and optimizer states, plus ``meta.pt`` (callback
    states, loops, hyperparameters) from rank 0. This joins the shards with
    :func:`torch.distributed.checkpoint.format_utils.dcp_to_torch_save` (no process group; the
    whole checkpoint must fit in CPU memory) and adds ``meta.pt``: the result has the keys of a
    single-process checkpoint (``state_dict`` with full tensors under the module's own names,
    ``optimizer_0``..., ``callbacks``, ``loops``, ``hyper_parameters``).

    Raises:
        ValueError: ``path`` is not a distributed checkpoint folder.
    """
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder = os.fspath(path)
    if not is_sharded_checkpoint(folder):
        raise ValueError(f"`path`={folder!r} is not a distributed checkpoint folder (no `.metadata` inside). "
                         "Fix: pass the `.ckpt` folder ModelParallelStrategy wrote, or load a file checkpoint with torch.load.")
    with tempfile.TemporaryDirectory() as tmp:
        target = os.path.join(tmp, "consolidated.pt")
        dcp_to_torch_save(folder, target)
        checkpoint = torch.load(target, map_location="cpu", weights_only=False)
    meta = os.path.join(folder, _SHARDED_METADATA)
    if os.path.isfile(meta):
        checkpoint.update(torch.load(meta, map_location="cpu", weights_only=False))
    return checkpoint


def load_sharded_checkpoint(path: Union[str, "os.PathLike[str]"], module: nn.Module, *, strict: bool = True) -> dict[str, Any]:
    """Load a distributed checkpoint's weights into an unsharded ``module`` (one process).

    The checkpoint is joined with :func:`consolidate_sharded_checkpoint`; ``module`` is a fresh
    copy of the user's module without ``configure_model``'s ``fully_shard`` (its parameter names
    are the sharded module's). Returns the consolidated checkpoint (callback states under
    ``"callbacks"``). :func:`export_plain_checkpoint` with ``checkpoint_path=`` a folder uses it.
    """
    checkpoint = consolidate_sharded_checkpoint(path)
    module.load_state_dict(checkpoint["state_dict"], strict=strict)
    return checkpoint



def _lora_types() -> tuple[Optional[type], Optional[type]]:
    try:
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return None, None
    return PeftModel, LoraLayer


@torch.no_grad()
def _merged_base(layer: nn.Module) -> dict[str, Tensor]:
    """The state of a LoRA layer's base layer with its active, unmerged adapters added to the weight."""
    base = layer.get_base_layer()
    state = {key: value.detach().clone() for key, value in base.state_dict().items()}
    if getattr(layer, "disable_adapters", False):
        return state
    merged = set(getattr(layer, "merged_adapters", []))
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A and adapter not in merged:
            delta = layer.get_delta_weight(adapter)
            state["weight"] = state["weight"] + delta.to(state["weight"].device, state["weight"].dtype)
    return state


def export_plain_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The weights of ``module`` under the names of the plain model (see the module docstring).

    The module is not changed. Load the result into a fresh copy of your module with
    ``load_state_dict`` (strict), or write it with :func:`export_plain_checkpoint`.

    Args:
        module: the trained module (a LightningModule or any ``nn.Module``).

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
    """
    check_type("module", module, nn.Module, fix="pass the trained model (e.g. the LightningModule after fit)")
    peft_model, lora_layer = _lora_types()
    state = {key: value.detach() for key, value in module.state_dict().items()}
    done: list[str] = []
    for name, sub in module.named_modules():
        prefix = f"{name}." if name else ""
        if any(prefix.startswith(p) for p in done):
            continue  # inside a layer already replaced
        if isinstance(sub, AdaB2NBatchNorm2d):
            plain = sub.to_batchnorm().state_dict()
        elif lora_layer is not None and isinstance(sub, lora_layer):
            plain = _merged_base(sub)
        else:
            continue
        for key in [k for k in state if k.startswith(prefix)]:
            del state[key]
        state.update({prefix + key: value for key, value in plain.items()})
        done.append(prefix)
    if peft_model is not None:
        for name, sub in module.named_modules():
            if isinstance(sub, peft_model):
                outer = f"{name}." if name else ""
                inner = outer + "base_model.model."
                state = {(outer + k[len(inner):] if k.startswith(inner) else k): v for k, v in state.items()}
    return state


def export_plain_checkpoint(
    module: nn.Module,
    output_path: Union[str, "os.PathLike[str]"],
    checkpoint_path: Optional[Union[str, "os.PathLike[str]"]] = None,
) -> str:
    """Write a checkpoint of the plain model that ``MyModule.load_from_checkpoint(output_path)`` reads.

    Args:
        module: the module with the method's layers, e.g. the LightningModule a fit trained.
        output_path: the file to write (refused if it exists: no run replaces another's file).
        checkpoint_path: a checkpoint of that module (e.g. Lightning's ``last.ckpt``, or the folder a
            sharded strategy writes: see :func:`consolidate_sharded_checkpoint`) to convert:
            its weights are loaded into ``module`` first (strict; ``module`` must have the same
            layers, e.g. the module after the same callbacks' ``setup``) and its
            ``hyper_parameters`` are kept. ``None`` exports ``module`` as it is.

    Returns:
        ``output_path`` as a string.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
        FileExistsError: ``output_path`` exists.
        RuntimeError: the checkpoint's weights do not fit ``module``.
    """
    check_type("module", module, nn.Module, fix="pass the trained model (e.g. the LightningModule after fit)")
    output = os.fspath(output_path)
    if os.path.exists(output):
        raise FileExistsError(f"`output_path`={output!r} exists; export_plain_checkpoint never replaces a file. "
                              "Fix: pass a new path.")
    hyper: Any = dict(getattr(module, "hparams", {}) or {})
    if checkpoint_path is not None:
        if is_sharded_checkpoint(checkpoint_path):
            checkpoint = consolidate_sharded_checkpoint(checkpoint_path)
        else:
            checkpoint = torch.load(os.fspath(checkpoint_path), map_location="cpu", weights_only=False)
        try:
            module.load_state_dict(checkpoint["state_dict"], strict=True)
        except RuntimeError as error:
            raise RuntimeError(
                f"`checkpoint_path`={os.fspath(checkpoint_path)!r}: its weights do not fit `module` ({error}). Fix: "
                "pass the module with the method's layers (the one the fit trained, or a copy put through the "
                "same conversion: convert_adab2n, the LoRA adapter), not a fresh plain copy."
            ) from error
        hyper = checkpoint.get("hyper_parameters", hyper)
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    import lightning

    payload = {"state_dict": export_plain_state_dict(module), "hyper_parameters": hyper,
               "pytorch-lightning_version": lightning.__version__}
    torch.save(payload, output)
    return output
