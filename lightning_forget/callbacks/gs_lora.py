"""``GSLoRA``: continual forgetting with group-sparse LoRA (GS-LoRA and GS-LoRA++).

Zhao et al., "Continual Forgetting for Pre-trained Vision Models" (CVPR 2024) and "Practical
Continual Forgetting for Pre-trained Vision Models" (T-PAMI; GS-LoRA++ with prototypes).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_forget.batch import BatchFields, stream_names
from lightning_forget.forward import ModelForward
from lightning_forget.lora import LoRASettings, add_delta_to_base, find_blocks
from lightning_forget.losses import remove_training_step_hooks, training_step_hooks
from lightning_forget.precision import forward_context
from lightning_forget.sharding import (
    as_layout,
    edit_local,
    full_tensor,
    global_norms,
    global_slice,
    is_sharded,
    local_view,
    shard_like,
    sum_of_squares,
)
from lightning_forget.tasks import DDP_STRATEGIES, SHARDED_STRATEGIES, ContinualCallback
from lightning_forget.validation import check_bool, check_choice, check_float, check_int, check_str, message

__all__ = ["GSLoRA", "group_norms", "group_sparsity", "lora_layers", "prototype_distance"]

Grouping = Literal["block", "lora", "matrix"]
PrototypeSpace = Literal["features", "logits"]
ADAPTER = "default"
#: Kaiming-uniform ``a`` of ``A`` for the first task's LoRA (``loralib.Linear``'s own initialisation,
#: which the official code's first task uses) and for the LoRA re-initialised after each merge
#: (the official ``reinitialize_lora_parameters``, tasks >= 1).
KAIMING_A_FIRST = math.sqrt(5)
KAIMING_A_LATER = math.sqrt(50)


def lora_layers(module: nn.Module, adapter: str = ADAPTER) -> "OrderedDict[str, nn.Module]":
    """``{full name: PEFT LoRA layer}`` of the layers of ``module`` that carry adapter ``adapter``."""
    from peft.tuners.lora import LoraLayer

    return OrderedDict(
        (name, m) for name, m in module.named_modules() if isinstance(m, LoraLayer) and adapter in getattr(m, "lora_A", {})
    )


def group_sparsity(groups: list[list[Tensor]], eps: float = 1e-8) -> Tensor:
    """The group-lasso value ``Σ_g sqrt(Σ_{M ∈ g} ‖M‖_F² + eps)`` (differentiable)."""
    total = None
    for group in groups:
        sq = sum((m.float() ** 2).sum() for m in group)
        value = torch.sqrt(sq + eps)  # type: ignore[arg-type]
        total = value if total is None else total + value
    return total if total is not None else torch.zeros(())


def group_norms(groups: list[list[Tensor]]) -> list[float]:
    """Per group, the sum of its matrices' Frobenius norms ``Σ_{M ∈ g} ‖M‖_F``.

    This is the quantity the official code logs per block at each task's end (``util/cal_norm.py``,
    ``type="L2"``); it is zero exactly when every factor of the group is zero. (The penalty itself
    uses ``sqrt(Σ ‖M‖_F²)``, see :func:`group_sparsity`.)
    """
    return [float(sum(float(m.detach().float().norm()) for m in group)) for group in groups]


def prototype_distance(features: Tensor, prototypes: Tensor) -> Tensor:
    """Batch mean of ``KL(softmax(p_i) ‖ softmax(f_i))`` over rows ``f_i`` of ``features`` and ``p_i`` of
    ``prototypes`` (the official ``get_prototype_loss`` with ``distance="kl"``), in float32."""
    p_log = F.log_softmax(prototypes.float(), dim=-1)
    q_log = F.log_softmax(features.float(), dim=-1)
    return (p_log.exp() * (p_log - q_log)).sum(-1).mean()


def _block_of(name: str, block_names: list[str]) -> Optional[str]:
    for block in block_names:
        if name.startswith(block + "."):
            return block
    return None


class GSLoRA(ContinualCallback):
    """GS-LoRA: erase class sets task after task with group-sparse LoRA on the FFN linears; GS-LoRA++ adds prototypes.

    Mechanism:

    - ``setup()`` puts a PEFT LoRA adapter (rank ``r``, scale ``lora_alpha / r``) on the target
      linears of the LightningModule, in place (``peft.inject_adapter_in_model``: no wrapper, the
      module's own forward is unchanged), and freezes every other parameter (the head too). It
      runs once, before the optimizers exist; the LoRA is re-initialised in place after every
      task's merge, so DDP is never re-wrapped. ``A`` is Kaiming-uniform from a generator seeded by
      ``(seed, task)``, the same on every rank, with ``a = √5`` for the first task (``loralib``'s
      own initialisation) and ``a = √50`` for the LoRA started after each merge (the official
      ``reinitialize_lora_parameters``); ``B = 0``, so a fresh LoRA has no effect.
    - Training batches are two-stream dicts ``{"forget": ..., "retain": ...}`` (as
      :class:`~lightning_forget.datamodules.ForgetRetainDataModule` serves them). A batch
      transform hands the *retain* stream to the module's own ``training_step`` (its loss is the
      retain cross-entropy ``L_r``) and keeps the forget stream; a loss term then adds, in the
      same DDP-reduced step, ``β·ReLU(BND − CE(f(x_f), y_f))`` (bounded gradient ascent: no
      gradient once the forget CE passes ``bound``) and, with ``prototype=True`` (GS-LoRA++),
      ``w_f·ReLU(BND_pro − D_f) + w_r·D_r`` with ``D = KL(softmax(P_y) ‖ softmax(f(x)))``, where
      ``f(x)`` is the feature that feeds the classification head (the official code's embedding:
      the input of the module whose output is the logits, found by running the model, or the
      module named by ``prototype_head``; ``prototype_space="logits"`` uses the logits) and
      ``P_c`` the per-class mean feature of the pre-task model, computed at task start over the
      task's forget and retain training sets, each sample counted once, and kept in the
      callback state.
    - The group-sparse term ``α·Σ_g sqrt(Σ_{M∈g} ‖M‖_F² + eps)`` over the raw LoRA factors (one
      group per block with ``grouping="block"``; per LoRA pair ``"lora"``; per matrix
      ``"matrix"``) is a parameter-only penalty: its gradient ``α·M/‖g‖`` is added in
      ``on_before_optimizer_step``, after DDP's reduction, identically on every rank. ``α`` is 0
      during the first ``alpha_warmup_epochs`` epochs of each task.
    - At task end every LoRA layer is merged, ``W += scale·B·A`` (under ``no_grad``), the
      merged ``ΔW`` of each layer is kept in :attr:`deltas` (CPU; :meth:`undo` subtracts one
      task's), the blocks whose ``‖ΔW‖_F / ‖W‖_F`` exceed ``zero_tol`` are counted, each group's
      norm ``Σ_{M∈g} ‖M‖_F`` before the merge (the official ``cal_norm`` quantity: exactly 0 for
      a block the penalty switched off) is kept in :attr:`group_norms`, and the LoRA is
      re-initialised and its optimizer state dropped for the next task. With AdamW at a constant
      LR a switched-off block's factors hover at Adam's noise floor (about the LR) rather than at
      0, so its ``‖ΔW‖/‖W‖`` may pass ``zero_tol``: read the group norms beside the count.

    Args:
        r: LoRA rank (default 8, the official scripts').
        lora_alpha: PEFT's ``lora_alpha``; the update is scaled by ``lora_alpha / r`` (default 1,
            ``loralib``'s default used by the official code: scale 1/8).
        target_modules: ``None`` finds the two FFN linears of every Transformer block by structure
            (transformers ViT/BERT/GPT-2/Llama, timm ``blocks.N.mlp.fc1/fc2``); otherwise a regular
            expression or a list of names/suffixes of linear layers (any model, e.g. a CNN's
            ``["fc1", "fc2"]``).
        grouping: ``"block"`` (default, the paper's), ``"lora"`` or ``"matrix"``. Targets outside
            any Transformer block form one group each under ``"block"``.
        alpha: weight of the group-sparse term (default 1e-4, the official continual script).
        alpha_warmup_epochs: epochs per task with ``α = 0`` (default 0: the continual script does
            not warm up; the single-step script uses 20).
        beta: weight of the bounded forgetting loss (default 0.2, the first entry of the official
            continual ``cl_beta_list``); a list gives one value per task (the last one repeats).
        bound: ``BND`` of ``ReLU(BND − CE)`` (default 10, the default of the official
            ``util/args.py``; the scripts' 105 is on a CosFace-logit scale — re-tune it for your
            head, e.g. a few times ``ln(num_classes)`` for a softmax head).
        prototype: add GS-LoRA++'s prototype losses.
        prototype_forget_weight: ``w_f`` (default 0.01, the continual script's ``cl_prof_list``);
            a list gives one per task.
        prototype_retain_weight: ``w_r`` (default 0, the scripts' ``pro_r_weight``).
        prototype_bound: ``BND_pro`` (default 18, the official default).
        prototype_space: ``"features"`` (default, official: the input of the classification
            head) or ``"logits"`` (the model's output; on a softmax head the KL on logits nearly
            duplicates the bounded forgetting loss).
        prototype_head: name of the head module (as in ``pl_module.named_modules()``, e.g.
            ``"head"`` or ``"vit.classifier"``) whose input is the feature; ``None`` (default)
            finds the module whose output is the logits by running the model once.
        eps: added inside each group's square root (ours, 1e-8: the gradient at an all-zero group).
        zero_tol: a block counts as edited when ``‖ΔW‖_F / ‖W‖_F > zero_tol`` (ours, 1e-3).
        keep_deltas: keep each task's merged ``ΔW`` (CPU copies, saved in checkpoints).
        forget_stream: key of the forget stream in a two-stream batch (default ``"forget"``).
        retain_stream: key of the retain stream (default ``"retain"``).
        input_key: the input field of each stream's sub-batch (see
            :class:`~lightning_forget.batch.BatchFields`; ``None`` finds it).
        target_key: the target field of each stream's sub-batch (``None`` finds it).
        seed: seed of the LoRA initialisation (shared by all ranks).
        pretrained_ckpt: weights of the model to unlearn (a Lightning checkpoint or a state dict,
            e.g. the last checkpoint of a ``ForgetRetainDataModule(joint=True)`` run), loaded into
            the LightningModule at the start of a fresh fit, before the LoRA is added; ``None``
            unlearns the module as it is. A resumed fit restores its own checkpoint instead.
        forward_fn: the module's logits function for the forget-stream forward: ``None`` for its
            ``forward``, or a submodule or method name (``"net"``) for a module without one (see
            :class:`~lightning_forget.forward.ModelForward`).

    Logged metrics (per step, ``on_step``; ``gs_lora/nonzero_blocks`` at task end):
        ``gs_lora/forget_ce`` (CE on the forget batch), ``gs_lora/forget_loss`` (``β·ReLU(BND−CE)``),
        ``gs_lora/structure`` (the group-sparse value, unweighted), ``gs_lora/alpha``,
        ``gs_lora/prototype_loss`` (GS-LoRA++), ``gs_lora/nonzero_blocks`` (fraction of blocks edited
        by the task's merged LoRA), ``gs_lora/group_norm/<group>`` (each group's ``Σ‖M‖_F`` before
        the merge).

    Raises:
        ValueError, TypeError: bad arguments (at construction); a batch that is not a two-stream
            dict naming ``forget_stream`` (first step); no target layer found (``setup``).
        RuntimeError: the module has no ``forward`` and no ``forward_fn`` (``setup``).

    Note:
        Saved state: ``prototypes`` (``{class: mean feature}``), ``deltas`` (per task
        ``{layer: ΔW}``), ``nonzero`` (per task, the edited blocks), ``group_norms`` (per task,
        ``{group: Σ‖M‖_F}``), ``version``.
        Supported strategies: single device, DDP (every start method) and ``ModelParallelStrategy``
        (FSDP2, data parallel): group norms over all shards, the merge and the kept ``ΔW`` shard-wise
        (LoRA on ``nn.Linear`` or transformers' ``Conv1D`` layers; ``deltas`` in the state are whole
        tensors, gathered on every rank); see docs/sharding.md.
        The optimizer's LR scheduler is not reset at a task boundary (only the LoRA's optimizer
        state): use one schedule per task by one fit per task when that matters.
    """

    supported_strategies = DDP_STRATEGIES + SHARDED_STRATEGIES
    STATE_VERSION = 2
    #: Constructor arguments whose change a resume refuses (see ContinualCallback.state_arguments).
    state_arguments: tuple[str, ...] = ('r', 'lora_alpha', 'target_modules', 'grouping', 'pretrained_ckpt',
                                        'prototype_space', 'prototype_head')
    #: Whether the task end edits weights (then it runs inside tasks.atomic_edit).
    task_end_edits_weights = True

    def __init__(
        self,
        r: int = 8,
        lora_alpha: float = 1.0,
        target_modules: Optional[Union[str, list[str]]] = None,
        grouping: Grouping = "block",
        alpha: float = 1e-4,
        alpha_warmup_epochs: int = 0,
        beta: Union[float, list[float]] = 0.2,
        bound: float = 10.0,
        prototype: bool = False,
        prototype_forget_weight: Union[float, list[float]] = 0.01,
        prototype_retain_weight: float = 0.0,
        prototype_bound: float = 18.0,
        prototype_space: PrototypeSpace = "features",
        prototype_head: Optional[str] = None,
        eps: float = 1e-8,
        zero_tol: float = 1e-3,
        keep_deltas: bool = True,
        forget_stream: str = "forget",
        retain_stream: str = "retain",
        input_key: Optional[Union[str, int]] = None,
        target_key: Optional[Union[str, int]] = None,
        seed: int = 0,
        pretrained_ckpt: Optional[str] = None,
        forward_fn: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.settings = LoRASettings(r=r, alpha=lora_alpha, target_modules=target_modules, kind="ffn")
        self.grouping = check_choice("grouping", grouping, ("block", "lora", "matrix"))
        self.alpha = check_float("alpha", alpha, min=0)
        self.alpha_warmup_epochs = check_int("alpha_warmup_epochs", alpha_warmup_epochs, min=0)
        self.beta = self._per_task("beta", beta)
        self.bound = check_float("bound", bound, min=0)
        self.prototype = check_bool("prototype", prototype)
        self.prototype_forget_weight = self._per_task("prototype_forget_weight", prototype_forget_weight)
        self.prototype_retain_weight = check_float("prototype_retain_weight", prototype_retain_weight, min=0)
        self.prototype_bound = check_float("prototype_bound", prototype_bound, min=0)
        self.prototype_space = check_choice("prototype_space", prototype_space, ("features", "logits"))
        self.prototype_head = check_str("prototype_head", prototype_head, allow_none=True)
        self.eps = check_float("eps", eps, min=0, min_inclusive=False, fix="pass a small positive number, e.g. eps=1e-8")
        self.zero_tol = check_float("zero_tol", zero_tol, min=0)
        self.keep_deltas = check_bool("keep_deltas", keep_deltas)
        self.forget_stream = check_str("forget_stream", forget_stream)
        self.retain_stream = check_str("retain_stream", retain_stream)
        self.seed = check_int("seed", seed)
        self.pretrained_ckpt = check_str("pretrained_ckpt", pretrained_ckpt, allow_none=True)
        self.fields = BatchFields(input_key, target_key, owner="GSLoRA")
        self.model_forward = ModelForward(forward_fn, owner="GSLoRA")
        self.forward_fn = forward_fn
        self.prototypes: dict[int, Tensor] = {}
        self.deltas: list[dict[str, Tensor]] = []
        self.nonzero: list[list[str]] = []
        self.group_norms: list[dict[str, float]] = []
        self._head_name: Optional[str] = None
        self._groups: list[list[str]] = []
        self._group_names: list[str] = []
        self._forget_batch: Any = None
        self._retain_batch: Any = None
        self._module: Optional[pl.LightningModule] = None

    @staticmethod
    def _per_task(name: str, value: Union[float, list[float]]) -> list[float]:
        if isinstance(value, (list, tuple)):
            if not value:
                raise ValueError(message(name, "a number >= 0 or a non-empty list of them (one per task)", value))
            return [float(check_float(f"{name}[{i}]", v, min=0)) for i, v in enumerate(value)]
        return [float(check_float(name, value, min=0))]

    @staticmethod
    def _of_task(values: list[float], task: int) -> float:
        return values[min(task, len(values) - 1)]

    @property
    def state_key(self) -> str:
        return self._generate_state_key(r=self.settings.r, grouping=self.grouping, prototype=self.prototype)

    # ------------------------------------------------------------------ LoRA
    def _inject(self, pl_module: pl.LightningModule) -> None:
        from peft import inject_adapter_in_model

        if not lora_layers(pl_module):
            config = self.settings.lora_config(pl_module)
            # PEFT takes a `_device_mesh` attribute for a transformers model's tensor-parallel mesh and
            # then reads `model.config`; a LightningModule under ModelParallelStrategy has that attribute
            # (its data-parallel mesh) and no `config`: the injection would fail. It needs no mesh here
            # (configure_model shards the LoRA layers afterwards), so it is hidden while PEFT injects.
            had, mesh = "_device_mesh" in pl_module.__dict__, pl_module.__dict__.get("_device_mesh")
            pl_module.__dict__["_device_mesh"] = None
            try:
                inject_adapter_in_model(config, pl_module, adapter_name=ADAPTER)
            finally:
                if had:
                    pl_module.__dict__["_device_mesh"] = mesh
                else:
                    del pl_module.__dict__["_device_mesh"]
        layers = lora_layers(pl_module)
        for name, p in pl_module.named_parameters():
            p.requires_grad_(".lora_A." in name or ".lora_B." in name)
        self._build_groups(pl_module, layers)

    def _build_groups(self, pl_module: nn.Module, layers: "OrderedDict[str, nn.Module]") -> None:
        try:
            block_names = [name for name, _ in find_blocks(pl_module)]
        except RuntimeError:
            block_names = []
        groups: "OrderedDict[str, list[str]]" = OrderedDict()
        for name in layers:
            a, b = f"{name}.lora_A.{ADAPTER}.weight", f"{name}.lora_B.{ADAPTER}.weight"
            if self.grouping == "block":
                groups.setdefault(_block_of(name, block_names) or name, []).extend([a, b])
            elif self.grouping == "lora":
                groups[name] = [a, b]
            else:
                groups[a], groups[b] = [a], [b]
        self._group_names = list(groups)
        self._groups = list(groups.values())

    def _block_names(self, layers: "OrderedDict[str, nn.Module]", pl_module: nn.Module) -> dict[str, str]:
        try:
            blocks = [name for name, _ in find_blocks(pl_module)]
        except RuntimeError:
            blocks = []
        return {name: _block_of(name, blocks) or name for name in layers}

    def reset_lora(self, pl_module: nn.Module, task: int) -> None:
        """Re-initialise every LoRA layer in place for ``task``: ``A`` Kaiming-uniform from ``(seed, task)``
        with ``a = √5`` for task 0 and ``a = √50`` after (as the official code), ``B = 0``."""
        generator = torch.Generator().manual_seed(self.seed * 100_003 + task)
        gain = KAIMING_A_FIRST if task == 0 else KAIMING_A_LATER
        with torch.no_grad():
            for layer in lora_layers(pl_module).values():
                a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
                # The full draw on every rank (the generator advances as unsharded), each rank keeps its slice.
                fresh = torch.empty(tuple(a.shape), dtype=torch.float32)
                nn.init.kaiming_uniform_(fresh, a=gain, generator=generator)
                edit_local(a, lambda local, v: v.to(local.device, local.dtype), fresh[global_slice(a)])
                local_view(b).zero_()

    def _reset_optimizer_state(self, trainer: "pl.Trainer", pl_module: nn.Module) -> None:
        params = {id(p) for n, p in pl_module.named_parameters() if ".lora_A." in n or ".lora_B." in n}
        for optimizer in trainer.optimizers:
            for p in list(optimizer.state):
                if id(p) in params:
                    del optimizer.state[p]

    def merge(self, pl_module: nn.Module) -> dict[str, Tensor]:
        """``W += scale·B·A`` for every LoRA layer; returns ``{layer: ΔW}`` (CPU copies).

        Under FSDP2 shard-wise: each rank adds, and returns, the block of ``ΔW`` its shard of ``W``
        holds, from the whole factors (``A``, ``B``: adapter-sized, gathered one layer at a time).
        """
        merged: dict[str, Tensor] = {}
        with torch.no_grad():
            for name, layer in lora_layers(pl_module).items():
                merged[name] = add_delta_to_base(layer, ADAPTER, "GSLoRA").detach().cpu().clone()
        return merged

    def undo(self, pl_module: nn.Module, task: int) -> None:
        """Subtract task ``task``'s merged ``ΔW`` from the base weights (needs ``keep_deltas``)."""
        if not 0 <= task < len(self.deltas) or not self.deltas[task]:
            raise ValueError(message("task", f"a task whose merged delta is kept (0..{len(self.deltas) - 1})", task,
                                     "construct GSLoRA(keep_deltas=True)"))
        layers = lora_layers(pl_module)
        with torch.no_grad():
            for name, delta in self.deltas[task].items():
                weight = layers[name].get_base_layer().weight
                delta = self._local_of(delta, weight)
                edit_local(weight, lambda local, d: local - d.to(local.device, local.dtype), delta)

    @staticmethod
    def _local_of(value: Tensor, weight: Tensor) -> Tensor:
        """A kept ``ΔW`` in ``weight``'s local layout (its slice when it was restored whole)."""
        if is_sharded(weight) and tuple(value.shape) == tuple(weight.shape) != tuple(local_view(weight).shape):
            return shard_like(value, weight)
        return value

    def lora_parameters(self, pl_module: nn.Module) -> "OrderedDict[str, nn.Parameter]":
        """``{name: parameter}`` of the LoRA factors (the only trainable parameters)."""
        return OrderedDict((n, p) for n, p in pl_module.named_parameters() if ".lora_A." in n or ".lora_B." in n)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            # validate/test/predict with `ckpt_path` of a GS-LoRA run: the module needs the LoRA
            # layers to load that checkpoint (their values come from it).
            if not lora_layers(pl_module):
                self._inject(pl_module)
            return
        self.model_forward.check(pl_module)
        fresh = not lora_layers(pl_module)
        if fresh and self.pretrained_ckpt is not None:
            self._load_pretrained(pl_module)
        self._inject(pl_module)
        if fresh:
            self.reset_lora(pl_module, self._started + 1)
        self._module = pl_module
        self._head_name = None
        hooks = training_step_hooks(pl_module)
        hooks.add_batch_transform(self.state_key, self._split_streams)
        hooks.add_loss_term(self.state_key, self._forget_terms)

    def _load_pretrained(self, pl_module: "pl.LightningModule") -> None:
        from lightning_forget.unlearning.reference import load_pretrained

        load_pretrained(pl_module, str(self.pretrained_ckpt), "GSLoRA")

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        remove_training_step_hooks(pl_module, self.state_key)
        self._forget_batch = self._retain_batch = None

    def current_alpha(self, trainer: "pl.Trainer") -> float:
        """``α`` of the current epoch (0 during the warm-up epochs of a task)."""
        if self.alpha_warmup_epochs == 0:
            return self.alpha
        from lightning_forget.tasks import task_schedule

        schedule = task_schedule(trainer)
        epoch_in_task = trainer.current_epoch % schedule.epochs_per_task if schedule is not None else trainer.current_epoch
        return 0.0 if epoch_in_task < self.alpha_warmup_epochs else self.alpha

    def on_task_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        if self.prototype:
            self.prototypes = self._compute_prototypes(trainer, pl_module)

    def current_group_norms(self, pl_module: nn.Module) -> "OrderedDict[str, float]":
        """``{group: Σ_{M∈g} ‖M‖_F}`` of the LoRA as it is now (see :func:`group_norms`)."""
        params = dict(pl_module.named_parameters())
        if not is_sharded(pl_module):
            values = group_norms([[params[n] for n in group] for group in self._groups])
            return OrderedDict(zip(self._group_names, values))
        # Each matrix's norm over all its shards (one collective for all of them).
        norms = global_norms({n: params[n] for group in self._groups for n in group})
        return OrderedDict((g, float(sum(float(norms[n]) for n in group))) for g, group in zip(self._group_names, self._groups))

    def on_task_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        layers = lora_layers(pl_module)
        blocks = self._block_names(layers, pl_module)
        norms_before_merge = self.current_group_norms(pl_module)
        merged = self.merge(pl_module)
        norms: dict[str, list[float]] = {}
        if is_sharded(pl_module):  # ‖ΔW‖ and ‖W‖ of the whole tensors from the local blocks
            weights = {name: layers[name].get_base_layer().weight for name in merged}
            delta_norms = global_norms({name: as_layout(d, weights[name]) for name, d in merged.items()})
            weight_norms = global_norms(weights)
            ratios = {name: float(delta_norms[name] / weight_norms[name].clamp_min(1e-12)) for name in merged}
        else:
            ratios = {}
            for name, delta in merged.items():
                weight = layers[name].get_base_layer().weight.detach().float().cpu()
                ratios[name] = float(delta.float().norm() / weight.norm().clamp_min(1e-12))
        for name, ratio in ratios.items():
            norms.setdefault(blocks[name], []).append(ratio)
        edited = [block for block, values in norms.items() if max(values) > self.zero_tol]
        self.nonzero.append(edited)
        self.group_norms.append(dict(norms_before_merge))
        self.deltas.append(merged if self.keep_deltas else {})
        fraction = len(edited) / max(1, len(norms))
        shown = ", ".join(f"{name}: {value:.3g}" for name, value in norms_before_merge.items())
        rank_zero_info(f"GSLoRA task {task}: LoRA merged; {len(edited)}/{len(norms)} blocks edited: {edited}; "
                       f"group norms (sum of ‖A‖, ‖B‖) {{{shown}}}")
        if not self._stopped_inside_task:
            pl_module.log("gs_lora/nonzero_blocks", fraction, rank_zero_only=True)
            for name, value in norms_before_merge.items():
                pl_module.log(f"gs_lora/group_norm/{name}", value, rank_zero_only=True)
        self.reset_lora(pl_module, task + 1)
        self._reset_optimizer_state(trainer, pl_module)

    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Any) -> None:
        alpha = self.current_alpha(trainer)
        params = dict(pl_module.named_parameters())
        if is_sharded(pl_module):
            self._sharded_sparsity_step(params, alpha)
            return
        with torch.no_grad():
            groups = [[params[n] for n in group] for group in self._groups]
            value = group_sparsity(groups, self.eps)
            if alpha > 0:
                for group in groups:
                    norm = torch.sqrt(sum((p.float() ** 2).sum() for p in group) + self.eps)  # type: ignore[arg-type]
                    for p in group:
                        step = (alpha * p / norm).to(p.dtype)
                        if p.grad is None:
                            p.grad = step.clone()
                        else:
                            p.grad.add_(step)
        pl_module.log("gs_lora/structure", float(value), on_step=True, on_epoch=False)
        pl_module.log("gs_lora/alpha", alpha, on_step=True, on_epoch=False)

    @torch.no_grad()
    def _sharded_sparsity_step(self, params: dict[str, Tensor], alpha: float) -> None:
        """``on_before_optimizer_step`` under FSDP2: each group's ``sqrt(Σ‖M‖² + eps)`` over all shards
        (one collective), the gradient ``α·M/‖g‖`` added to each rank's shard of the gradient."""
        squares = sum_of_squares({n: params[n] for group in self._groups for n in group})
        norms = [torch.sqrt(sum(squares[n] for n in group) + self.eps) for group in self._groups]
        if alpha > 0:
            for group, norm in zip(self._groups, norms):
                for name in group:
                    p = params[name]
                    local = local_view(p)
                    step = (alpha * local.double() / norm).to(local.dtype)
                    if p.grad is None:
                        p.grad = as_layout(step.clone(), p)
                    else:
                        local_view(p.grad).add_(step)
        value = float(sum(float(n) for n in norms)) if norms else 0.0
        module = self._module
        if module is not None:
            module.log("gs_lora/structure", value, on_step=True, on_epoch=False)
            module.log("gs_lora/alpha", alpha, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ the step
    def _split_streams(self, pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> Any:
        names = stream_names(batch)
        if self.forget_stream not in names:
            raise ValueError(
                f"GSLoRA needs two-stream batches {{{self.forget_stream!r}: ..., {self.retain_stream!r}: ...}} "
                f"(e.g. from ForgetRetainDataModule), got a batch with streams {names or 'none'}. Fix: serve "
                "such batches, or set `forget_stream`/`retain_stream` to your keys."
            )
        self._forget_batch = batch[self.forget_stream]
        self._retain_batch = batch.get(self.retain_stream)
        if self._retain_batch is None:
            raise ValueError(f"GSLoRA: the batch has no {self.retain_stream!r} stream (streams: {names}); set `retain_stream`.")
        return self._retain_batch

    def _forget_terms(self, pl_module: "pl.LightningModule", batch: Any, batch_idx: int, output: Any) -> Optional[Tensor]:
        trainer = pl_module.trainer
        task = self.current_task(trainer)
        split = self.fields.split(self._forget_batch)
        with forward_context(trainer):
            logits, features = self._run(pl_module, split.input)
        ce = F.cross_entropy(logits.float(), split.target)
        beta = self._of_task(self.beta, task)
        loss = beta * F.relu(self.bound - ce)
        pl_module.log("gs_lora/forget_ce", ce.detach(), on_step=True, on_epoch=False)
        pl_module.log("gs_lora/forget_loss", loss.detach(), on_step=True, on_epoch=False)
        if self.prototype and self.prototypes:
            w_f = self._of_task(self.prototype_forget_weight, task)
            proto = w_f * F.relu(self.prototype_bound - self._prototype_distance(features, split.target))
            if self.prototype_retain_weight > 0:
                retain = self.fields.split(self._retain_batch)
                with forward_context(trainer):
                    retain_logits, retain_features = self._run(pl_module, retain.input)
                proto = proto + self.prototype_retain_weight * self._prototype_distance(retain_features, retain.target)
                if is_sharded(pl_module):
                    # FSDP2 gathers a unit's weights for the backward when the gradient reaches the unit's
                    # output: a loss on the head's input alone (the logits unused) would run the backward of
                    # the layers before the head (a final norm in the head's unit) on freed weights. The
                    # logits join the graph at weight zero (no change to any gradient).
                    proto = proto + 0.0 * retain_logits.float().sum()
            pl_module.log("gs_lora/prototype_loss", proto.detach(), on_step=True, on_epoch=False)
            loss = loss + proto
        return loss

    def _prototype_distance(self, features: Tensor, target: Tensor) -> Tensor:
        """Batch mean of ``KL(softmax(P_y) ‖ softmax(features))`` (rows of unknown classes skipped)."""
        known = torch.tensor([int(t) in self.prototypes for t in target.tolist()], device=features.device)
        if not known.any():
            return features.sum() * 0.0
        protos = torch.stack([self.prototypes[int(t)] for t in target[known].tolist()]).to(features.device)
        return prototype_distance(features[known], protos)

    # ------------------------------------------------------------------ features
    def _run(self, pl_module: "pl.LightningModule", x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """``(logits, prototype feature)`` of one forward of ``pl_module`` on ``x``.

        The feature is ``None`` without ``prototype``; the logits with ``prototype_space="logits"``;
        otherwise the input of the head module (caught by a forward hook).
        """
        if not self.prototype or self.prototype_space == "logits":
            logits = self.model_forward(pl_module, x)
            return logits, logits if self.prototype else None
        head = self._head(pl_module, x)
        caught: list[Tensor] = []

        def catch(module: nn.Module, args: tuple) -> None:
            caught.append(args[0])

        handle = head.register_forward_pre_hook(catch)
        try:
            logits = self.model_forward(pl_module, x)
        finally:
            handle.remove()
        if len(caught) != 1 or not isinstance(caught[0], Tensor):
            raise RuntimeError(
                f"GSLoRA: the head `{self._head_name}` ran {len(caught)} time(s) in one forward (or without a tensor "
                "input); its input cannot be the prototype feature. Fix: pass `prototype_head=` naming the module "
                "that maps the embedding to the logits, or prototype_space='logits'."
            )
        return logits, caught[0].flatten(1)

    def _head(self, pl_module: "pl.LightningModule", x: Tensor) -> nn.Module:
        """The head module: ``prototype_head``, or the innermost module whose output is the logits."""
        modules = dict(pl_module.named_modules())
        if self._head_name is None and self.prototype_head is not None:
            if self.prototype_head not in modules:
                linear = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
                raise RuntimeError(message("prototype_head", "the name of a module of the LightningModule",
                                           self.prototype_head, f"its linear layers are {linear[:12]}"))
            self._head_name = self.prototype_head
        if self._head_name is None:
            self._head_name = self._find_head(pl_module, x)
            rank_zero_info(f"GSLoRA: prototypes on the input of `{self._head_name}` (the module producing the logits)")
        return modules[self._head_name]

    @torch.no_grad()
    def _find_head(self, pl_module: "pl.LightningModule", x: Tensor) -> str:
        outputs: list[tuple[str, Any]] = []
        handles = [
            module.register_forward_hook(lambda m, a, out, name=name: outputs.append((name, out)))
            for name, module in pl_module.named_modules() if name
        ]
        was_training = pl_module.training
        pl_module.eval()
        try:
            logits = self.model_forward(pl_module, x)
        finally:
            pl_module.train(was_training)
            for handle in handles:
                handle.remove()
        for name, out in outputs:  # inner modules finish first: the first match is the innermost
            if out is logits:
                return name
        raise RuntimeError(
            f"GSLoRA(prototype=True): no module of {type(pl_module).__name__} outputs the logits its forward returns "
            "(they are changed after the head), so the embedding feeding the head was not found. Fix: pass "
            "`prototype_head=` naming the head module, or prototype_space='logits'."
        )

    def _stream_datasets(self, trainer: "pl.Trainer") -> list[Any]:
        """The task's forget and retain training datasets, each once (not the cycled two-stream items).

        A :class:`~lightning_forget.datamodules.ForgetRetainDataModule` loader holds both streams
        in one dataset (``.forget``/``.retain``); a ``CombinedLoader({"forget": ..., "retain": ...})``
        holds one loader per stream.
        """
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        if dataset is not None and hasattr(dataset, "forget") and hasattr(dataset, "retain"):
            return [dataset.forget, dataset.retain]
        iterables = getattr(loader, "iterables", None)
        if isinstance(iterables, dict):
            found = [getattr(iterables.get(s), "dataset", None) for s in (self.forget_stream, self.retain_stream)]
            if all(d is not None for d in found):
                return found
        raise RuntimeError(
            f"GSLoRA(prototype=True) computes the prototypes over the task's forget and retain training sets but "
            f"cannot find them in the training loader ({type(loader).__name__}). Fix: train with "
            f"ForgetRetainDataModule or a CombinedLoader({{{self.forget_stream!r}: DataLoader, "
            f"{self.retain_stream!r}: DataLoader}}) of map-style datasets."
        )

    @torch.no_grad()
    def _compute_prototypes(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> dict[int, Tensor]:
        """Class-mean features of the current (pre-task) model over the task's forget ∪ retain training sets,
        each sample counted once (the official ``calculate_prototypes`` over their concatenation)."""
        sums: dict[int, Tensor] = {}
        counts: dict[int, int] = {}
        was_training = pl_module.training
        pl_module.eval()
        try:
            for dataset in self._stream_datasets(trainer):
                for batch in DataLoader(dataset, batch_size=256, shuffle=False):
                    split = self.fields.split(batch)
                    with forward_context(trainer):
                        out = self._run(pl_module, split.input.to(pl_module.device))[1].float().cpu()
                    for c in torch.unique(split.target).tolist():
                        rows = out[split.target.cpu() == c]
                        sums[c] = sums.get(c, torch.zeros(out.shape[1])) + rows.sum(0)
                        counts[c] = counts.get(c, 0) + len(rows)
        finally:
            pl_module.train(was_training)
        return {c: sums[c] / counts[c] for c in sorted(sums)}

    # ------------------------------------------------------------------ state
    def method_state(self) -> dict[str, Any]:
        return {
            "prototypes": {int(c): v.detach().cpu().clone() for c, v in self.prototypes.items()},
            "deltas": [self._whole_deltas(d) for d in self.deltas],
            "nonzero": [list(n) for n in self.nonzero],
            "group_norms": [dict(n) for n in self.group_norms],
            "prototype_space": self.prototype_space,
        }

    def _whole_deltas(self, deltas: dict[str, Tensor]) -> dict[str, Tensor]:
        """A task's kept ``ΔW`` as whole tensors: gathered from the local blocks under FSDP2 (a
        collective: every rank saves its state), copies otherwise."""
        module = self._module
        if module is None or not is_sharded(module) or not deltas:
            return {k: v.clone() for k, v in deltas.items()}
        layers = lora_layers(module)
        out = {}
        for name, delta in deltas.items():
            weight = layers[name].get_base_layer().weight
            out[name] = full_tensor(self._local_of(delta, weight), like=weight).detach().cpu().clone()
        return out

    def load_method_state(self, state: dict[str, Any]) -> None:
        if self.prototype and state["prototypes"] and state["prototype_space"] != self.prototype_space:
            raise RuntimeError(message(
                "prototype_space", f"the checkpoint's {state['prototype_space']!r} (its prototypes are in that space)",
                self.prototype_space, f"resume with prototype_space={state['prototype_space']!r}",
            ))
        self.prototypes = {int(c): v.clone() for c, v in state["prototypes"].items()}
        self.deltas = [dict(d) for d in state["deltas"]]
        self.nonzero = [list(n) for n in state["nonzero"]]
        self.group_norms = [dict(n) for n in state["group_norms"]]

    def migrate_state(self, state: dict[str, Any], version: int) -> dict[str, Any]:
        if version == 1:
            # Version 1 (before the per-group norms) computed the prototypes on the logits and kept
            # no group norms: those of its tasks are unknown (empty).
            return {**state, "group_norms": [{} for _ in state["nonzero"]], "prototype_space": "logits"}
        return super().migrate_state(state, version)
