"""Thin helpers over PEFT's LoRA: typed settings, target modules found by structure, adapter state.

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022) freezes a
pre-trained weight ``W`` and learns a low-rank update ``ΔW = (alpha / r)·B·A`` beside it
(``A``: ``r × d_in``, ``B``: ``d_out × r``, ``B`` starts at zero so training starts from the
pre-trained model). PEFT implements the layers; this module only decides *where* they go and
gives methods built on LoRA (I-LoRA's fast/slow adapter pair, GS-LoRA's per-block groups) a
small, named view of the adapter tensors. No LoRA layer is written here.

API
---
- :class:`LoRASettings` — a dataclass with ``r``, ``alpha``, ``dropout``, ``target_modules``,
  ``kind``, ``modules_to_save``; LightningCLI configures it as a plain mapping.
  :meth:`LoRASettings.lora_config` builds PEFT's ``LoraConfig`` for a given model, with the
  target modules resolved to full module names.
- :func:`find_blocks` — the repeated Transformer blocks of a model, found by structure (every
  ``nn.ModuleList`` whose children share one type and each hold two or more linear layers):
  GPT-2 ``transformer.h``, Llama ``model.layers``, BERT ``encoder.layer``, ViT (transformers 5)
  ``vit.layers``, timm ``blocks``.
- :func:`find_target_modules` — the linear layers (``nn.Linear`` and transformers'
  ``Conv1D``) of every block, by ``kind``: ``"attention"`` (layers under a sub-module whose name
  contains ``attn``/``attention``: GPT-2 ``attn.c_attn``/``attn.c_proj``, Llama and ViT
  ``q_proj``/``k_proj``/``v_proj``/``o_proj``, BERT ``attention.self.query``... and
  ``attention.output.dense``, timm ``attn.qkv``/``attn.proj``), ``"ffn"`` (the others: GPT-2
  ``mlp.c_fc``/``mlp.c_proj``, Llama ``mlp.gate_proj``/``up_proj``/``down_proj``, BERT
  ``intermediate.dense``/``output.dense``, ViT and timm ``mlp.fc1``/``mlp.fc2``) or ``"all"``.
  ``by_block=True`` returns them grouped per block (GS-LoRA's groups).
- :func:`match_target_modules` — explicit patterns for any other model (a plain ``nn.Linear``
  stack, a custom backbone): a ``str`` is a regular expression matched against full module
  names (``r"blocks\\.\\d+\\.mlp\\.fc[12]"``), a list holds full names or name suffixes
  (``["fc1", "fc2"]``), PEFT's own semantics; every list entry must match a linear layer.
- :func:`add_lora` — wrap a model with PEFT (or add one more adapter to a PEFT model).
- :func:`peft_model_of` — the one ``PeftModel`` inside a module (a LightningModule, say).
- :func:`adapter_parameters` — ``{name: Parameter}`` of one adapter (LoRA tensors and the
  adapter's ``modules_to_save`` copies), in module order.
- :func:`adapter_state_dict` / :func:`load_adapter_state_dict` — one adapter's tensors as CPU
  copies keyed by adapter-neutral names (``....lora_A.weight``), so a state taken from one
  adapter loads into another (I-LoRA copies fast into slow this way) or into a fresh model.
- :func:`save_adapter` / :func:`load_adapter` — that state as one ``.safetensors`` file (with
  the settings as metadata); the base model's weights are never written.
  :func:`save_adapter_state` writes such a file from tensors kept outside the model, keyed by
  :func:`neutral_adapter_names`.

Example::

    settings = LoRASettings(r=8, alpha=16, kind="ffn")
    peft_model = add_lora(model, settings)
    names = list(adapter_parameters(peft_model))
    save_adapter(peft_model, "task_0.safetensors")
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor, nn

from lightning_forget.validation import check_choice, check_float, check_int, check_str, message

__all__ = [
    "LoRASettings",
    "adapter_parameters",
    "adapter_state_dict",
    "add_delta_to_base",
    "add_lora",
    "find_blocks",
    "find_target_modules",
    "is_linear_like",
    "load_adapter",
    "load_adapter_state_dict",
    "local_delta",
    "match_target_modules",
    "neutral_adapter_names",
    "peft_model_of",
    "save_adapter",
    "save_adapter_state",
]

TargetKind = Literal["attention", "ffn", "all"]
TARGET_KINDS = ("attention", "ffn", "all")
_ATTENTION_WORDS = ("attn", "attention")
_ADAPTER_CONTAINERS = r"(lora_[A-Za-z_]+|modules_to_save)"


def _tuner_wrapper_types() -> tuple[type, ...]:
    """PEFT's layer wrappers (a LoRA layer around its base layer, a modules-to-save copy)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    return BaseTunerLayer, AuxiliaryTrainingWrapper


