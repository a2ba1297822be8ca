"""Concept erasure in diffusion models as callbacks, on one shared mechanism (:class:`ErasureMethod`).

:class:`ErasureMethod` holds what every erasure method shares: the concepts to erase and to keep
(per task, so several concepts can be erased in sequence, one per task or fit), the frozen
teacher ``ε*``, the parameter set that trains (full fine-tuning, or PEFT LoRA on that set's
layers with the teacher = the adapters disabled), the step's loss (added inside the DDP-wrapped
training step) and the checkpointed state. Methods override :meth:`ErasureMethod.erasure_loss`
(and, for edits without training, :meth:`ErasureMethod.on_task_start`/``on_task_end``).

Methods here: :class:`ESD`, :class:`ConceptAblation`, :class:`UCE`.

The model protocol (what a method calls on the LightningModule; :class:`~lightning_forget.modules.DiffusionModule`
has all of it): ``eps(x_t, t, labels)``, ``null_label``, ``noise_scheduler``, ``unet``,
``concept_index(concept)``, ``initial_noise(n, seed)``, ``add_noise``, ``predict_x0``,
``denoising_loss`` and, for UCE, ``concept_token(concept)``.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_forget.distributed import rank_generator
from lightning_forget.losses import output_loss, remove_training_step_hooks, training_step_hooks
from lightning_forget.modules.diffusion import Concept, ddim_sample, guided_eps
from lightning_forget.precision import forward_context
from lightning_forget.lora import add_delta_to_base
from lightning_forget.sharding import is_sharded, local_view, reshard
from lightning_forget.tasks import DDP_STRATEGIES, SHARDED_STRATEGIES, ContinualCallback, atomic_edit, strategy_name
from lightning_forget.unlearning.erasure import cross_attention_projections, esd_target, parameter_set, uce_edit_projections
from lightning_forget.unlearning.reference import ReferenceModel, has_lora_adapters
from lightning_forget.validation import check_bool, check_choice, check_float, check_int, check_str, message

__all__ = ["ConceptAblation", "ESD", "ErasureMethod", "UCE", "erase_with_uce"]

ConceptSpec = Union[Concept, Sequence[Concept], Sequence[Sequence[Concept]]]

#: What a model must expose to be erased (checked in ``setup``).
MODEL_PROTOCOL = ("eps", "null_label", "noise_scheduler", "unet", "concept_index", "initial_noise", "add_noise")


def check_optional_concept(name: str, value: Any, expected: str) -> Any:
    """``value`` if it is ``None`` or one concept (an id or a name, not a bool); else a TypeError naming ``name``."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, str))):
        raise TypeError(message(name, expected, value))
    return value


def _concept_list(name: str, value: Any, allow_none: bool = False) -> Optional[list[Any]]:
    """Normalise a concept argument: one concept, a list, or a list of lists (one per task)."""
    if value is None:
        if allow_none:
            return None
        raise ValueError(message(name, "a concept (id or name) or a list of them", value, f"pass e.g. {name}=[3]"))
    if isinstance(value, bool) or not isinstance(value, (int, str, list, tuple)):
        raise TypeError(message(name, "an int id, a name, or a list of them", value))
    items = [value] if isinstance(value, (int, str)) else list(value)
    if not items:
        raise ValueError(message(name, "a non-empty list of concepts", value, f"pass e.g. {name}=[3]"))
    for item in items:
        inner = item if isinstance(item, (list, tuple)) else [item]
        if not inner or any(isinstance(c, bool) or not isinstance(c, (int, str)) for c in inner):
            raise TypeError(message(name, "concepts given as int ids or names (or one list of them per task)", value))
        if any(isinstance(c, int) and c < 0 for c in inner):
            raise ValueError(message(name, "non-negative concept ids", value))
    return [list(i) if isinstance(i, (list, tuple)) else i for i in items]


