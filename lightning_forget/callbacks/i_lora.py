"""I-LoRA: a fast LoRA learner, a slow one that follows it by interpolation, and consistency replay."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_forget import reporting
from lightning_forget.buffers import TASK_KEY
from lightning_forget.callbacks.replay import _BufferCallback
from lightning_forget.forward import ModelForward
from lightning_forget.lora import (
    LoRASettings,
    add_lora,
    adapter_parameters,
    neutral_adapter_names,
    save_adapter_state,
)
from lightning_forget.losses import hidden_consistency_loss, output_loss, remove_training_step_hooks, training_step_hooks
from lightning_forget.modules.causal_lm import IGNORE_INDEX, causal_lm_loss
from lightning_forget.optim_step import StepCounter
from lightning_forget.sharding import as_layout, edit_local, full_tensor, is_sharded, local_clone, local_view, shard_like
from lightning_forget.tasks import DDP_STRATEGIES, SHARDED_STRATEGIES
from lightning_forget.validation import check_choice, check_float, check_str, check_type, message

try:  # Python 3.12+
    from typing import override
except ImportError:  # pragma: no cover
    from typing_extensions import override

__all__ = ["ILoRA", "classification_head", "ema_coefficient", "interpolate_"]

#: The official code's LoRA settings: rank 8, alpha 32, dropout 0.1, on the attention projections.
DEFAULT_LORA = {"r": 8, "alpha": 32.0, "dropout": 0.1, "kind": "attention"}

#: Pad values of token fields in the buffer (labels padded with -100: never trained on).
TOKEN_PAD_VALUES = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX}


def ema_coefficient(step: int, ema: float) -> float:
    """The warm-started interpolation weight of the old slow weights: ``min(1 - 1/(step + 1), ema)``.

    ``step`` counts real optimizer steps from 1 (the first update uses ``min(1/2, ema)``).
    """
    return min(1.0 - 1.0 / (step + 1), ema)


@torch.no_grad()
def interpolate_(slow: dict[str, Tensor], fast: dict[str, Tensor], weight: float) -> None:
    """In place: ``slow[k] ← weight·slow[k] + (1 − weight)·fast[k]`` for every key, in ``slow``'s dtype
    (ILoRA keeps ``slow`` in float32 whatever the model's precision)."""
    for key, value in slow.items():
        value.mul_(weight).add_(fast[key].detach().to(value.dtype), alpha=1.0 - weight)


#: How the slow learner follows the fast one: ``"ema"`` (the paper's interpolation) or ``"frozen"``.
SLOW_UPDATES = ("ema", "frozen")

#: Class-name endings of Hugging Face models with a classification head, and the heads' attribute names.
_CLASSIFIER_MODELS = ("ForImageClassification", "ForSequenceClassification", "ForTokenClassification",
                      "ForAudioClassification")
_HEAD_NAMES = ("classifier", "score")


def classification_head(model: nn.Module) -> Optional[str]:
    """The attribute name of a Hugging Face ``*For*Classification`` model's head (``classifier``/``score``),
    or ``None`` for any other model."""
    if not type(model).__name__.endswith(_CLASSIFIER_MODELS):
        return None
    for name in _HEAD_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    return None


def _register_output_capture(model: nn.Module) -> None:
    """Make ``output_hidden_states=True`` work on a model unpickled in a fresh process.

    transformers 5 collects hidden states through a registry filled when a model *class* is first
    instantiated in the process; a model that arrived by pickling (``strategy="ddp_spawn"``
    workers) finds the registry empty and silently returns ``hidden_states=None``. Registering
    the model's own ``_can_record_outputs`` restores it; nothing happens where it is registered.
    """
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # pragma: no cover - other transformers releases
        return
    for module in model.modules():
        record = getattr(type(module), "_can_record_outputs", None)
        if record and not _CAN_RECORD_REGISTRY.get(module):
            _CAN_RECORD_REGISTRY[module] = record


class ILoRA(_BufferCallback):
    """I-LoRA: dual-memory LoRA with parameter interpolation and hidden-state consistency replay.

    Ren et al., "Analyzing and Reducing Catastrophic Forgetting in Parameter Efficient Tuning"
    (arXiv 2024; ICASSP 2025). The module's backbone carries a LoRA adapter (PEFT), the **fast
    learner**, trained by the optimizer. A **slow learner** is a second set of adapter tensors
    that follows the fast one by interpolation after every real optimizer step:

        θ_slow ← λ_s·θ_slow + (1 − λ_s)·θ_fast,   λ_s = min(1 − 1/(s + 1), λ),

    with ``s`` the number of real optimizer steps so far (an accumulation batch is not a step).
    The slow tensors are a float32 master copy whatever the model's precision (under
    ``bf16-true`` an increment ``(1 − λ)·(θ_fast − θ_slow)`` with λ near 1 would be below the
    resolution of half-precision weights, and the slow learner would stall). It starts as a copy of
    the fast adapter taken when the fit starts, after the strategy has synchronised the weights
    (under DDP every rank holds rank 0's).

    **The official code's slow learner is frozen.** In ``which47/LLMCL`` (``method/ILORA.py``,
    ``update_ema_weights``) the interpolation looks the ``ema`` adapter's tensors up under the
    ``default`` adapter's parameter names, so it only rewrites the fast tensors with themselves and
    the ``ema`` adapter keeps its initialisation (``B = 0``): the slow learner of the official runs
    is the pre-trained model. ``slow_update="ema"`` (default) is the paper's interpolation;
    ``slow_update="frozen"`` reproduces the official code for comparison (the slow tensors stay
    the adapter's initial ones: the pre-trained model for a fresh LoRA).
    From the second task on, each step also draws a batch of the stream's size from a reservoir
    buffer, runs the fast learner on it (loss ``L_buf``, hidden states ``h_f``) and the slow
    learner without gradient (``h_s``), and trains on

        (L_cur + L_buf) / 2 + γ · mean_ℓ ReLU(h_s,ℓ − h_f,ℓ)²,

    the mean running over every hidden layer (the embedding output included) and every real
    (unpadded) position. ``L_cur`` is what the module's own ``training_step`` returns; the rest is
    added through :func:`lightning_forget.losses.training_step_hooks` inside the same step, so DDP
    reduces one gradient.

    **The model.** ``setup()`` wraps ``pl_module.<model_attr>`` (a Hugging Face model: GPT-2,
    Llama, ViT, BERT...) with PEFT LoRA (``lora``); a backbone that already is a ``PeftModel`` is
    used as it is (its ``adapter`` trains). The slow learner is *not* a module: it is a copy of
    the adapter's tensors (a few MB, never the whole model) held by this callback, so it is in no
    optimizer and no DDP bucket whatever ``configure_optimizers`` does; its forward is the same
    model with the slow tensors copied into the adapter for the slow forward (run before the step
    builds its graph) and the fast ones copied back. Wrapping happens in ``setup()``, before the
    strategy builds the optimizer and DDP, so only adapter parameters require gradients there. A
    Hugging Face ``*For*Classification`` model's head (``classifier``/``score``) is trained beside
    the LoRA (added to ``lora.modules_to_save`` when that is unset, so it belongs to both learners);
    ``lora={"modules_to_save": []}`` keeps it frozen.

    **Batches.** Token batches are dicts with ``input_ids`` (and ``attention_mask``, ``labels``
    with ``-100`` at positions not predicted); the buffer stores them with their lengths and
    re-pads drawn rows (``input_ids``/``attention_mask`` with 0, ``labels`` with -100); the
    buffer loss is the next-token loss, the consistency mask is ``attention_mask``. Image batches
    (tuples, dicts, namedtuples with an input and a target; ``input_key``/``target_key``) are
    stored as they are; the buffer loss is cross-entropy over the logits. A Hugging Face backbone
    (``ViTForImageClassification``) gets them as ``pixel_values``. A plain backbone holding a
    Hugging Face model (``ContinualClassifier(backbone=lightning_forget.nn.ViT(...))`` with
    ``model_attr="backbone"``) is run through the LightningModule's ``forward(x)``, which must
    return logits; the hidden states are those of the inner model (embeddings and every block).
    Parameters outside ``model_attr`` that the module's optimizer trains (such as
    ``ContinualClassifier``'s head) train as usual and are shared by both learners: the slow
    learner interpolates the adapter only.

    **Inference.** ``inference_learner="slow"`` (default) evaluates with the slow tensors swapped
    into the adapter during every validation, test and predict run (also one that loads a
    checkpoint: the slow tensors are in the callback's state), and leaves them in the adapter
    when training ends (the fast tensors come back when the Trainer runs again with this callback);
    ``"fast"`` uses the trained adapter throughout. With ``"slow"`` every checkpoint's weights hold
    the slow learner in the adapter, so ``load_from_checkpoint``, ``validate``/``test`` from it and
    :mod:`lightning_forget.export` give the model the fit leaves behind; the fast learner is in the
    callback's state (``"fast"``) and a resume puts it back into the adapter when training starts
    (after the sanity check, which evaluates the slow one). Which learner the paper evaluates is not stated; the slow default
    follows the dual-memory design it builds on. With λ = 0.25 the slow learner trails the fast
    one by a few steps only; a long-term memory in the CLS-ER sense needs λ near 1 (e.g. 0.999).

    **Files.** When a task ends, rank 0 writes ``task_{t}_fast.safetensors`` and
    ``task_{t}_slow.safetensors`` (adapter tensors only, read back with
    :func:`lightning_forget.lora.load_adapter`) into ``adapter_dir`` (default: the checkpoint
    callback's directory, else ``adapters/`` in the run's results folder,
    :func:`lightning_forget.reporting.results_dir`: the logger's directory, else
    ``default_root_dir``). A second run into the same folder gets ``-v1``, ``-v2`` … names.

    Args:
        lora: LoRA settings of the fast (and slow) adapter when ``setup()`` wraps the backbone (a
            :class:`~lightning_forget.lora.LoRASettings` or a mapping of its fields: ``r``,
            ``alpha``, ``dropout``, ``target_modules``, ``kind``, ``modules_to_save``); default
            ``LoRASettings(r=8, alpha=32, dropout=0.1, kind="attention")``, the official code's
            values. Ignored for a backbone that already is a PEFT model.
        ema: λ, the weight of the old slow tensors (default 0.25, the official ``ema_alpha``).
        consistency_weight: γ (default 1.0, the official ``reg_weight``).
        buffer_size: samples kept (default 500, the official value).
        replay_batch_size: replayed samples per step (default: the stream batch size, as official).
        layers: indices of the hidden-state layers the consistency loss uses (negative allowed,
            e.g. ``[-1]``); ``None`` (default, official) uses all of them.
        inference_learner: ``"slow"`` or ``"fast"`` (above).
        model_attr: attribute of the LightningModule holding the Hugging Face backbone.
        adapter: name of the trained PEFT adapter (``"default"``: PEFT's own default name).
        adapter_dir: where per-task adapter files go (``None``: see above).
        save_adapters: write the per-task adapter files.
        seed: seed of the buffer and of the replay draws.
        input_key: the image input's field for image batches (see
            :class:`~lightning_forget.callbacks.ExperienceReplay`); token batches use ``input_ids``.
        target_key: the label field of image batches.
        pad_values: pad values of the variable-length buffer fields (default: the token fields
            above; ``None`` is that default).
        forward_fn: the logits function for a plain backbone holding a Hugging Face model (run
            through the LightningModule): ``None`` for the module's ``forward``, or a submodule or
            method name (see :class:`~lightning_forget.forward.ModelForward`).
        slow_update: ``"ema"`` (default: the paper's interpolation) or ``"frozen"`` (the
            official code's behaviour: the slow learner never moves; ``ema`` is then unused).

    Raises:
        TypeError, ValueError: bad arguments (at construction).
        RuntimeError: in ``setup()``: the module has no ``model_attr`` backbone, the backbone
            holds no Hugging Face model, the PEFT model has no ``adapter``, the strategy is
            not supported (single device, DDP and ``ModelParallelStrategy`` are); a plain backbone
            and a module without ``forward`` nor ``forward_fn``.
            At the first batch: an image batch (no ``input_ids``) for a backbone that takes no
            ``pixel_values`` (e.g. token batches served as tuples).
        ValueError: in ``setup()``: ``layers`` indexes past the model's hidden states.

    Note:
        Logged keys: ``ilora/buffer_loss`` (``L_buf``), ``ilora/consistency`` (the unweighted
        consistency loss) on replay steps, ``ilora/buffer_size`` every step. Saved state: the
        buffer, the slow adapter tensors (CPU, float32, by adapter-neutral name), the count of real
        optimizer steps, the task counters.

    Note:
        Under ``ModelParallelStrategy`` (FSDP2) the slow tensors are each rank's local shards of the
        adapter's layout (ILoRA wraps the backbone in ``setup()``, before ``configure_model`` shards
        it); the interpolation and the swaps are shard-wise, and the state, the adapter files and a
        full checkpoint gather whole tensors on every rank (see docs/sharding.md).
    """

    supported_strategies: tuple[str, ...] = DDP_STRATEGIES + SHARDED_STRATEGIES
    #: Constructor arguments whose change a resume refuses (see ContinualCallback.state_arguments).
    state_arguments: tuple[str, ...] = ('lora', 'buffer_size', 'layers', 'model_attr', 'adapter', 'input_key', 'target_key')
    #: Whether the task end edits weights (then it runs inside tasks.atomic_edit).
    task_end_edits_weights = False
    STATE_VERSION = 1

    def __init__(
        self,
        lora: Optional[LoRASettings] = None,
        ema: float = 0.25,
        consistency_weight: float = 1.0,
        buffer_size: int = 500,
        replay_batch_size: Optional[int] = None,
        layers: Optional[list[int]] = None,
        inference_learner: Literal["slow", "fast"] = "slow",
        model_attr: str = "model",
        adapter: str = "default",
        adapter_dir: Optional[str] = None,
        save_adapters: bool = True,
        seed: int = 0,
        input_key: Optional[Union[str, int]] = None,
        target_key: Optional[Union[str, int]] = None,
        pad_values: Optional[dict[str, Union[int, float]]] = None,
        forward_fn: Optional[str] = None,
        slow_update: Literal["ema", "frozen"] = "ema",
    ) -> None:
        super().__init__(
            buffer_size, replay_batch_size, "reservoir", seed, input_key, target_key, None,
            pad_values=dict(TOKEN_PAD_VALUES) if pad_values is None else pad_values,
        )
        self.lora = LoRASettings.from_value(DEFAULT_LORA if lora is None else lora, "lora")
        self.slow_update = check_choice("slow_update", slow_update, SLOW_UPDATES)
        self.ema = check_float("ema", ema, min=0.0, max=1.0, max_inclusive=False,
                               fix="pass the weight of the old slow tensors in [0, 1), e.g. 0.25 (official) or 0.999")
        self.consistency_weight = check_float("consistency_weight", consistency_weight, min=0.0,
                                              fix="pass a finite weight >= 0, e.g. 1.0")
        if layers is not None:
            if not isinstance(layers, (list, tuple)) or not layers or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in layers
            ):
                raise TypeError(message("layers", "None or a non-empty list of int layer indices", layers,
                                        "e.g. layers=[-1, -2] for the last two hidden states"))
            layers = list(layers)
        self.layers = layers
        self.inference_learner = check_choice("inference_learner", inference_learner, ("slow", "fast"))
        self.model_attr = check_str("model_attr", model_attr)
        self.adapter = check_str("adapter", adapter)
        self.adapter_dir = check_str("adapter_dir", adapter_dir, allow_none=True)
        self.save_adapters = bool(check_type("save_adapters", save_adapters, bool))
        self.model_forward = ModelForward(forward_fn, owner="ILoRA")
        self.forward_fn = forward_fn
        self._batch_checked = False
        self.optimizer_steps = 0
        self._counter = StepCounter()
        #: slow tensors, by parameter name relative to the PEFT model.
        self._slow: "OrderedDict[str, Tensor]" = OrderedDict()
        #: True while ``_slow`` is the copy ``setup()`` took of the fast adapter: ``on_fit_start`` takes
        #: it again once the strategy has synchronised the weights (DDP broadcasts rank 0's).
        self._slow_fresh = False
        self._pending_slow: Optional[dict[str, Tensor]] = None
        #: The fast learner by adapter-neutral name, from a checkpoint (whose weights hold the slow one).
        self._pending_fast: Optional[dict[str, Tensor]] = None
        self._fast_backup: Optional[dict[str, Tensor]] = None
        self._peft: Optional[nn.Module] = None
        self._swapped: Optional[dict[str, Tensor]] = None
        self._replay: Optional[tuple[Any, Any, Any]] = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(buffer_size=self.buffer_size, seed=self.seed, ema=self.ema)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self._peft is not None and self._pending_slow is None and self._slow:
            # A copy has no model: it keeps the slow tensors by adapter-neutral name, as a checkpoint does.
            state["_pending_slow"] = dict(self.slow_state())
        if self._peft is not None and (self._fast_backup is not None or self._swapped is not None):
            # The adapter holds the slow learner: the fast one travels by name, as in a checkpoint.
            state["_pending_fast"] = self._fast_state()
        state.update({"_peft": None, "_fast_backup": None, "_swapped": None, "_replay": None, "_counter": StepCounter()})
        # Lightning attaches the module's `log`/`log_dict` to every callback; a transformers model
        # with output-capturing hooks does not pickle, and the next fit attaches them again.
        state.pop("log", None)
        state.pop("log_dict", None)
        return state

    # ------------------------------------------------------------------ the model
    def peft_model(self) -> nn.Module:
        if self._peft is None:
            raise RuntimeError("ILoRA has no PEFT model yet: it is set up by `Trainer.fit` (setup()).")
        return self._peft

    def fast_parameters(self) -> "OrderedDict[str, nn.Parameter]":
        """The trained adapter's parameters, by name relative to the PEFT model."""
        return adapter_parameters(self.peft_model(), self.adapter)

    def slow_state(self) -> "OrderedDict[str, Tensor]":
        """The slow learner's tensors keyed by adapter-neutral names (as :func:`~lightning_forget.lora.adapter_state_dict`)."""
        names = neutral_adapter_names(self.peft_model(), self.adapter)
        return OrderedDict((names[k], v.detach().cpu().clone()) for k, v in self._gathered(self._slow).items())

    def _gathered(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Whole tensors of adapter state kept as this rank's shards (a collective under FSDP2: every
        rank calls it; the tensors as they are otherwise)."""
        fast = self.fast_parameters()
        return {k: full_tensor(v, like=fast[k]) for k, v in tensors.items()}

    def _wrap(self, pl_module: "pl.LightningModule") -> None:
        from peft import PeftModel

        backbone = getattr(pl_module, self.model_attr, None)
        if not isinstance(backbone, nn.Module):
            raise RuntimeError(
                f"ILoRA needs the Hugging Face backbone at `{type(pl_module).__name__}.{self.model_attr}`, found "
                f"{type(backbone).__name__}. Fix: pass `model_attr=` naming the attribute that holds it."
            )
        if not isinstance(backbone, PeftModel):
            backbone = add_lora(backbone, self._settings_for(backbone), adapter_name=self.adapter)
            setattr(pl_module, self.model_attr, backbone)
        elif self.adapter not in backbone.peft_config:
            raise RuntimeError(message("adapter", "an adapter of the PEFT backbone", self.adapter,
                                       f"it has {sorted(backbone.peft_config)}"))
        else:
            head = classification_head(backbone.get_base_model())
            saved = backbone.peft_config[self.adapter].modules_to_save or []
            if head is not None and head not in saved:
                rank_zero_warn(
                    f"ILoRA: the PEFT backbone's classification head `{head}` is not in its adapter's "
                    f"modules_to_save, so it stays frozen. Fix: wrap it with modules_to_save=['{head}'] (or let "
                    "ILoRA wrap the plain model: it trains the head by default).", category=UserWarning,
                )
        self._peft = backbone
        _register_output_capture(backbone)
        fast = self.fast_parameters()
        for name, p in fast.items():
            p.requires_grad_(True)
        if not self._slow or set(self._slow) != set(fast):
            self._slow = OrderedDict((name, p.detach().float().clone()) for name, p in fast.items())
            # A fresh adapter is initialised from the global RNG, which may differ by rank here
            # (before DDP broadcasts rank 0's weights): copied again in on_fit_start.
            self._slow_fresh = True

    def _settings_for(self, backbone: nn.Module) -> LoRASettings:
        """``lora``, with a Hugging Face classification head added to ``modules_to_save`` when it is unset
        (PEFT would freeze the head: a fresh one would stay at chance)."""
        settings = self.lora
        head = classification_head(backbone)
        if head is not None and settings.modules_to_save is None:
            rank_zero_info(f"ILoRA: training the classification head `{head}` beside the LoRA (modules_to_save); "
                           "pass lora={'modules_to_save': []} to keep it frozen.")
            settings = dataclasses.replace(settings, modules_to_save=[head])
        try:
            settings.target_names(backbone)
        except (RuntimeError, ValueError) as error:
            raise type(error)(
                f"ILoRA cannot place the LoRA on `{self.model_attr}` ({type(backbone).__name__}): {error} In ILoRA the "
                "target modules are a field of `lora`: ILoRA(lora={'target_modules': [...], 'r': 8, 'alpha': 32})."
            ) from None
        return settings

    def _from_neutral(self, tensors: dict[str, Tensor], learner: str) -> "OrderedDict[str, Tensor]":
        """A checkpoint's adapter tensors (adapter-neutral names) keyed by this model's adapter names."""
        names = neutral_adapter_names(self.peft_model(), self.adapter)
        by_neutral = {names[k]: k for k in self.fast_parameters()}
        missing = sorted(set(by_neutral) - set(tensors))
        if missing:
            raise RuntimeError(
                f"ILoRA: the checkpoint's {learner} adapter lacks {missing[:4]}; it was written with other LoRA "
                "settings. Fix: resume with the checkpoint's `lora` settings."
            )
        fast = self.fast_parameters()
        # Saved whole: under FSDP2 this rank keeps its slice of each (the adapter's own layout).
        return OrderedDict((by_neutral[n], self._local_of(v, fast[by_neutral[n]]).clone())
                           for n, v in tensors.items() if n in by_neutral)

    @staticmethod
    def _local_of(value: Tensor, p: Tensor) -> Tensor:
        """``value`` in ``p``'s local layout: its slice when it is whole and ``p`` is sharded."""
        if is_sharded(p) and tuple(value.shape) == tuple(p.shape) and tuple(value.shape) != tuple(local_view(p).shape):
            return shard_like(value, p)
        return value

    def _sync_device(self) -> None:
        fast = self.fast_parameters()
        if self._pending_slow is not None:
            self._slow = self._from_neutral(self._pending_slow, "slow")
            self._pending_slow = None
            self._slow_fresh = False
        for name, value in self._slow.items():
            # A float32 master copy on the parameters' device: under bf16-true/16-true an increment
            # (1 − λ)·(θ_fast − θ_slow) with λ near 1 is below half precision's resolution.
            p = fast[name]
            value = self._local_of(value, p)  # a copy taken before configure_model sharded the adapter
            if value.device != p.device or value.dtype != torch.float32:
                value = value.to(p.device, torch.float32)
            self._slow[name] = value

    def _fast_state(self) -> Optional[dict[str, Tensor]]:
        """The fast learner's tensors by adapter-neutral name (CPU copies), wherever they are now: in
        the adapter, or kept aside while the slow learner is in it; ``None`` without a model and
        without a pending copy."""
        if self._peft is None:
            return None if self._pending_fast is None else dict(self._pending_fast)
        names = neutral_adapter_names(self.peft_model(), self.adapter)
        held = self._fast_backup if self._fast_backup is not None else self._swapped
        if held is None:
            held = {name: local_view(p).detach() for name, p in self.fast_parameters().items()}
        return {names[k]: v.detach().cpu().clone() for k, v in self._gathered(held).items()}

    def _resolve_pending_fast(self) -> None:
        """A checkpoint's fast learner (its weights hold the slow one): kept aside, loaded back into
        the adapter when training starts (``on_train_start``); evaluations before that use the slow one."""
        if self._pending_fast is None or self._peft is None:
            return
        self._fast_backup = dict(self._from_neutral(self._pending_fast, "fast"))
        self._swapped = None
        self._pending_fast = None

    @torch.no_grad()
    def _load_into_fast(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Copy ``tensors`` into the fast adapter; returns the values it held (shard-wise under FSDP2:
        ``tensors`` and the returned values are this rank's shards)."""
        fast = self.fast_parameters()
        old = {name: local_clone(p) for name, p in fast.items()}
        for name, p in fast.items():
            edit_local(p, lambda local, v: v.to(local.device, local.dtype), tensors[name])
        return old

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._wrap(pl_module)
        self._resolve_pending_fast()
        if stage == "fit" and self.save_adapters and self.adapter_dir is not None and trainer.is_global_zero:
            # Fail now, not after the first task, when the adapters could not be written.
            reporting.ensure_writable_dir(self.adapter_dir, "ILoRA", "the per-task adapter files",
                                          "pass a writable `adapter_dir`, or `save_adapters=False`")
        if stage == "fit":
            self._check_model(pl_module)
            self._batch_checked = False
            hooks = training_step_hooks(pl_module)
            hooks.add_batch_transform(self.state_key, self._slow_forward)
            hooks.add_loss_term(self.state_key, self._replay_terms)

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._sync_device()
        if self._slow_fresh:
            # setup() ran before the strategy synchronised the weights: under DDP each rank's adapter
            # was initialised from its own RNG state, and only rank 0's survived DDP's broadcast.
            self._slow = OrderedDict((name, local_clone(p, dtype=torch.float32))
                                     for name, p in self.fast_parameters().items())
            self._slow_fresh = False
        self._counter.watch(trainer.optimizers)
        self._counter.pop()

    def _check_model(self, pl_module: "pl.LightningModule") -> None:
        """What the replay steps of later tasks need, checked in ``setup`` instead of at task 1."""
        inner = self._hf_model()  # raises when the backbone holds no Hugging Face model
        if inner is not None:
            self.model_forward.check(pl_module)
        hf = inner if inner is not None else self.peft_model().get_base_model()
        count = getattr(getattr(hf, "config", None), "num_hidden_layers", None)
        if self.layers is not None and isinstance(count, int):
            states = count + 1  # the embedding output and every block
            bad = [i for i in self.layers if not -states <= i < states]
            if bad:
                raise ValueError(message(
                    "layers", f"indices of the {states} hidden states of {type(hf).__name__} (embeddings + "
                    f"{count} blocks; negative allowed)", self.layers, "e.g. layers=[-1] for the last one, or None for all"))

    def _check_batch(self, batch: Any) -> None:
        """An image batch for a backbone without ``pixel_values`` would fail only at task 1's first replay."""
        self._batch_checked = True
        import inspect

        split = self.fields.split(batch, require_target=False)
        if "input_ids" in split.fields or self._hf_model() is not None:
            return
        base = self.peft_model().get_base_model()
        try:
            accepted = inspect.signature(base.forward).parameters
        except (TypeError, ValueError):  # pragma: no cover - unusual forwards
            return
        if "pixel_values" not in accepted:  # transformers' **kwargs take no images
            raise RuntimeError(
                f"ILoRA: the batch has no `input_ids` field (its fields: {sorted(split.fields)}), so it would be "
                f"replayed as images (`pixel_values`), which {type(base).__name__} does not take. Fix: serve token "
                "batches as dicts with `input_ids` (and `attention_mask`, `labels`), e.g. "
                "`{'input_ids': ..., 'attention_mask': ...}`, not tuples."
            )

    @override
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        if not self._batch_checked:
            self._check_batch(batch)
        self._counter.watch(trainer.optimizers)

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for _ in range(self._counter.pop()):
            self.optimizer_steps += 1
            self.update_slow()
        from lightning_forget.losses import step_context

        if not step_context(pl_module).skipped:
            self.store(trainer, batch_idx, self._common_width(trainer, self.to_fields(batch)))
        pl_module.log("ilora/buffer_size", float(len(self.buffer)), on_step=True, on_epoch=False)

    def update_slow(self) -> None:
        """One real optimizer step's update of the slow learner: the interpolation with
        ``λ_s = min(1 − 1/(s + 1), λ)`` (``slow_update="ema"``), nothing for ``"frozen"``."""
        if self.slow_update == "frozen":
            return
        # Shard-wise under FSDP2: each rank's slow shard follows its own shard of the adapter.
        fast = {name: local_view(p) for name, p in self.fast_parameters().items()}
        interpolate_(self._slow, fast, ema_coefficient(self.optimizer_steps, self.ema))

    def _common_width(self, trainer: "pl.Trainer", fields: dict[str, Tensor]) -> dict[str, Tensor]:
        """Token fields padded to the longest width over ranks (the buffer gathers rows of one width)."""
        if trainer.world_size <= 1:
            return fields
        from lightning_forget.buffers import pad_rows

        out = dict(fields)
        for key, pad in (self.pad_values or {}).items():
            value = out.get(key)
            if value is None or value.dim() < 2:
                continue
            width = torch.tensor([float(value.shape[1])], device=value.device)
            width = int(trainer.strategy.reduce(width, reduce_op="max"))
            out[key] = pad_rows(value, width, pad)
        return out

    def _swap_in_slow(self) -> None:
        """Evaluate with the slow learner: its tensors into the adapter (the fast ones kept aside)."""
        if self.inference_learner != "slow" or self._peft is None or self._fast_backup is not None or self._swapped is not None:
            return
        self._sync_device()
        if self._slow:
            self._swapped = self._load_into_fast(self._slow)

    def _swap_back(self, trainer: "pl.Trainer") -> None:
        """After an evaluation inside a fit the fast tensors return; after a standalone validate, test
        or predict the slow ones stay in the adapter, as after a fit (the fast ones come back at the
        next ``setup``)."""
        swapped = self._swapped
        if swapped is None:
            return
        self._swapped = None
        if trainer.state.fn == "fit":
            self._load_into_fast(swapped)
        else:
            self._fast_backup = swapped

    @override
    def on_validation_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._swap_in_slow()

    @override
    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._swap_back(trainer)

    @override
    def on_test_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._swap_in_slow()

    @override
    def on_test_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._swap_back(trainer)

    @override
    def on_predict_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._swap_in_slow()

    @override
    def on_predict_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._swap_back(trainer)

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._fast_backup is not None:
            # The adapter holds the slow learner (a previous fit's end, or a checkpoint's weights,
            # which sanity-check validation has just evaluated): training goes on with the fast one,
            # also a pending task end that the protocol runs now.
            self._load_into_fast(self._fast_backup)
            self._fast_backup = None
        # No real step runs between `on_fit_start` and here; ModelParallelStrategy restores a checkpoint
        # in between, and torch.distributed.checkpoint initialises a stateless optimizer (SGD) by calling
        # `step()` at lr 0 (twice): not steps of the fit, so the slow learner must not follow them.
        self._counter.pop()
        super().on_train_start(trainer, pl_module)

    @override
    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]) -> None:
        """With ``inference_learner="slow"`` every checkpoint's weights hold the slow learner in the
        adapter (what ``load_from_checkpoint``, ``validate``/``test`` and the export helpers give: the
        model the fit leaves behind) and the callback state holds the fast one (``"fast"``), which
        a resume puts back into the adapter before training goes on."""
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self.inference_learner != "slow" or self._peft is None or not self._slow:
            return
        self._sync_device()
        saved = checkpoint.get("state_dict")
        if not isinstance(saved, dict):
            return
        keys = {id(p): name for name, p in pl_module.named_parameters()}
        missing = []
        # A full state dict of a sharded module (ModelParallelStrategy(save_distributed_checkpoint=False):
        # rank 0's holds whole tensors, the others' nothing) needs the slow learner gathered on every rank.
        gather = is_sharded(pl_module) and not any(is_sharded(v) for v in saved.values() if isinstance(v, Tensor))
        for name, p in self.fast_parameters().items():
            key = keys.get(id(p))
            slow = self._slow[name].detach()
            if gather and is_sharded(p):
                slow = full_tensor(slow, like=p)
            if key is None or key not in saved:
                missing.append(name)
                continue
            old = saved[key]
            value = local_view(old)
            value = slow.to(value.device, value.dtype).clone()
            # A sharded state dict (FSDP2's DTensors): this rank's slow shard in the weight's layout.
            saved[key] = as_layout(value, old) if is_sharded(old) else value
        if missing and (saved or not is_sharded(pl_module)):
            raise RuntimeError(
                f"ILoRA: the checkpoint's weights have no entry for the adapter tensors {missing[:4]}, so the slow "
                "learner cannot be written into them. Fix: keep the PEFT backbone a submodule of the LightningModule "
                "(its `state_dict` must hold the adapter)."
            )

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_train_end(trainer, pl_module)
        if self.inference_learner == "slow" and self._slow:
            self._fast_backup = self._load_into_fast(self._slow)

    @override
    def on_task_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        super().on_task_end(trainer, pl_module, task)
        if self.save_adapters and self._peft is not None:
            # Gathered on every rank (a collective under FSDP2), written by rank 0. The folder too is
            # found on every rank: `trainer.log_dir` broadcasts rank 0's (a collective under DDP as well).
            fast_state, slow_state = self._fast_state(), self.slow_state()
            folder = self._adapter_folder(trainer)
            if not trainer.is_global_zero:
                return
            files = reporting.output_paths(
                self, folder, {"fast": f"task_{task}_fast.safetensors", "slow": f"task_{task}_slow.safetensors"}
            )
            meta = {"task": int(task), "lora": self.lora.to_dict(), "ema": self.ema, "step": self.optimizer_steps}
            save_adapter_state(fast_state, files["fast"], self.adapter, {**meta, "learner": "fast"})
            save_adapter_state(slow_state, files["slow"], self.adapter, {**meta, "learner": "slow"})
            rank_zero_info(f"ILoRA: adapters of task {task} written to {folder}")

    def _adapter_folder(self, trainer: "pl.Trainer") -> Path:
        if self.adapter_dir is not None:
            return Path(self.adapter_dir)
        checkpoint = trainer.checkpoint_callback
        dirpath = getattr(checkpoint, "dirpath", None)
        if dirpath:
            return Path(dirpath)
        # No checkpoint folder: the run's results folder (reporting's rule: the logger's directory,
        # else default_root_dir), where every other output of the run goes.
        return Path(reporting.results_dir(trainer)) / "adapters"

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        remove_training_step_hooks(pl_module, self.state_key)
        if stage == "fit":
            self._counter.close()

    # ------------------------------------------------------------------ the loss
    def _is_tokens(self, fields: dict[str, Tensor]) -> bool:
        return "input_ids" in fields

    def _model_inputs(self, fields: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
        if self._is_tokens(fields):
            inputs = {"input_ids": fields["input_ids"].to(device)}
            if "attention_mask" in fields:
                inputs["attention_mask"] = fields["attention_mask"].to(device)
            return inputs
        return {"pixel_values": fields[self._input_field].to(device)}

    def _hf_model(self) -> Optional[nn.Module]:
        """The Hugging Face model inside a backbone that is not one itself (``None`` if the backbone is one).

        E.g. :class:`lightning_forget.nn.ViT` holds a ``ViTModel``: its hidden states are read from
        that model while the LightningModule's own forward gives the logits.
        """
        from transformers import PreTrainedModel

        base = self.peft_model().get_base_model()
        if isinstance(base, PreTrainedModel):
            return None
        for module in base.modules():
            if isinstance(module, PreTrainedModel):
                return module
        raise RuntimeError(
            f"ILoRA: the backbone `{self.model_attr}` ({type(base).__name__}) contains no Hugging Face model, so it "
            "has no hidden states for the consistency loss. Fix: use a transformers backbone (e.g. "
            "lightning_forget.nn.ViT or ViTForImageClassification) or point `model_attr` at one."
        )

    def _forward(self, pl_module: "pl.LightningModule", inputs: dict[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        """``(logits, hidden states)`` of the model with the adapter tensors it holds now.

        A Hugging Face backbone (a causal LM, ``ViTForImageClassification``) is called directly with
        ``output_hidden_states=True``. A plain backbone holding one (``ContinualClassifier`` with
        :class:`lightning_forget.nn.ViT`) is run through the LightningModule's ``forward(x)``,
        which must return the logits; the inner model's hidden states are caught by a hook that
        asks it for them.
        """
        inner = self._hf_model() if "pixel_values" in inputs else None
        if inner is None:
            out = self.peft_model()(**inputs, output_hidden_states=True)
            return out.logits, list(out.hidden_states)
        caught: list[Any] = []

        def ask(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return args, {**kwargs, "output_hidden_states": True}

        def catch(module: nn.Module, args: tuple, output: Any) -> None:
            caught.append(output.hidden_states)

        handles = [inner.register_forward_pre_hook(ask, with_kwargs=True), inner.register_forward_hook(catch)]
        try:
            logits = self.model_forward(pl_module, inputs["pixel_values"])
        finally:
            for handle in handles:
                handle.remove()
        if len(caught) != 1 or caught[0] is None:
            raise RuntimeError(
                f"ILoRA: `{type(pl_module).__name__}.forward` ran the backbone's {type(inner).__name__} {len(caught)} "
                "time(s) without hidden states; it must run it once per call. Fix: pass `model_attr=` naming a "
                "backbone that is called once per forward."
            )
        return logits, list(caught[0])

    def _buffer_loss(self, logits: Tensor, fields: dict[str, Tensor]) -> Tensor:
        if self._is_tokens(fields):
            labels = fields.get("labels")
            if labels is None:
                labels = fields["input_ids"]
                if "attention_mask" in fields:
                    labels = labels.masked_fill(fields["attention_mask"] == 0, IGNORE_INDEX)
            return causal_lm_loss(logits, labels.to(logits.device))
        return F.cross_entropy(logits.float(), fields[self._target_field].to(logits.device))

    def _slow_forward(self, pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> Any:
        """Batch transform: draw the replay batch and run the slow learner on it (no gradient).

        It runs before the module's step builds any graph, so the slow tensors can be copied into
        the adapter for the forward and the fast ones copied back after it, bit for bit.
        """
        self._replay = None
        trainer = pl_module.trainer
        if self.current_task(trainer) < 1 or self.buffer.is_empty:
            return batch
        split = self.split(batch)
        names = self._buffer_names(split)
        self._input_field = names[split.input_name]
        self._target_field = names[split.target_name] if split.target_name is not None else "y"
        drawn = self.draw(trainer, batch_idx, self.replay_size(split.size))
        fields = {k: v for k, v in drawn.items() if k not in ("index", TASK_KEY)}
        device = next(iter(self.fast_parameters().values())).device
        inputs = self._model_inputs(fields, device)
        self._sync_device()
        fast = self._load_into_fast(self._slow)
        try:
            with torch.no_grad():
                slow_hidden = [h.detach() for h in self._forward(pl_module, inputs)[1]]
        finally:
            self._load_into_fast(fast)
        self._replay = (fields, inputs, slow_hidden)
        return batch

    def _replay_terms(self, pl_module: "pl.LightningModule", batch: Any, batch_idx: int, output: Any) -> Optional[Tensor]:
        """Loss term: ``(L_buf - L_cur)/2 + γ·L_cons`` from the fast learner's forward on the replay batch."""
        if self._replay is None:
            return None
        fields, inputs, slow_hidden = self._replay
        self._replay = None
        logits, fast_hidden = self._forward(pl_module, inputs)
        mask = inputs.get("attention_mask")
        consistency = hidden_consistency_loss(fast_hidden, slow_hidden, mask=mask, layers=self.layers)
        buffer_loss = self._buffer_loss(logits, fields)
        current = output_loss(output)
        rows = int(inputs[next(iter(inputs))].shape[0])
        pl_module.log("ilora/buffer_loss", buffer_loss.detach(), on_step=True, on_epoch=False, batch_size=rows)
        pl_module.log("ilora/consistency", consistency.detach(), on_step=True, on_epoch=False, batch_size=rows)
        # The step's loss is L_cur; adding (L_buf - L_cur)/2 makes the total (L_cur + L_buf)/2.
        return (buffer_loss - current) / 2 + self.consistency_weight * consistency

    # ------------------------------------------------------------------ state
    @override
    def method_state(self) -> dict[str, Any]:
        state = super().method_state()
        if self._peft is not None and self._pending_slow is None:
            slow = dict(self.slow_state())
        else:
            slow = dict(self._pending_slow or {})
        fast = self._fast_state() if self.inference_learner == "slow" else None
        state.update({"slow": slow, "fast": fast, "optimizer_steps": int(self.optimizer_steps)})
        return state

    @override
    def load_method_state(self, state: dict[str, Any]) -> None:
        buffer_state = {k: state[k] for k in ("buffer", "update", "task_first_epoch", "pass")}
        super().load_method_state(buffer_state)
        self.optimizer_steps = int(state["optimizer_steps"])
        self._pending_slow = {k: v.clone() for k, v in state["slow"].items()}
        self._slow_fresh = False  # the slow learner comes from the checkpoint
        fast = state.get("fast")  # absent in checkpoints written before the weights held the slow learner
        self._pending_fast = None if fast is None else {k: v.clone() for k, v in fast.items()}
        if self._peft is not None:
            self._sync_device()
            self._resolve_pending_fast()