def _base_layer(module: nn.Module) -> nn.Module:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def is_linear_like(module: nn.Module) -> bool:
    """``True`` for the layers LoRA targets here: ``nn.Linear``, transformers' ``Conv1D``, or a PEFT
    layer already wrapped around one.

    GPT-2's ``Conv1D`` is a linear layer with a transposed weight; it is recognised by class
    name, so this module does not import transformers.
    """
    module = _base_layer(module)
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and isinstance(weight, Tensor) and weight.dim() == 2


def _linear_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the linear layers of ``model``; the insides of PEFT wrappers (the base layer,
    the LoRA factors, saved copies) are not listed separately."""
    wrappers = _tuner_wrapper_types()
    found: list[tuple[str, nn.Module]] = []
    skipped: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix in skipped):
            continue
        if isinstance(module, wrappers):
            skipped.append(name)
        if is_linear_like(module):
            found.append((name, module))
    return found


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, _ in _linear_modules(model)]


def _is_block_list(module: nn.Module) -> bool:
    if not isinstance(module, nn.ModuleList) or len(module) == 0:
        return False
    kinds = {type(child) for child in module}
    if len(kinds) != 1:
        return False
    return all(len(_linear_modules(child)) >= 2 for child in module)


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The repeated Transformer blocks of ``model`` as ``(full name, block)``, in module order.

    A block list is an ``nn.ModuleList`` whose children all have one type and each contain at
    least two linear layers; lists nested inside a block list are part of that block. Works on
    PEFT-wrapped models too (names then carry PEFT's ``base_model.model.`` prefix).

    Raises:
        RuntimeError: no such list; the message lists the linear layers seen and the fix
            (explicit ``target_modules`` patterns).
    """
    blocks: list[tuple[str, nn.Module]] = []
    taken: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in taken):
            continue
        if _is_block_list(module):
            taken.append(name)
            blocks.extend((f"{name}.{index}" if name else str(index), child) for index, child in enumerate(module))
    if not blocks:
        seen = _linear_names(model)
        shown = ", ".join(seen[:12]) + (", ..." if len(seen) > 12 else "")
        raise RuntimeError(
            f"Could not find repeated Transformer blocks in {type(model).__name__} (no nn.ModuleList of same-type "
            f"children with two or more linear layers each). Linear layers seen: [{shown}]. Fix: pass "
            "`target_modules` explicitly, e.g. target_modules=['fc1', 'fc2'] or a regular expression such as "
            r"target_modules='blocks\.\d+\.mlp\.fc[12]'."
        )
    return blocks


def _is_attention_path(relative: str) -> bool:
    parts = relative.lower().split(".")[:-1]
    return any(word in part for part in parts for word in _ATTENTION_WORDS)


def find_target_modules(
    model: nn.Module, kind: TargetKind = "attention", by_block: bool = False
) -> Union[list[str], "OrderedDict[str, list[str]]"]:
    """Full names of the linear layers of every block of ``model`` of one ``kind``.

    Args:
        model: a Transformer (GPT-2, Llama, BERT, ViT in transformers 5, timm ViT, ...).
        kind: ``"attention"``, ``"ffn"`` (the feed-forward linears of each block) or ``"all"``.
        by_block: return ``{block name: [module names]}`` instead of one flat list.

    Raises:
        ValueError: ``kind`` is not one of the choices.
        RuntimeError: no blocks (see :func:`find_blocks`), or no layer of that kind in a block.
    """
    check_choice("kind", kind, TARGET_KINDS, fix="pass kind='attention', 'ffn' or 'all'")
    grouped: OrderedDict[str, list[str]] = OrderedDict()
    for block_name, block in find_blocks(model):
        names = []
        for relative, _ in _linear_modules(block):
            attention = _is_attention_path(relative)
            if kind == "all" or (kind == "attention") == attention:
                names.append(f"{block_name}.{relative}")
        if not names:
            inside = _linear_names(block)
            raise RuntimeError(
                f"Block {block_name!r} ({type(block).__name__}) has no {kind} linear layer; its linear layers are "
                f"{inside}. Fix: pass `target_modules` explicitly (names or a regular expression)."
            )
        grouped[block_name] = names
    if by_block:
        return grouped
    return [name for names in grouped.values() for name in names]