class ErasureMethod(ContinualCallback):
    """The shared mechanism of the concept-erasure callbacks on a diffusion model.

    **Concepts.** ``erase`` is one concept (an id or a name of the model's ``concepts``), a list
    (all erased together in every task), or a list of lists (task ``t`` erases ``erase[t]``: several
    concepts in sequence, one per task of a continual stream or one per ``fit``). ``keep`` lists
    the concepts to preserve (``None``: every concept not erased up to this task).

    **Teacher.** At each task's start the frozen teacher ``ε*`` is taken
    (:class:`~lightning_forget.unlearning.ReferenceModel`): the module with its LoRA adapters
    disabled when LoRA is used (no copy), else a frozen copy of its weights (``teacher_offload``
    keeps it on the CPU). Its weights go into the checkpoint, so a resume uses the same teacher; a
    later task's teacher is the model after the earlier erasures.

    **Parameters.** ``parameters`` names the set that trains (see
    :data:`~lightning_forget.unlearning.erasure.PARAMETER_SETS`; each method has its own default):
    with ``lora_rank=None`` those parameters train and every other parameter of the module is
    frozen (``requires_grad=False``, set in ``setup``); with ``lora_rank=r`` PEFT LoRA adapters are
    injected into that set's layers (``peft.inject_adapter_in_model``) and only they train. With
    LoRA each task's end merges the adapters into the base weights and zeroes ``lora_B``, so the
    next task's teacher (adapters disabled) is the model after this task's erasure.

    **The step.** The loss term adds ``erasure_loss(...) + retain_weight·L_module − L_module`` to
    the user's training step (``L_module`` is the module's own loss on the fit's batch, e.g. the
    retained classes' denoising loss; ``retain_weight=0``, the default, cancels its gradient
    exactly), so DDP reduces one backward. The fit's loader drives the number of steps.

    Args:
        erase: the concepts to erase (see above).
        keep: the concepts to preserve (``None``: all others).
        parameters: the parameter set that trains (``None``: the method's default).
        lora_rank: ``None`` (full fine-tuning of the set) or the LoRA rank.
        lora_alpha: LoRA's alpha (default: the rank).
        retain_weight: weight of the module's own loss on the fit's batch (default 0).
        teacher_offload: keep the teacher copy on the CPU.
        seed: seed of the method's draws (noise, timesteps), combined with the step and rank.

    Logged: ``<prefix>/erasure_loss`` and ``<prefix>/loss`` per step.

    Raises:
        ValueError, TypeError: bad arguments (construction). RuntimeError: a module without the
            model protocol, a concept the model does not have, a parameter set that is empty.

    Note:
        Saved state: ``teacher`` (CPU weights of the teacher copy, or ``None``), ``version``.
        Supported strategies: single device and DDP; every method in the library (:class:`ESD`,
        :class:`UCE`, :class:`ConceptAblation`, :class:`DoCo`, :class:`SalUnDiffusion`, :class:`SFD`) also
        ``ModelParallelStrategy`` (FSDP2; the teacher as each rank's local shards, :class:`~lightning_forget.unlearning.ReferenceModel`'s sharded mode,
        or, for ESD with LoRA, the adapters disabled). ``lora_rank`` under sharding: ESD only, on linear
        layers, merged shard-wise (:attr:`sharded_lora`); a subclass of your own declares
        ``supported_strategies`` once its step is checked sharded.
    """

    supported_strategies = DDP_STRATEGIES
    #: Name used in messages and the default logged prefix.
    method_name: str = "Erasure"
    log_prefix: str = "erase"
    #: The method's default parameter set.
    default_parameters: str = "all"
    #: Whether the method needs the frozen teacher.
    needs_teacher: bool = True
    #: Whether the method trains (``False``: a closed-form edit; no parameters are frozen).
    trains: bool = True
    state_arguments: tuple[str, ...] = ("erase", "parameters", "lora_rank", "lora_alpha")
    #: Whether ``lora_rank`` runs under ModelParallelStrategy (ESD: its shard-wise merge is tested; refused otherwise).
    sharded_lora: bool = False
    task_end_edits_weights = True

    def __init__(
        self,
        erase: ConceptSpec,
        keep: Optional[Sequence[Concept]] = None,
        parameters: Optional[str] = None,
        lora_rank: Optional[int] = None,
        lora_alpha: Optional[float] = None,
        retain_weight: float = 0.0,
        teacher_offload: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.erase = _concept_list("erase", erase)
        keep_list = _concept_list("keep", keep, allow_none=True)
        if keep_list is not None and any(isinstance(c, list) for c in keep_list):
            raise TypeError(message("keep", "a flat list of concepts", keep))
        self.keep = keep_list
        self.parameters = check_str("parameters", parameters if parameters is not None else self.default_parameters)
        if not self.parameters.startswith("re:"):
            from lightning_forget.unlearning.erasure import PARAMETER_SETS

            check_choice("parameters", self.parameters, PARAMETER_SETS)
        self.lora_rank = check_int("lora_rank", lora_rank, min=1, allow_none=True)
        self.lora_alpha = check_float("lora_alpha", lora_alpha, min=0, min_inclusive=False, allow_none=True)
        if self.lora_alpha is not None and self.lora_rank is None:
            raise ValueError(message("lora_alpha", "given only with lora_rank", lora_alpha, "pass lora_rank too, or drop lora_alpha"))
        self.retain_weight = check_float("retain_weight", retain_weight, min=0)
        self.teacher_offload = check_bool("teacher_offload", teacher_offload)
        self.seed = check_int("seed", seed)
        self.teacher: Optional[ReferenceModel] = None
        self._teacher_state: Optional[dict[str, Tensor]] = None
        self._batch: Any = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(erase=self.erase)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(teacher=None, _batch=None)
        return state

    # ------------------------------------------------------------------ the hooks methods override
    def erasure_loss(self, pl_module: "pl.LightningModule", batch: Any, erase: list[int], keep: list[int]) -> Optional[Tensor]:
        """The method's loss for this step (``None``: none). ``erase``/``keep`` are this task's concept ids;
        ``batch`` is the fit's batch (the module's own loss on it is the retain term)."""
        return None

    # ------------------------------------------------------------------ helpers for the methods
    def erase_ids(self, pl_module: "pl.LightningModule", task: int) -> list[int]:
        """The concept ids erased in ``task`` (a list of lists: ``erase[task]``; a flat list: all of it)."""
        assert self.erase is not None
        if any(isinstance(c, list) for c in self.erase):
            if task >= len(self.erase):
                raise RuntimeError(
                    f"{type(self).__name__}: task {task} has no concepts to erase: `erase` lists {len(self.erase)} groups "
                    f"({self.erase}). Fix: give one group per task, or a flat list to erase the same concepts in every task."
                )
            group = self.erase[task]
            return [self._index(pl_module, c, "erase") for c in (group if isinstance(group, list) else [group])]
        return [self._index(pl_module, c, "erase") for c in self.erase]

    def erased_until(self, pl_module: "pl.LightningModule", task: int) -> list[int]:
        """Every concept erased in tasks ``0..task``."""
        out: list[int] = []
        for t in range(task + 1):
            if any(isinstance(c, list) for c in self.erase) and t >= len(self.erase):  # type: ignore[arg-type]
                break
            out += [c for c in self.erase_ids(pl_module, t) if c not in out]
        return out

    def keep_ids(self, pl_module: "pl.LightningModule", task: int) -> list[int]:
        """The concept ids preserved in ``task`` (``keep``, or every concept not erased up to ``task``)."""
        if self.keep is not None:
            return [self._index(pl_module, c, "keep") for c in self.keep]
        erased = set(self.erased_until(pl_module, task))
        return [c for c in range(int(pl_module.num_classes)) if c not in erased]

    def _index(self, pl_module: "pl.LightningModule", concept: Concept, argument: str) -> int:
        try:
            return int(pl_module.concept_index(concept))
        except (ValueError, TypeError) as error:
            raise RuntimeError(f"{type(self).__name__}: `{argument}` names {concept!r}, which the model does not have "
                               f"({error}). Fix: name one of its concepts {getattr(pl_module, 'concepts', '')}.") from error

    def teacher_eps(self, pl_module: "pl.LightningModule", x_t: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        """``ε*(x_t, t, c)`` of the frozen teacher (no grad, eval mode, the trainer's precision)."""
        teacher = self._get_teacher(pl_module)
        with forward_context(pl_module.trainer):
            return teacher(lambda model: model.eps(x_t, t, labels))

    def generator(self, trainer: "pl.Trainer") -> torch.Generator:
        """A CPU generator for this step and rank (reproducible, resumable; each rank draws its own)."""
        return rank_generator(self.seed, trainer.global_step, trainer.global_rank)

    def teacher_call(self, pl_module: "pl.LightningModule", fn: Any) -> Any:
        """``fn(model)`` with the teacher's weights in place (no grad, eval mode, the trainer's precision): one
        weight swap for a whole computation (e.g. a sampling loop), where :meth:`teacher_eps` swaps per call."""
        teacher = self._get_teacher(pl_module)
        with forward_context(pl_module.trainer):
            return teacher(fn)

    def partial_ddim(self, pl_module: "pl.LightningModule", labels: Tensor, num_steps: int, guidance_scale: float,
                     generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(x_t, t)``: DDIM sampling of ``labels`` with the **teacher**, stopped after a random number of steps
        in ``[0, num_steps)`` (drawn from ``generator``, then ``x_T``)."""
        stop = int(torch.randint(0, num_steps, (1,), generator=generator))
        noise = torch.randn((labels.shape[0], *self._image_shape(pl_module)), generator=generator).to(pl_module.device)
        idle = self._idle_forwards(pl_module, stop)

        def run(model: Any) -> tuple[Tensor, Tensor]:
            x_t, t = ddim_sample(model.eps, model.noise_scheduler, labels, noise, int(model.null_label), num_steps,
                                 guidance_scale, stop_after=stop)
            for _ in range(idle):  # discarded: a sharded forward is collective, so every rank runs as many
                guided_eps(model.eps, x_t, t.clamp(min=0), labels, int(model.null_label), guidance_scale)
            return x_t, t

        return self.teacher_call(pl_module, run)

    @staticmethod
    def _idle_forwards(pl_module: "pl.LightningModule", steps: int) -> int:
        """How many more sampling steps than ``steps`` the rank that draws the most runs (0 unless sharded: each rank
        draws its own stop, as under DDP, but FSDP2's forwards gather the shards collectively)."""
        if not is_sharded(pl_module) or not torch.distributed.is_initialized():
            return 0
        most = torch.tensor([steps], dtype=torch.long)
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        return int(most.item()) - steps

    @staticmethod
    def _image_shape(pl_module: "pl.LightningModule") -> tuple[int, int, int]:
        config = pl_module.unet.config
        return int(config.in_channels), int(config.sample_size), int(config.sample_size)

    def _get_teacher(self, pl_module: "pl.LightningModule") -> Any:
        if self.teacher is None:
            self.teacher = ReferenceModel(pl_module, offload=self.teacher_offload, state=self._teacher_state)
            # Under FSDP2 the teacher is this rank's local shards (the checkpoint's full tensors cut to them): the
            # shards are the state, gathered for a checkpoint only; otherwise its weights are kept beside.
            self._teacher_state = None if self.teacher.sharded else self.teacher.state()
        return self.teacher

    def _new_teacher(self, pl_module: "pl.LightningModule") -> None:
        """Take the teacher from the module as it is now (a task's start)."""
        self.teacher, self._teacher_state = None, None
        self._get_teacher(pl_module)

    # ------------------------------------------------------------------ setup: protocol, parameters, LoRA
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        missing = [name for name in MODEL_PROTOCOL if not hasattr(pl_module, name)]
        if missing:
            raise RuntimeError(
                f"{type(self).__name__} erases concepts from a diffusion model; {type(pl_module).__name__} lacks {missing}. "
                "Fix: use lightning_forget.modules.DiffusionModule (or subclass it for your own training_step)."
            )
        for concept in self.erase + (self.keep or []):  # type: ignore[operator]
            for c in concept if isinstance(concept, list) else [concept]:
                self._index(pl_module, c, "erase" if self.keep is None or c not in self.keep else "keep")
        if self.trains:
            self.select_parameters(pl_module)
        if self.lora_rank is not None and strategy_name(trainer.strategy) in SHARDED_STRATEGIES:
            if not self.sharded_lora:
                raise RuntimeError(
                    f"{type(self).__name__}(lora_rank={self.lora_rank}) under ModelParallelStrategy: LoRA on a sharded "
                    "module is checked against DDP for ESD only (its shard-wise merge); this method's LoRA path is not. "
                    "Fix: lora_rank=None (full fine-tuning of the parameter set, sharded), or strategy='ddp'.")
            from peft.tuners.lora import LoraLayer

            convs = [n for n, m in pl_module.unet.named_modules()
                     if isinstance(m, LoraLayer) and not isinstance(m.get_base_layer(), torch.nn.Linear)]
            if convs:
                raise RuntimeError(
                    f"{type(self).__name__}(lora_rank={self.lora_rank}, parameters={self.parameters!r}) under "
                    f"ModelParallelStrategy puts LoRA on layers that are not Linear ({convs[:3]}); the merge at each "
                    "task's end is shard-wise for linear layers only. Fix: a set of linear layers (e.g. "
                    "parameters='x', the cross-attention), lora_rank=None, or strategy='ddp'.")
        if self.teacher is None or not self.teacher.sharded or self.teacher.module is not pl_module:
            self.teacher = None  # rebuilt from the saved state (one fit per task keeps a sharded teacher's shards)
        if stage != "fit" or not self.trains:
            return
        hooks = training_step_hooks(pl_module)
        hooks.add_batch_transform(self.state_key, self._keep_batch)
        hooks.add_loss_term(self.state_key, self._step_loss)

    def select_parameters(self, pl_module: "pl.LightningModule") -> list[str]:
        """Freeze every parameter but the set's (or inject LoRA into the set's layers); returns the trainable names."""
        unet = pl_module.unet
        names, layers = parameter_set(unet, self.parameters)
        if self.lora_rank is not None and not has_lora_adapters(unet):
            self._inject_lora(unet, layers)
        if self.lora_rank is not None:
            trainable = {f"unet.{n}" for n, _ in unet.named_parameters() if ".lora_" in n}
        else:
            trainable = {f"unet.{n}" for n in names}
            if self.parameters == "full" and hasattr(pl_module, "concept_embeddings"):
                trainable.add("concept_embeddings")
        for name, p in pl_module.named_parameters():
            p.requires_grad_(name in trainable)
        return sorted(trainable)

    def _inject_lora(self, unet: torch.nn.Module, layers: list[str]) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        targets = [n for n in layers if isinstance(unet.get_submodule(n), (torch.nn.Linear, torch.nn.Conv2d))]
        if not targets:
            raise RuntimeError(f"{type(self).__name__}(lora_rank={self.lora_rank}): the set `parameters`={self.parameters!r} "
                               "has no Linear/Conv2d layer for LoRA. Fix: pick another set, or lora_rank=None.")
        alpha = self.lora_alpha if self.lora_alpha is not None else float(self.lora_rank)  # type: ignore[arg-type]
        config = LoraConfig(r=int(self.lora_rank), lora_alpha=alpha, target_modules=targets,  # type: ignore[arg-type]
                            init_lora_weights=True)
        torch.manual_seed(self.seed)  # the same lora_A on every rank
        inject_adapter_in_model(config, unet)

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        remove_training_step_hooks(pl_module, self.state_key)
        self._batch = None

    # ------------------------------------------------------------------ tasks
    def on_task_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        if self.needs_teacher:
            self._new_teacher(pl_module)
        rank_zero_info(f"{type(self).__name__} task {task}: erasing {self.erase_ids(pl_module, task)}, keeping "
                       f"{self.keep_ids(pl_module, task)}, training `{self.parameters}`"
                       + (f" through LoRA r={self.lora_rank}" if self.lora_rank else ""))

    def on_task_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        if self.lora_rank is not None and self.trains:
            merge_lora_into_base(pl_module.unet)

    # ------------------------------------------------------------------ the step
    def _keep_batch(self, pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> Any:
        self._batch = batch
        return batch

    def _step_loss(self, pl_module: "pl.LightningModule", batch: Any, batch_idx: int, output: Any) -> Tensor:
        module_loss = output_loss(output)
        assert module_loss is not None
        task = self.current_task(pl_module.trainer)
        loss = self.erasure_loss(pl_module, batch, self.erase_ids(pl_module, task), self.keep_ids(pl_module, task))
        total = self.retain_weight * module_loss
        if loss is not None:
            pl_module.log(f"{self.log_prefix}/erasure_loss", loss.detach(), on_step=True, on_epoch=False)
            total = total + loss
        if not bool(torch.isfinite(total.detach())):
            raise FloatingPointError(f"{type(self).__name__}: the erasure loss is {float(total.detach())} at global step "
                                     f"{pl_module.trainer.global_step}. Fix: lower the learning rate.")
        pl_module.log(f"{self.log_prefix}/loss", total.detach(), on_step=True, on_epoch=False)
        return total - module_loss

    # ------------------------------------------------------------------ state
    def method_state(self) -> dict[str, Any]:
        if self.teacher is not None and self.teacher.sharded:  # full tensors gathered for the checkpoint only
            return {"teacher": self.teacher.state()}
        return {"teacher": None if self._teacher_state is None else dict(self._teacher_state)}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self._teacher_state = None if state["teacher"] is None else dict(state["teacher"])
        self.teacher = None


@torch.no_grad()
def merge_lora_into_base(unet: torch.nn.Module) -> None:
    """Add every LoRA layer's delta to its base weight and zero ``lora_B`` (the adapters then add nothing).

    Under FSDP2 shard-wise: each rank adds the block of ``ΔW`` its shard of the base weight holds
    (:func:`lightning_forget.lora.local_delta`, linear layers only) and zeroes its shard of ``lora_B``.
    """
    from peft.tuners.lora import LoraLayer

    reshard(unet)  # the sharded weights, not copies an evaluation forward left gathered
    for module in unet.modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    add_delta_to_base(module, adapter, "merge_lora_into_base")
                    local_view(module.lora_B[adapter].weight).zero_()


class ESD(ErasureMethod):
    """ESD: train the model to predict, for an erased concept, the noise of negative guidance away from it.

    Gandikota et al., "Erasing Concepts from Diffusion Models" (ICCV 2023). Each step draws
    ``batch_size`` erased concepts ``c``, produces ``x_t`` by DDIM sampling with the frozen teacher
    (``ddim_steps`` steps at guidance ``start_guidance``, stopped after a random number of steps
    in ``[0, ddim_steps)``) and trains ``ε_θ(x_t, t, c)`` with MSE toward
    ``ε*(x_t, t, ∅) − η·(ε*(x_t, t, c) − ε*(x_t, t, ∅))`` (:func:`~lightning_forget.unlearning.erasure.esd_target`;
    with ``erase_from`` the base is ``ε*(x_t, t, erase_from)`` instead of ∅).

    Parameter sets (``parameters``): ``"x"`` (ESD-x, cross-attention; the default), ``"u"``
    (ESD-u, everything but cross-attention), ``"x-strict"`` (``to_k``/``to_v`` only), ``"all"``;
    on a ``UNet2DModel`` ``"x"`` is the conditioning path (class embedding and ``time_emb_proj``).

    Defaults are the original code's (``rohitgandikota/erasing@a2189e9`` ``train-esd.py``):
    ``η = 1``, 50 DDIM steps, start guidance 3, batch 1 (its optimizer: Adam lr 1e-5, 1,000
    iterations; set those on the module and trainer). Deviation: ``x_t`` is sampled with the frozen
    teacher, as the authors' diffusers rewrite does (the original samples with the model being
    trained); ``t`` is the DDIM timestep ``x_t`` sits at.

    Args:
        erase: the concepts to erase (see :class:`ErasureMethod`).
        negative_guidance: ``η`` (default 1).
        erase_from: ``None`` (base ∅) or the concept whose prediction is the target's base.
        ddim_steps: DDIM steps of the partial sampling (default 50).
        start_guidance: classifier-free guidance of the partial sampling (default 3).
        batch_size: erased-concept samples per step (default 1).
        **kwargs: :class:`ErasureMethod`'s arguments.
    """

    method_name = "ESD"
    log_prefix = "esd"
    default_parameters = "x"
    #: Under ModelParallelStrategy the teacher is kept as local shards (:class:`~lightning_forget.unlearning.ReferenceModel`); LoRA on linears.
    supported_strategies = DDP_STRATEGIES + SHARDED_STRATEGIES
    sharded_lora = True

    def __init__(self, erase: ConceptSpec, negative_guidance: float = 1.0, erase_from: Optional[Concept] = None,
                 ddim_steps: int = 50, start_guidance: float = 3.0, batch_size: int = 1, **kwargs: Any) -> None:
        super().__init__(erase, **kwargs)
        self.negative_guidance = check_float("negative_guidance", negative_guidance, min=0)
        self.erase_from = check_optional_concept("erase_from", erase_from, "None or a concept id or name")
        self.ddim_steps = check_int("ddim_steps", ddim_steps, min=1)
        self.start_guidance = check_float("start_guidance", start_guidance, min=0)
        self.batch_size = check_int("batch_size", batch_size, min=1)

    def erasure_loss(self, pl_module: "pl.LightningModule", batch: Any, erase: list[int], keep: list[int]) -> Optional[Tensor]:
        generator = self.generator(pl_module.trainer)
        pick = torch.randint(0, len(erase), (self.batch_size,), generator=generator)
        labels = torch.tensor(erase, dtype=torch.long)[pick].to(pl_module.device)
        x_t, t = self.partial_ddim(pl_module, labels, self.ddim_steps, self.start_guidance, generator)
        base_id = pl_module.null_label if self.erase_from is None else self._index(pl_module, self.erase_from, "erase_from")
        both = self.teacher_eps(pl_module, torch.cat([x_t, x_t]), torch.cat([t, t]),
                                torch.cat([labels, torch.full_like(labels, int(base_id))]))
        eps_c, eps_base = both.chunk(2)
        target = esd_target(eps_c, eps_base, self.negative_guidance)
        with forward_context(pl_module.trainer):
            prediction = pl_module.eps(x_t, t, labels)
        return torch.nn.functional.mse_loss(prediction.float(), target.float())


class ConceptAblation(ErasureMethod):
    """Concept ablation: map the erased concept's prediction onto an anchor concept's, on anchor images.

    Kumari et al., "Ablating Concepts in Text-to-Image Diffusion Models" (ICCV 2023),
    ``concept-ablation:diffusers/train.py``, "model-based" loss: at each task's start
    ``num_anchor_samples`` anchor images are generated with the teacher (DDIM, ``sample_steps``,
    the module's guidance); each step noises ``batch_size`` of them (``x_t``, random ``t``) and
    trains ``ε_θ(x_t, t, c_target)`` with MSE toward ``stopgrad ε_θ(x_t, t, c_anchor)`` (the same
    model under ``no_grad``, not the teacher, as the official code). With ``prior_preservation``
    the standard ε-loss of the anchor images under the anchor concept is added with
    ``prior_weight``.

    Defaults: ``parameters="cross-attn"`` (``attn2.to_k``/``to_v``; the official default), batch 4,
    no prior preservation (the official flag ``--with_prior_preservation``, weight 1 when on).
    The official optimizer (AdamW lr 2e-6 × batch × GPUs, weight decay 1e-2, clip 1.0, 100–200
    steps) is the module's and trainer's to set. The anchor images are regenerated (the same ones:
    the teacher's weights and the seed are in the checkpoint) after a resume.

    Args:
        erase: the concepts to erase.
        anchor: the anchor concept (``None``: the null concept ∅, a generic image).
        num_anchor_samples: anchor images generated per task (default 64).
        sample_steps: DDIM steps of their generation (default 50).
        batch_size: anchor images per step (default 4).
        prior_preservation: add the anchor images' own ε-loss (default False).
        prior_weight: its weight (default 1).
        **kwargs: :class:`ErasureMethod`'s arguments.
    """

    method_name = "ConceptAblation"
    log_prefix = "ca"
    default_parameters = "cross-attn"
    #: Under ModelParallelStrategy: the anchors are sampled with the sharded teacher, the same count on every rank
    #: (a collective forward each), and each step runs the same forwards on every rank.
    supported_strategies = DDP_STRATEGIES + SHARDED_STRATEGIES

    def __init__(self, erase: ConceptSpec, anchor: Optional[Concept] = None, num_anchor_samples: int = 64,
                 sample_steps: int = 50, batch_size: int = 4, prior_preservation: bool = False, prior_weight: float = 1.0,
                 **kwargs: Any) -> None:
        super().__init__(erase, **kwargs)
        self.anchor = check_optional_concept("anchor", anchor, "None (the null concept) or a concept id or name")
        self.num_anchor_samples = check_int("num_anchor_samples", num_anchor_samples, min=1)
        self.sample_steps = check_int("sample_steps", sample_steps, min=1)
        self.batch_size = check_int("batch_size", batch_size, min=1)
        self.prior_preservation = check_bool("prior_preservation", prior_preservation)
        self.prior_weight = check_float("prior_weight", prior_weight, min=0)
        self._anchors: Optional[Tensor] = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_anchors"] = None
        return state

    def anchor_id(self, pl_module: "pl.LightningModule") -> int:
        return int(pl_module.null_label) if self.anchor is None else self._index(pl_module, self.anchor, "anchor")

    def on_task_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        super().on_task_start(trainer, pl_module, task)
        self._anchors = None

    def anchor_images(self, pl_module: "pl.LightningModule") -> Tensor:
        """The task's anchor images (generated with the teacher on first use; the same on every rank)."""
        if self._anchors is None:
            labels = torch.full((self.num_anchor_samples,), self.anchor_id(pl_module), dtype=torch.long)
            eps = lambda x, t, c: self.teacher_eps(pl_module, x, t, c)  # noqa: E731
            self._anchors = pl_module.sample(labels, seed=self.seed + 7919 * self._started, num_steps=self.sample_steps,
                                             eps_fn=eps)
        return self._anchors

    def anchor_draw(self, pl_module: "pl.LightningModule", erase: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """One step's draw from the anchor images: ``(x_t, t, noise, target labels, anchor labels)``,
        each row an anchor image noised at a random step and labelled with a random erased concept
        (from the callback's generator, in this order: rows, concepts, steps, noise)."""
        generator = self.generator(pl_module.trainer)
        anchors = self.anchor_images(pl_module)
        rows = torch.randint(0, anchors.shape[0], (self.batch_size,), generator=generator)
        x0 = anchors[rows.to(anchors.device)]
        pick = torch.randint(0, len(erase), (self.batch_size,), generator=generator)
        target_labels = torch.tensor(erase, dtype=torch.long)[pick].to(pl_module.device)
        anchor_labels = torch.full_like(target_labels, self.anchor_id(pl_module))
        t = torch.randint(0, int(pl_module.noise_scheduler.config.num_train_timesteps), (self.batch_size,),
                          generator=generator).to(pl_module.device)
        noise = torch.randn(x0.shape, generator=generator).to(pl_module.device, x0.dtype)
        return pl_module.add_noise(x0, noise, t), t, noise, target_labels, anchor_labels

    def erasure_loss(self, pl_module: "pl.LightningModule", batch: Any, erase: list[int], keep: list[int]) -> Optional[Tensor]:
        x_t, t, noise, target_labels, anchor_labels = self.anchor_draw(pl_module, erase)
        with forward_context(pl_module.trainer):
            with torch.no_grad():
                target = pl_module.eps(x_t, t, anchor_labels)
            loss = torch.nn.functional.mse_loss(pl_module.eps(x_t, t, target_labels).float(), target.float())
            if self.prior_preservation:
                prior = pl_module.eps(x_t, t, anchor_labels)
                loss = loss + self.prior_weight * torch.nn.functional.mse_loss(prior.float(), noise.float())
        return loss


def erase_with_uce(
    pl_module: Any,
    erase: Sequence[Concept],
    guide: Union[None, Concept, Sequence[Optional[Concept]]] = None,
    preserve: Optional[Sequence[Concept]] = None,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
    lamb: float = 0.5,
) -> list[str]:
    """UCE on a diffusion model: edit every cross-attention ``to_k``/``to_v`` in closed form (no training).

    Gandikota et al., "Unified Concept Editing in Diffusion Models" (WACV 2024); see
    :func:`~lightning_forget.unlearning.erasure.uce_closed_form`. ``c`` of a concept is its own
    (last) token's embedding (``pl_module.concept_token``, as the official code takes the last
    real token of the prompt); each erased concept's values are sent to its guide's
    (``None``: the null concept, as the official ``""``); preserved concepts keep their outputs.

    Returns:
        The edited layers' names.
    """
    if not cross_attention_projections(pl_module.unet):
        raise ValueError(message("pl_module", "a model whose UNet has cross-attention (attn2.to_k / to_v)",
                                 type(pl_module.unet).__name__,
                                 "use DiffusionModule(unet='conditional'); a UNet2DModel has no cross-attention for UCE"))
    erase_ids = [pl_module.concept_index(c) for c in erase]
    guides = list(guide) if isinstance(guide, (list, tuple)) else [guide] * len(erase_ids)
    if len(guides) != len(erase_ids):
        raise ValueError(message("guide", f"one concept or one per erased concept ({len(erase_ids)})", guide))
    from lightning_forget.sharding import full_tensor

    with torch.no_grad():  # a sharded concept table: its rows gathered (a few vectors)
        c_e = torch.stack([full_tensor(pl_module.concept_token(c)) for c in erase_ids])
        c_g = torch.stack([full_tensor(pl_module.concept_token(g)) for g in guides])
        c_p = torch.stack([full_tensor(pl_module.concept_token(c)) for c in preserve]) if preserve else None
    return uce_edit_projections(pl_module.unet, c_e, c_g, c_p, erase_scale, preserve_scale, lamb)


class UCE(ErasureMethod):
    """UCE as a callback: the closed-form edit (:func:`erase_with_uce`) at each task's start or end.

    No training and no teacher: the fit's steps are the module's own (this callback adds no loss
    term and freezes nothing). ``when="task_start"`` (default) edits before the task's first batch
    (the first ``fit`` of a run: at fit start), ``"task_end"`` after its last batch; either way
    inside :func:`~lightning_forget.tasks.atomic_edit` (an error leaves the weights as they were),
    once per task (the edited weights are in the checkpoint; a resume does not edit again).

    Defaults (``trainscripts/uce_sd_erase.py``): ``erase_scale = preserve_scale = 1``,
    ``lamb = 0.5``, guide ∅. Preserved concepts: ``keep`` (``None``: every concept not erased).

    Args:
        erase: the concepts to erase.
        guide: ``None`` (∅), one concept, or one per erased concept.
        erase_scale: ``s_e``.
        preserve_scale: ``s_p``.
        lamb: ``λ``.
        when: ``"task_start"`` or ``"task_end"``.
        **kwargs: :class:`ErasureMethod`'s ``keep`` (the other arguments do not apply).

    Logged: ``uce/edited_layers`` when the edit runs.
    """

    method_name = "UCE"
    log_prefix = "uce"
    default_parameters = "cross-attn"
    needs_teacher = False
    trains = False
    #: Under ModelParallelStrategy each projection is gathered for its solve and written back shard-wise.
    supported_strategies = DDP_STRATEGIES + SHARDED_STRATEGIES

    def __init__(self, erase: ConceptSpec, guide: Union[None, Concept, list[Optional[Concept]]] = None,
                 erase_scale: float = 1.0, preserve_scale: float = 1.0, lamb: float = 0.5,
                 when: Literal["task_start", "task_end"] = "task_start", **kwargs: Any) -> None:
        if kwargs.get("lora_rank") is not None:
            raise ValueError(message("lora_rank", "None for UCE (a closed-form edit of the weights)", kwargs["lora_rank"]))
        super().__init__(erase, **kwargs)
        for g in guide if isinstance(guide, list) else [guide]:
            if g is not None and (isinstance(g, bool) or not isinstance(g, (int, str))):  # the message names the whole list
                raise TypeError(message("guide", "None (the null concept), a concept id or name, or a list of them", guide))
        self.guide = guide
        self.erase_scale = check_float("erase_scale", erase_scale, min=0)
        self.preserve_scale = check_float("preserve_scale", preserve_scale, min=0)
        self.lamb = check_float("lamb", lamb, min=0, min_inclusive=False)
        self.when = check_choice("when", when, ("task_start", "task_end"))

    def _edit(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        erase = self.erase_ids(pl_module, task)
        with atomic_edit(pl_module):
            layers = erase_with_uce(pl_module, erase, self.guide, self.keep_ids(pl_module, task), self.erase_scale,
                                    self.preserve_scale, self.lamb)
        rank_zero_info(f"UCE task {task}: erased {erase} in {len(layers)} cross-attention projections")
        self.log_task_metrics(trainer, pl_module, {"uce/edited_projections": float(len(layers))})

    def on_task_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        super().on_task_start(trainer, pl_module, task)
        if self.when == "task_start":
            self._edit(trainer, pl_module, task)

    def on_task_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        if self.when == "task_end":
            self._edit(trainer, pl_module, task)