def match_target_modules(model: nn.Module, patterns: Union[str, list[str], tuple[str, ...]]) -> list[str]:
    """Full names of the linear layers of ``model`` that ``patterns`` select (PEFT's semantics).

    A ``str`` is a regular expression that must match a whole module name; a list holds exact
    names or suffixes (``"fc1"`` matches ``"blocks.0.mlp.fc1"``).

    Raises:
        TypeError: ``patterns`` is not a str or a list of str.
        ValueError: the expression (or a list entry) selects no linear layer; the message lists
            the linear layers of the model.
    """
    linears = _linear_names(model)
    shown = ", ".join(linears[:12]) + (", ..." if len(linears) > 12 else "")
    if isinstance(patterns, str):
        try:
            expression = re.compile(patterns)
        except re.error as error:
            raise ValueError(message("target_modules", "a valid regular expression", patterns, f"{error}")) from None
        chosen = [name for name in linears if expression.fullmatch(name)]
        if not chosen:
            raise ValueError(
                message("target_modules", "a regular expression matching a whole linear layer name", patterns,
                        f"the linear layers are [{shown}]")
            )
        return chosen
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) and p for p in patterns) or not patterns:
        raise TypeError(message("target_modules", "a str (regular expression) or a non-empty list of module names",
                                patterns, "e.g. target_modules=['fc1', 'fc2']"))
    chosen = []
    for pattern in patterns:
        hits = [name for name in linears if name == pattern or name.endswith("." + pattern)]
        if not hits:
            raise ValueError(
                message("target_modules", "names or suffixes of linear layers", list(patterns),
                        f"{pattern!r} matches none; the linear layers are [{shown}]")
            )
        chosen.extend(hit for hit in hits if hit not in chosen)
    return [name for name in linears if name in chosen]


@dataclass
class LoRASettings:
    """A typed subset of PEFT's ``LoraConfig``: what a LoRA-based method lets users choose.

    Args:
        r: rank of each update ``B·A`` (>= 1).
        alpha: LoRA's ``lora_alpha``; the update is scaled by ``alpha / r``.
        dropout: dropout on the LoRA branch's input, in ``[0, 1)``.
        target_modules: ``None`` finds the layers by structure (:func:`find_target_modules` with
            ``kind``); a regular expression or a list of names/suffixes selects them explicitly
            (:func:`match_target_modules`).
        kind: which layers of each block the structural search picks: ``"attention"``,
            ``"ffn"`` or ``"all"`` (ignored when ``target_modules`` is given).
        modules_to_save: names of modules trained in full beside the adapter (a fresh
            classification head, e.g. ``["classifier"]``); PEFT keeps one copy per adapter.

    Raises:
        TypeError, ValueError: at construction, naming the field.
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: Optional[Union[str, list[str]]] = None
    kind: TargetKind = "attention"
    modules_to_save: Optional[list[str]] = None

    def __post_init__(self) -> None:
        self.r = check_int("r", self.r, min=1, fix="pass the LoRA rank, e.g. r=8")
        self.alpha = check_float("alpha", self.alpha, min=0, min_inclusive=False, fix="pass e.g. alpha=16")
        self.dropout = check_float("dropout", self.dropout, min=0, max=1, max_inclusive=False, fix="pass e.g. dropout=0.1")
        check_choice("kind", self.kind, TARGET_KINDS, fix="pass kind='attention', 'ffn' or 'all'")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                check_str("target_modules", self.target_modules)
            elif isinstance(self.target_modules, (list, tuple)) and self.target_modules and all(
                isinstance(p, str) and p for p in self.target_modules
            ):
                self.target_modules = list(self.target_modules)
            else:
                raise TypeError(message("target_modules", "None, a regular expression or a non-empty list of names",
                                        self.target_modules, "e.g. target_modules=['q_proj', 'v_proj']"))
        if self.modules_to_save is not None:
            if not isinstance(self.modules_to_save, (list, tuple)) or not all(
                isinstance(p, str) and p for p in self.modules_to_save
            ):
                raise TypeError(message("modules_to_save", "None or a list of module names", self.modules_to_save,
                                        "e.g. modules_to_save=['classifier']"))
            self.modules_to_save = list(self.modules_to_save)

    def target_names(self, model: nn.Module) -> list[str]:
        """The full names of the layers of ``model`` these settings put LoRA on."""
        if self.target_modules is None:
            return list(find_target_modules(model, self.kind))
        return match_target_modules(model, self.target_modules)

    def lora_config(self, model: nn.Module) -> Any:
        """PEFT's ``LoraConfig`` for ``model`` (targets resolved to full names, ``fan_in_fan_out`` set for
        GPT-2's ``Conv1D``)."""
        from peft import LoraConfig

        names = self.target_names(model)
        modules = dict(model.named_modules())
        conv1d = [type(_base_layer(modules[name])).__name__ == "Conv1D" for name in names]
        if any(conv1d) and not all(conv1d):
            raise ValueError(
                message("target_modules", "layers of one kind (all nn.Linear or all Conv1D)", names,
                        "PEFT's fan_in_fan_out is one flag per adapter; select nn.Linear and Conv1D layers apart")
            )
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=names,
            fan_in_fan_out=all(conv1d),
            modules_to_save=self.modules_to_save,
            bias="none",
        )

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain values (saved beside adapter files)."""
        return asdict(self)

    @classmethod
    def from_value(cls, value: Any, argument: str = "lora") -> "LoRASettings":
        """``value`` as settings: a :class:`LoRASettings` as it is, or a mapping of its fields.

        Raises:
            TypeError: neither, or a mapping with keys that are no field (the message names them,
                the valid fields and ``argument``).
        """
        if isinstance(value, cls):
            return value
        fields = [f.name for f in dataclass_fields(cls)]
        if isinstance(value, Mapping):
            unknown = sorted(str(k) for k in value if k not in fields)
            if unknown:
                raise TypeError(message(argument, f"LoRA settings with the fields {fields}", dict(value),
                                        f"{unknown} are not among them; e.g. {argument}={{'r': 8, 'alpha': 32}}"))
            return cls(**value)
        raise TypeError(message(argument, "a LoRASettings or a mapping of its fields", value,
                                f"e.g. {argument}=LoRASettings(r=8, alpha=32) or {argument}={{'r': 8}}"))


def local_delta(layer: nn.Module, adapter: str, owner: str) -> Tensor:
    """A PEFT LoRA linear's ``ΔW = scale·B·A`` (transposed for ``fan_in_fan_out``), the block this
    rank's shard of ``W`` holds under FSDP2 (the whole ``ΔW`` for plain weights).

    The factors are adapter-sized and gathered whole (a collective when sharded: every rank calls
    it for the same layers in the same order). ``owner`` names the caller in the error raised for a
    LoRA layer that is not a linear (a convolution's delta is not a block product).
    """
    from lightning_forget.sharding import full_tensor, global_slice, local_view

    base = layer.get_base_layer()
    weight = base.weight
    if not isinstance(base, nn.Linear) and not getattr(layer, "fan_in_fan_out", False):
        raise RuntimeError(
            f"{owner} merges LoRA on linear layers (nn.Linear, transformers' Conv1D) only under ModelParallelStrategy; {type(base).__name__} "
            "is not one. Fix: target linear layers, or use strategy='ddp'."
        )
    a = full_tensor(layer.lora_A[adapter].weight).float()
    b = full_tensor(layer.lora_B[adapter].weight).float()
    rows, cols = global_slice(weight)
    if getattr(layer, "fan_in_fan_out", False):  # W is (in, out): ΔW = (B·A)ᵀ
        block = (b[cols] @ a[:, rows]).T
    else:
        block = b[rows] @ a[:, cols]
    return (block * layer.scaling[adapter]).to(local_view(weight).dtype)


@torch.no_grad()
def add_delta_to_base(layer: nn.Module, adapter: str, owner: str) -> Tensor:
    """``W += ΔW`` for one PEFT LoRA layer's ``adapter``; returns the ``ΔW`` added.

    On a plain weight the whole ``get_delta_weight``; under FSDP2 the block this rank's shard of
    ``W`` holds (:func:`local_delta`, a collective: every rank calls it for the same layers in the
    same order), added shard-wise. ``owner`` names the caller in :func:`local_delta`'s error.
    """
    from lightning_forget.sharding import edit_local, is_sharded

    weight = layer.get_base_layer().weight
    delta = local_delta(layer, adapter, owner) if is_sharded(weight) else layer.get_delta_weight(adapter)
    edit_local(weight, lambda local, d: local + d.to(local.device, local.dtype), delta)
    return delta


def peft_model_of(module: nn.Module) -> nn.Module:
    """The one PEFT model (``PeftModel``) in ``module`` (``module`` itself, or a child such as a
    LightningModule's ``model``).

    Raises:
        RuntimeError: none, or more than one.
    """
    from peft import PeftModel

    if isinstance(module, PeftModel):
        return module
    found = [(name, child) for name, child in module.named_modules() if isinstance(child, PeftModel)]
    if len(found) != 1:
        names = [name for name, _ in found]
        raise RuntimeError(
            f"Expected exactly one PEFT model inside {type(module).__name__}, found {len(found)} {names}. Fix: wrap the "
            "backbone once with lightning_forget.lora.add_lora (or peft.get_peft_model) and pass that module."
        )
    return found[0][1]


def add_lora(model: nn.Module, settings: LoRASettings, adapter_name: str = "default") -> nn.Module:
    """Put a LoRA adapter named ``adapter_name`` on ``model``; returns the PEFT model.

    A plain model is wrapped with ``peft.get_peft_model`` (its weights are frozen, the adapter is
    trainable and active). A model that already is a ``PeftModel`` gets one more adapter with
    ``add_adapter`` (targets resolved on its base model); the active adapter is not changed.

    Raises:
        ValueError: a PEFT model that already has an adapter of that name.
    """
    from peft import PeftModel, get_peft_model

    check_str("adapter_name", adapter_name)
    if isinstance(model, PeftModel):
        if adapter_name in model.peft_config:
            raise ValueError(message("adapter_name", "a name not used by the model's adapters", adapter_name,
                                     f"the model has {sorted(model.peft_config)}; pick another name"))
        model.add_adapter(adapter_name, settings.lora_config(model.get_base_model()))
        return model
    return get_peft_model(model, settings.lora_config(model), adapter_name=adapter_name)


def _adapter_regex(adapter_name: str) -> re.Pattern[str]:
    return re.compile(rf"\.{_ADAPTER_CONTAINERS}\.{re.escape(adapter_name)}(?=\.|$)")


def adapter_parameters(model: nn.Module, adapter_name: str = "default") -> "OrderedDict[str, nn.Parameter]":
    """``{full name: parameter}`` of one adapter of the PEFT model in ``model``, in module order.

    Names are relative to ``model`` (so they match ``model.named_parameters()``). Includes the
    adapter's LoRA factors and its ``modules_to_save`` copies; never a base weight.

    Raises:
        ValueError: the model has no adapter of that name.
    """
    peft_model = peft_model_of(model)
    if adapter_name not in peft_model.peft_config:
        raise ValueError(message("adapter_name", "the name of one of the model's adapters", adapter_name,
                                 f"the model has {sorted(peft_model.peft_config)}"))
    pattern = _adapter_regex(adapter_name)
    return OrderedDict((name, p) for name, p in model.named_parameters(remove_duplicate=False) if pattern.search(name))


def _neutral(name: str, adapter_name: str, peft_prefix: str) -> str:
    name = name[len(peft_prefix):] if peft_prefix and name.startswith(peft_prefix) else name
    return _adapter_regex(adapter_name).sub(lambda m: "." + m.group(1), name)


def _peft_prefix(model: nn.Module) -> str:
    peft_model = peft_model_of(model)
    for name, module in model.named_modules():
        if module is peft_model:
            return name + "." if name else ""
    return ""  # pragma: no cover - peft_model_of found it among the modules


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> "OrderedDict[str, Tensor]":
    """CPU copies of one adapter's tensors, keyed by names relative to the PEFT model with the adapter name
    removed (``base_model.model.h.0.attn.c_attn.lora_A.weight``)."""
    prefix = _peft_prefix(model)
    return OrderedDict(
        (_neutral(name, adapter_name, prefix), p.detach().to("cpu", copy=True))
        for name, p in adapter_parameters(model, adapter_name).items()
    )


def load_adapter_state_dict(model: nn.Module, state: dict[str, Tensor], adapter_name: str = "default") -> None:
    """Copy ``state`` (from :func:`adapter_state_dict` of any adapter with the same settings) into one
    adapter, in place, under ``torch.no_grad()``.

    Raises:
        KeyError: keys missing or unexpected (both listed): the settings differ.
        ValueError: a tensor of the wrong shape.
    """
    prefix = _peft_prefix(model)
    params = {_neutral(name, adapter_name, prefix): p for name, p in adapter_parameters(model, adapter_name).items()}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise KeyError(
            f"Adapter state does not fit adapter {adapter_name!r}: missing {missing[:5]}, unexpected {unexpected[:5]}. "
            "Fix: load a state saved from a model with the same LoRA settings and target modules."
        )
    with torch.no_grad():
        for key, p in params.items():
            value = state[key]
            if value.shape != p.shape:
                raise ValueError(message(f"state[{key!r}]", f"a tensor of shape {tuple(p.shape)}", tuple(value.shape),
                                         "load a state saved with the same LoRA rank and model sizes"))
            p.copy_(value.to(device=p.device, dtype=p.dtype))


def save_adapter(
    model: nn.Module, path: Union[str, Path], adapter_name: str = "default", metadata: Optional[dict[str, Any]] = None
) -> Path:
    """Write one adapter's tensors (only those: never a base weight) to a ``.safetensors`` file.

    ``metadata`` (plain JSON values, e.g. ``LoRASettings.to_dict()`` and the task) is stored in
    the file's header; :func:`load_adapter` returns it. Returns the path written.
    """
    return save_adapter_state(adapter_state_dict(model, adapter_name), path, adapter_name, metadata)


def save_adapter_state(
    state: dict[str, Tensor], path: Union[str, Path], adapter_name: str = "default", metadata: Optional[dict[str, Any]] = None
) -> Path:
    """Write an adapter state (keys as :func:`adapter_state_dict` names them) to a ``.safetensors`` file that
    :func:`load_adapter` reads: for adapter tensors kept outside the model (I-LoRA's slow learner)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state.items()}
    header = {"adapter_name": adapter_name, "metadata": json.dumps(metadata or {})}
    save_file(tensors, str(path), metadata=header)
    return path


def neutral_adapter_names(model: nn.Module, adapter_name: str = "default") -> "OrderedDict[str, str]":
    """``{name in model.named_parameters(): adapter-neutral key}`` for one adapter (the keys of
    :func:`adapter_state_dict`)."""
    prefix = _peft_prefix(model)
    return OrderedDict((name, _neutral(name, adapter_name, prefix)) for name in adapter_parameters(model, adapter_name))


def load_adapter(model: nn.Module, path: Union[str, Path], adapter_name: str = "default") -> dict[str, Any]:
    """Load a file written by :func:`save_adapter` into one adapter; returns the saved metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No adapter file at {path}. Fix: pass a path written by save_adapter.")
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata() or {}
    load_adapter_state_dict(model, load_file(str(path)), adapter_name)
    if "metadata" not in header:
        raise ValueError(f"{path} is not an adapter file written by save_adapter (no 'metadata' in its header).")
    return json.loads(header["metadata"])
