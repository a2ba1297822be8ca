"""Machine-unlearning baselines as callbacks, on one shared mechanism.

:class:`UnlearningMethod` is the mechanism every method here shares (and the language-model
methods build on): forget/retain streams, the loss of each step, a frozen reference (teacher)
model, SalUn's saliency mask on top of any objective, and the safety rails. The methods override
one or two hooks: :meth:`UnlearningMethod.forget_loss`, :meth:`UnlearningMethod.retain_loss`,
:meth:`UnlearningMethod.parameter_penalty`. Their losses are the plain functions of
:mod:`lightning_forget.unlearning.losses`.

Methods: :class:`FineTune` (FT), :class:`GradientAscent` (GA / NegGrad), :class:`GradDiff`,
:class:`RandomLabels` (RL), :class:`L1Sparse`, :class:`SCRUB`, :class:`SalUn`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_forget import reporting
from lightning_forget.batch import BatchFields, stream_names
from lightning_forget.distributed import rank_generator
from lightning_forget.forward import ModelForward
from lightning_forget.gradients import compute_gradients
from lightning_forget.losses import output_loss, remove_training_step_hooks, training_step_hooks
from lightning_forget.precision import forward_context
from lightning_forget.sharding import full_tensor, is_sharded, reshard
from lightning_forget.tasks import DDP_STRATEGIES, SHARDED_STRATEGIES, ContinualCallback, task_schedule
from lightning_forget.unlearning import losses as L
from lightning_forget.unlearning.reference import ReferenceModel, load_pretrained
from lightning_forget.unlearning.saliency import SaliencyMask
from lightning_forget.unlearning.surgery import SURGERY_MODES, GradientSurgery
from lightning_forget.validation import check_bool, check_choice, check_float, check_int, check_str

__all__ = ["FineTune", "GradDiff", "GradientAscent", "L1Sparse", "RandomLabels", "SCRUB", "SalUn", "UnlearningMethod"]


def is_lm_batch(sub_batch: Any) -> bool:
    """Whether a sub-batch is a causal LM's: a mapping with ``input_ids`` and ``labels``."""
    return isinstance(sub_batch, dict) and "input_ids" in sub_batch and "labels" in sub_batch


def _lm_call(model: Any, sub_batch: dict[str, Tensor], forward: ModelForward) -> Tensor:
    """The logits of a causal-LM sub-batch through the user's logits function (``forward_fn``):
    ``f(input_ids, attention_mask=...)`` (no mask argument when the sub-batch has none)."""
    mask = sub_batch.get("attention_mask")
    if mask is None:
        return forward(model, sub_batch["input_ids"])
    return forward(model, sub_batch["input_ids"], attention_mask=mask)


class UnlearningMethod(ContinualCallback):
    """The shared mechanism of the unlearning callbacks; on its own it is fine-tuning on the retained data.

    **Streams.** Training batches are two-stream dicts ``{"forget": ..., "retain": ...}`` (as
    :class:`~lightning_forget.datamodules.ForgetRetainDataModule` serves them); a batch holding one
    of the two streams, or a plain batch (read as retained data), works too. A batch transform hands
    the user's ``training_step`` the retain sub-batch (the forget one when there is none), so the
    module's own loss on retained data is the retain term ``L_r``; a loss term then makes the step's
    loss ``retain_loss(L_r) + forget_loss(forget batch)`` (by default ``retain_weight·L_r``; a
    weight of 0 cancels ``L_r``'s gradient exactly), in the same DDP-reduced step. Forwards the
    methods need call ``pl_module(x)`` (:meth:`logits`) under the trainer's precision.

    **Reference.** Methods that need a frozen reference (SCRUB's teacher, GradDiff's KL) get a
    :class:`~lightning_forget.unlearning.ReferenceModel` taken at each task's start: the module
    with its PEFT adapters disabled when it carries LoRA adapters and no trainable base weight
    (no copy), else a frozen copy of its weights run through the module's own forward
    (``reference_offload=True`` keeps them on the CPU). Those weights are saved in the callback
    state, so a resumed run uses the same reference.

    **Saliency mask** (``mask_fraction=γ``, any method): at each task's start one pass over the
    task's forget data (in eval mode) accumulates ``g = Σ ∇CE``; the globally largest ``γ``
    share of ``|g|`` may change. Gradients are masked before every optimizer step (after DDP's
    reduction), masked-out weights are reset to their values at the task start after it and their
    optimizer state is zeroed (:class:`~lightning_forget.unlearning.SaliencyMask`).

    **Safety rails.**

    - ``save_original``: before the first unlearning step of each task the module's weights are
      written to ``pre_unlearning_task{t}.ckpt`` in the run's folder (a ``{"state_dict": ...}``
      file that ``pretrained_ckpt`` and :func:`~lightning_forget.callbacks.lines.load_weights`
      read), and the path is logged.
    - A divergence guard: at each epoch end the logged value ``guard_monitor`` (e.g.
      ``"mu/ra"`` from :class:`~lightning_forget.callbacks.UnlearningEvaluation`, listed
      *before* this callback, or this callback's ``"<prefix>/retain_loss"``) is compared with
      ``guard_threshold``; crossing it (``guard_mode="below"``: falling under it; ``"above"``:
      rising over it) stops the run (``guard_action="stop"``) or warns (``"warn"``).
    - ``restore_best``: the weights of the epoch that is best by that logged value
      (``restore_mode`` ``"max"``/``"min"``) are kept and loaded back at the task's end.
    - A NaN or infinite loss stops the run with a ``FloatingPointError`` naming the step and the
      pre-unlearning checkpoint.

    **Gradient surgery** (``gradient_surgery``, any method with a forget and a retain term): DoCo's
    concept-preserving gradient (:mod:`lightning_forget.unlearning.surgery`). In a step with both
    streams the forget term's gradient ``g_u`` is computed apart (``torch.autograd.grad``, summed
    over accumulated micro-batches) and left out of the backward, so DDP reduces only the retain
    term's ``g_p``; at the optimizer step ``g_u`` is averaged across ranks and, per parameter
    tensor where ``cos(g_u, g_p) < 0``, its component along ``g_p`` is removed; the step follows
    ``g_u' + g_p``. Steps with one stream are unchanged.

    Args:
        retain_weight: weight of the module's own loss on the retained batch (default 1).
        forget_passes: passes over the forget data per epoch that get the forget term (default 1,
            as the official loops, which run one pass over ``D_f`` per epoch): the retained stream
            drives the epoch and the forget stream cycles, so after ``forget_passes·|D_f|`` forget
            rows (per rank's share) the steps train on retained data only. Needs the datamodule's
            ``forget_train_dataset(task)`` for ``|D_f|``; ``None``: every step.
        mask_fraction: ``None`` (no mask) or the share ``γ ∈ (0, 1]`` of weights that may change.
        pretrained_ckpt: weights of the model to unlearn (a Lightning checkpoint or state dict),
            loaded at the start of a fresh fit; ``None`` unlearns the module as it is.
        save_original: write the pre-unlearning weights at each task's start (default True).
        guard_monitor: logged key watched by the divergence guard (``None``: no guard).
        guard_threshold: the threshold of the guard.
        guard_mode: ``"below"`` (stop when the value falls under the threshold; for accuracies)
            or ``"above"`` (for losses).
        guard_action: ``"stop"`` or ``"warn"``.
        restore_best: logged key whose best epoch's weights are restored at task end (``None``: off).
        restore_mode: ``"max"`` or ``"min"``: which value of ``restore_best`` is best.
        reference_offload: keep the reference copy on the CPU.
        gradient_surgery: ``None`` (default: one gradient of the summed loss), ``"project"`` (remove
            the conflicting component exactly: ``g_u − (g_u·g_p/‖g_p‖²)g_p``) or ``"doco"`` (the DoCo
            code's ``g_u − cos·g_p/‖g_p‖``); see :func:`~lightning_forget.unlearning.surgery.concept_preserving_gradient`.
        forward_fn: the module's logits function for the method's own forwards (forget batch,
            reference, saliency pass): ``None`` for its ``forward``, or a submodule or method name
            (``"net"``) for a module without one (see :class:`~lightning_forget.forward.ModelForward`).
        forget_stream: key of the forget stream (default ``"forget"``).
        retain_stream: key of the retain stream (default ``"retain"``).
        input_key: input field of each stream's sub-batch (see :class:`~lightning_forget.batch.BatchFields`).
        target_key: target field of each stream's sub-batch.
        seed: seed of the method's random draws (random labels), shared by all ranks.
        log_dir: folder of the pre-unlearning checkpoints (default: the run's results folder).

    Logged metrics (per step, under the method's prefix: ``ft/``, ``ga/``, ``graddiff/``, ``rl/``,
    ``salun/``, ``l1sparse/``, ``scrub/``): ``<prefix>/forget_loss``, ``<prefix>/retain_loss`` and
    ``<prefix>/loss`` (the step's total); with ``gradient_surgery``, ``<prefix>/surgery_conflicts``
    per optimizer step (the share of parameter tensors whose gradients conflicted).

    Raises:
        ValueError, TypeError: bad arguments (construction). RuntimeError: a mask without forget
            data, a guard key that is never logged. FloatingPointError: a non-finite loss.

    Note:
        Saved state: ``reference`` (CPU weights of the reference copy, or ``None``), ``mask``
        (masks and original values, or ``None``), ``best`` (score, epoch and weights of the best
        epoch with ``restore_best``), ``saved`` (paths of the pre-unlearning checkpoints),
        ``version``. Supported strategies: single device, DDP and ``ModelParallelStrategy`` (FSDP2: the
        reference and the mask held as local shards, see docs/sharding.md).
    """

    supported_strategies = DDP_STRATEGIES + SHARDED_STRATEGIES
    #: Whether the method needs the frozen reference model.
    needs_reference: bool = False
    #: Name used in messages.
    method_name: str = "FineTune"
    #: Prefix of the method's logged keys (one per method).
    log_prefix: str = "ft"

    #: Constructor arguments whose change a resume refuses (see ContinualCallback.state_arguments):
    #: the saved saliency mask and reference weights belong to them.
    state_arguments: tuple[str, ...] = ("mask_fraction", "pretrained_ckpt", "forget_stream", "input_key", "target_key")
    #: The task end restores the best weights (``restore_best``): it runs inside tasks.atomic_edit.
    task_end_edits_weights = True

    def __init__(
        self,
        retain_weight: float = 1.0,
        forget_passes: Optional[float] = 1.0,
        mask_fraction: Optional[float] = None,
        pretrained_ckpt: Optional[str] = None,
        save_original: bool = True,
        guard_monitor: Optional[str] = None,
        guard_threshold: Optional[float] = None,
        guard_mode: Literal["below", "above"] = "below",
        guard_action: Literal["stop", "warn"] = "stop",
        restore_best: Optional[str] = None,
        restore_mode: Literal["max", "min"] = "max",
        reference_offload: bool = False,
        forget_stream: str = "forget",
        retain_stream: str = "retain",
        input_key: Optional[Union[str, int]] = None,
        target_key: Optional[Union[str, int]] = None,
        seed: int = 0,
        log_dir: Optional[str] = None,
        forward_fn: Optional[str] = None,
        gradient_surgery: Optional[Literal["project", "doco"]] = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.model_forward = ModelForward(forward_fn, owner=owner)
        self.forward_fn = forward_fn
        self.retain_weight = check_float("retain_weight", retain_weight, min=0)
        self.forget_passes = check_float("forget_passes", forget_passes, min=0, min_inclusive=False, allow_none=True,
                                         fix="pass the passes over the forget data per epoch, e.g. 1.0, or None")
        self.mask_fraction = check_float("mask_fraction", mask_fraction, min=0, max=1, min_inclusive=False, allow_none=True,
                                         fix="pass the share of weights that may change, e.g. mask_fraction=0.5")
        self.pretrained_ckpt = check_str("pretrained_ckpt", pretrained_ckpt, allow_none=True)
        self.save_original = check_bool("save_original", save_original)
        self.guard_monitor = check_str("guard_monitor", guard_monitor, allow_none=True)
        self.guard_threshold = check_float("guard_threshold", guard_threshold, allow_none=True)
        if (self.guard_monitor is None) != (self.guard_threshold is None):
            raise ValueError(f"{owner}: `guard_monitor` and `guard_threshold` go together, got guard_monitor="
                             f"{guard_monitor!r}, guard_threshold={guard_threshold!r}. Fix: pass both, or neither.")
        self.guard_mode = check_choice("guard_mode", guard_mode, ("below", "above"))
        self.guard_action = check_choice("guard_action", guard_action, ("stop", "warn"))
        self.restore_best = check_str("restore_best", restore_best, allow_none=True)
        self.restore_mode = check_choice("restore_mode", restore_mode, ("max", "min"))
        self.reference_offload = check_bool("reference_offload", reference_offload)
        fix = "pass None, 'project' or 'doco'"
        self.gradient_surgery = None if gradient_surgery is None else check_choice(
            "gradient_surgery", check_str("gradient_surgery", gradient_surgery, fix=fix), SURGERY_MODES, fix=fix)
        self._surgery = None if self.gradient_surgery is None else GradientSurgery(self.gradient_surgery)  # type: ignore[arg-type]
        self.forget_stream = check_str("forget_stream", forget_stream)
        self.retain_stream = check_str("retain_stream", retain_stream)
        self.seed = check_int("seed", seed)
        self.log_dir = check_str("log_dir", log_dir, allow_none=True)
        self.fields = BatchFields(input_key, target_key, owner=owner)
        self.reference: Optional[ReferenceModel] = None
        self._reference_state: Optional[dict[str, Tensor]] = None
        self.mask: Optional[SaliencyMask] = None
        self.best: Optional[dict[str, Any]] = None
        self.saved: list[str] = []
        self._forget: Any = None
        self._retain: Any = None
        self._module: Optional[pl.LightningModule] = None
        self._forget_size: dict[int, Optional[int]] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(mask_fraction=self.mask_fraction)

    def __getstate__(self) -> dict[str, Any]:
        # Runtime objects (the reference model, the step's sub-batches, the module) stay behind:
        # a copy or pickle carries the state only, and rebuilds the reference from it.
        state = dict(self.__dict__)
        state.update(reference=None, _forget=None, _retain=None, _module=None)
        if self._surgery is not None:
            state["_surgery"] = GradientSurgery(self._surgery.mode, self._surgery.strength, self._surgery.add_preservation)
        return state

    # ------------------------------------------------------------------ the hooks methods override
    def forget_loss(self, pl_module: "pl.LightningModule", forget: Any) -> Optional[Tensor]:
        """The forget term of the step (``None``: none). ``forget`` is the forget sub-batch."""
        return None

    def retain_loss(self, pl_module: "pl.LightningModule", retain: Any, module_loss: Tensor) -> Tensor:
        """The retain term of the step; ``module_loss`` is the module's own loss on ``retain``."""
        return self.retain_weight * module_loss

    def parameter_penalty(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Add a parameter-only penalty's gradient (after DDP's reduction, before the mask); default none."""

    # ------------------------------------------------------------------ helpers for the methods
    def logits(self, pl_module: "pl.LightningModule", sub_batch: Any, shift: bool = True) -> tuple[Tensor, Tensor]:
        """``(logits, target)`` of the module's forward on a one-stream sub-batch.

        A causal-LM sub-batch (a dict with ``input_ids`` and ``labels``, Hugging Face's unshifted
        convention) is called as ``f(input_ids, attention_mask=...)``, ``f`` the logits function
        that ``forward_fn`` names (the module's ``forward`` by default), and, with ``shift``,
        its logits and labels are aligned (:func:`~lightning_forget.unlearning.losses.shift_for_next_token`),
        so every token-level loss reads them as it reads a classifier's.
        """
        if is_lm_batch(sub_batch):
            with forward_context(pl_module.trainer):
                logits = _lm_call(pl_module, sub_batch, self.model_forward)
            labels = sub_batch["labels"]
            return L.shift_for_next_token(logits, labels) if shift else (logits, labels)
        split = self.fields.split(sub_batch)
        with forward_context(pl_module.trainer):
            logits = self.model_forward(pl_module, split.input)
        return logits, split.target  # type: ignore[return-value]

    def reference_logits(self, pl_module: "pl.LightningModule", sub_batch: Any) -> Tensor:
        """Logits of the frozen reference on a sub-batch (on the module's device; LM logits unshifted)."""
        reference = self._get_reference(pl_module)
        device = reference.device()
        if is_lm_batch(sub_batch):
            moved = {k: v.to(device) for k, v in sub_batch.items() if isinstance(v, Tensor)}
            with forward_context(pl_module.trainer):
                out = reference(lambda model: _lm_call(model, moved, self.model_forward))
            return out.to(pl_module.device)
        x = self.fields.split(sub_batch).input.to(device)
        with forward_context(pl_module.trainer):
            return reference(lambda model: self.model_forward(model, x))

    def epoch_in_task(self, trainer: "pl.Trainer") -> tuple[int, int]:
        """``(epoch within the current task, epochs per task)`` (one fit per task: the fit's epochs)."""
        schedule = task_schedule(trainer)
        if schedule is not None:
            per = int(schedule.epochs_per_task)
            return trainer.current_epoch % per, per
        return trainer.current_epoch, int(trainer.max_epochs or 1)

    def _get_reference(self, pl_module: "pl.LightningModule") -> ReferenceModel:
        if self.reference is None:
            self._set_reference(ReferenceModel(pl_module, offload=self.reference_offload, state=self._reference_state))
        assert self.reference is not None
        return self.reference

    def _set_reference(self, reference: ReferenceModel) -> None:
        self.reference = reference
        # Held as shards under FSDP2: gathered only when a checkpoint asks (method_state), never
        # kept whole on every rank.
        self._reference_state = None if reference.sharded else reference.state()

    # ------------------------------------------------------------------ setup and task start
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if self.pretrained_ckpt is not None and self._started < 0 and self.task == 0:
            load_pretrained(pl_module, self.pretrained_ckpt, type(self).__name__)
        self.model_forward.check(pl_module)
        if self.mask_fraction is not None and getattr(trainer, "datamodule", None) is not None:
            self._forget_dataset(trainer, 0)  # fail before training when there is no forget data
        self._module = pl_module
        if self.reference is None or not (self.reference.sharded and self.reference.module is pl_module):
            self.reference = None  # rebuilt from the saved weights at its first use
        hooks = training_step_hooks(pl_module)
        hooks.add_batch_transform(self.state_key, self._split_streams)
        hooks.add_loss_term(self.state_key, self._step_loss)

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        remove_training_step_hooks(pl_module, self.state_key)
        self._forget = self._retain = None
        if self._surgery is not None:
            self._surgery.reset()

    def on_task_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        if self.save_original:
            self._save_original(trainer, pl_module, task)
        if self.needs_reference:
            self._set_reference(ReferenceModel(pl_module, offload=self.reference_offload))
        if self.mask_fraction is not None:
            self.mask = self._compute_mask(trainer, pl_module, task)
            rank_zero_info(f"{type(self).__name__} task {task}: saliency mask keeps {self.mask.fraction:.3f} of the weights")
        self.best = None

    def _save_original(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        directory = reporting.results_dir(trainer, self.log_dir)  # every rank: log_dir broadcasts
        path = os.path.join(directory, f"pre_unlearning_task{task}.ckpt")
        sharded = is_sharded(pl_module)
        # Whole tensors in the file: gathered on every rank under FSDP2 (a collective), as a checkpoint is.
        full_state = {k: full_tensor(v) for k, v in pl_module.state_dict().items()} if (
            sharded or trainer.is_global_zero) else {}
        if trainer.is_global_zero:
            os.makedirs(directory, exist_ok=True)
            base, n = path[: -len(".ckpt")], 1
            while os.path.exists(path):  # never replace a file another run wrote
                path, n = f"{base}-v{n}.ckpt", n + 1
            state = {k: v.detach().cpu() for k, v in full_state.items()}
            torch.save({"state_dict": state, "task": task, "global_step": trainer.global_step}, path)
            rank_zero_info(f"{type(self).__name__}: pre-unlearning weights of task {task} saved to {path}")
        self.saved.append(path)

    # ------------------------------------------------------------------ mask
    def _find_forget_dataset(self, trainer: "pl.Trainer", task: int) -> Optional[Dataset]:
        """The task's forget data: the datamodule's ``forget_train_dataset(task)``, else the sized
        dataset of the forget stream of the fit's own train loader (a user's
        ``CombinedLoader({"forget": ..., "retain": ...})`` or dict of loaders, or one loader over a
        dataset of pairs that keeps the forget half as an attribute); ``None`` when there is none."""
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and callable(getattr(dm, "forget_train_dataset", None)):
            return dm.forget_train_dataset(task)
        loader = getattr(trainer.fit_loop, "_combined_loader", None)
        iterables = getattr(loader, "iterables", None)
        if not isinstance(iterables, Mapping):
            source = getattr(trainer, "train_dataloader", None)
            iterables = getattr(source, "iterables", source)
        if isinstance(iterables, Mapping):
            dataset = getattr(iterables.get(self.forget_stream), "dataset", None)
        else:  # one loader of paired samples (ForgetRetainDataModule's PairedDataset keeps its halves)
            dataset = getattr(getattr(iterables, "dataset", None), self.forget_stream, None)
        if isinstance(dataset, Dataset) and hasattr(dataset, "__len__"):
            return dataset
        return None

    def _forget_dataset(self, trainer: "pl.Trainer", task: int) -> Dataset:
        dataset = self._find_forget_dataset(trainer, task)
        if dataset is not None:
            return dataset
        dm = getattr(trainer, "datamodule", None)
        raise RuntimeError(
            f"{type(self).__name__}(mask_fraction={self.mask_fraction}) computes the saliency mask over the task's forget "
            f"data, but the datamodule ({type(dm).__name__}) has no `forget_train_dataset(task)` and the train loader "
            f"has no sized `{self.forget_stream!r}` stream. Fix: use ForgetRetainDataModule, give your datamodule that "
            f"method, or train on a CombinedLoader({{{self.forget_stream!r}: ..., {self.retain_stream!r}: ...}})."
        )

    def _compute_mask(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> SaliencyMask:
        reshard(pl_module)  # FSDP2: the sharded parameters, not a root's weights gathered since a forward
        params = {n: p for n, p in pl_module.named_parameters() if p.requires_grad}
        grads = {n: torch.zeros_like(p) for n, p in params.items()}
        was_training = pl_module.training
        pl_module.eval()
        try:
            collate = getattr(getattr(trainer, "datamodule", None), "collate_fn", None)
            loader = DataLoader(self._forget_dataset(trainer, task), batch_size=256, shuffle=False, collate_fn=collate)
            for batch in loader:  # every rank the whole set: identical masks, no communication
                if is_lm_batch(batch):  # token-level: the aligned next-token CE
                    batch = {k: v.to(pl_module.device) for k, v in batch.items() if isinstance(v, Tensor)}
                    with torch.enable_grad():
                        loss = L.cross_entropy(*self.logits(pl_module, batch))
                else:
                    split = self.fields.split(batch)
                    with torch.enable_grad(), forward_context(trainer):
                        logits = self.model_forward(pl_module, split.input.to(pl_module.device))
                        loss = L.cross_entropy(logits, split.target.to(pl_module.device))  # type: ignore[union-attr]
                # compute_gradients: autograd.grad, or under FSDP2 a backward with `.grad` set aside and put
                # back (every rank runs the whole set, so the reduce-scattered mean is the same gradient)
                for n, value in compute_gradients(loss, params).items():
                    grads[n].add_(value)
        finally:
            pl_module.train(was_training)
        return SaliencyMask.from_gradients(grads, float(self.mask_fraction), params)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ the step
    def _split_streams(self, pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> Any:
        names = stream_names(batch)
        if not names:  # a plain batch: retained data
            self._forget, self._retain = None, batch
            return batch
        self._forget = batch.get(self.forget_stream)
        self._retain = batch.get(self.retain_stream)
        if self._forget is None and self._retain is None:
            raise ValueError(
                f"{type(self).__name__}: the batch's streams are {names}, none of them `forget_stream`="
                f"{self.forget_stream!r} or `retain_stream`={self.retain_stream!r}. Fix: set those arguments to your keys."
            )
        return self._retain if self._retain is not None else self._forget

    def _step_loss(self, pl_module: "pl.LightningModule", batch: Any, batch_idx: int, output: Any) -> Tensor:
        module_loss = output_loss(output)
        assert module_loss is not None
        total = module_loss * 0.0
        if self._retain is not None:
            retain = self.retain_loss(pl_module, self._retain, module_loss)
            pl_module.log(f"{self.log_prefix}/retain_loss", retain.detach(), on_step=True, on_epoch=False)
            total = total + retain
        backward = total
        if self._forget is not None and self._forget_active(pl_module.trainer, batch_idx):
            forget = self.forget_loss(pl_module, self._forget)
            if forget is not None:
                pl_module.log(f"{self.log_prefix}/forget_loss", forget.detach(), on_step=True, on_epoch=False)
                total = total + forget
                if self._surgery is not None and self._retain is not None and bool(torch.isfinite(forget.detach())):
                    # g_u apart from the DDP-reduced backward; combined in on_before_optimizer_step
                    self._surgery.add(forget, pl_module, scale=1.0 / pl_module.trainer.accumulate_grad_batches)
                else:
                    backward = total
        if not bool(torch.isfinite(total.detach())):
            trainer = pl_module.trainer
            saved = f" The pre-unlearning weights are in {self.saved[-1]}." if self.saved else ""
            raise FloatingPointError(
                f"{type(self).__name__}: the unlearning loss is {float(total.detach())} at global step {trainer.global_step} "
                f"(epoch {trainer.current_epoch}, batch {batch_idx}); training stopped.{saved} Fix: lower the learning "
                "rate or the forget weight, or bound the forget loss."
            )
        pl_module.log(f"{self.log_prefix}/loss", total.detach(), on_step=True, on_epoch=False)
        return backward - module_loss  # the hooks add it to the module's loss: the backward is of `backward`

    def _forget_active(self, trainer: "pl.Trainer", batch_idx: int) -> bool:
        """Whether this step is within the epoch's ``forget_passes`` over the forget data (by batch index: resumable)."""
        if self.forget_passes is None:
            return True
        task = self.current_task(trainer)
        if task not in self._forget_size:
            dataset = self._find_forget_dataset(trainer, task)
            self._forget_size[task] = len(dataset) if dataset is not None else None  # type: ignore[arg-type]
        size = self._forget_size[task]
        if size is None:
            return True
        rows = self.fields.split(self._forget).size
        return batch_idx * rows < self.forget_passes * size / trainer.world_size

    # ------------------------------------------------------------------ optimizer step
    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Any) -> None:
        if self._surgery is not None:
            result = self._surgery.apply(trainer.strategy, pl_module.named_parameters())
            if result is not None:
                pl_module.log(f"{self.log_prefix}/surgery_conflicts", result.conflict_fraction, on_step=True, on_epoch=False)
        self.parameter_penalty(trainer, pl_module)
        if self.mask is not None:
            self.mask.mask_gradients(pl_module.named_parameters())

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.mask is not None:
            self.mask.restore(pl_module.named_parameters(), trainer.optimizers)

    # ------------------------------------------------------------------ guard and best model
    def _monitored(self, trainer: "pl.Trainer", key: str, role: str) -> float:
        value = trainer.callback_metrics.get(key)
        if value is None:
            raise RuntimeError(
                f"{type(self).__name__}: `{role}`={key!r} was not logged by this epoch's end; logged keys: "
                f"{sorted(trainer.callback_metrics)}. Fix: name one of them, and list the callback that logs it "
                "(e.g. UnlearningEvaluation) before this one."
            )
        return float(value)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.restore_best is not None:
            score = self._monitored(trainer, self.restore_best, "restore_best")
            better = self.best is None or (score > self.best["score"] if self.restore_mode == "max" else score < self.best["score"])
            if better and math.isfinite(score):
                weights = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
                self.best = {"score": score, "epoch": trainer.current_epoch, "weights": weights}
        if self.guard_monitor is not None:
            value = self._monitored(trainer, self.guard_monitor, "guard_monitor")
            crossed = value < self.guard_threshold if self.guard_mode == "below" else value > self.guard_threshold  # type: ignore[operator]
            crossed = trainer.strategy.reduce_boolean_decision(bool(crossed or not math.isfinite(value)), all=False)
            if crossed:
                text = (f"{type(self).__name__}: divergence guard: {self.guard_monitor}={value:.4g} is "
                        f"{self.guard_mode} {self.guard_threshold} at epoch {trainer.current_epoch}")
                if self.guard_action == "stop":
                    rank_zero_warn(text + "; stopping the run.", category=UserWarning)
                    trainer.should_stop = True
                else:
                    rank_zero_warn(text + ".", category=UserWarning)
        super().on_train_epoch_end(trainer, pl_module)

    def on_task_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        if self.best is not None:
            pl_module.load_state_dict({k: v.to(pl_module.device) for k, v in self.best["weights"].items()})
            rank_zero_info(f"{type(self).__name__} task {task}: restored the weights of epoch {self.best['epoch']} "
                           f"(best {self.restore_best}={self.best['score']:.4g})")

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_train_end(trainer, pl_module)
        if self.saved:
            rank_zero_info(f"{type(self).__name__}: pre-unlearning weights kept in {', '.join(dict.fromkeys(self.saved))}")

    # ------------------------------------------------------------------ state
    def method_state(self) -> dict[str, Any]:
        best = None if self.best is None else {"score": float(self.best["score"]), "epoch": int(self.best["epoch"]),
                                               "weights": dict(self.best["weights"])}
        reference = self._reference_state
        if reference is None and self.reference is not None:
            reference = self.reference.state()  # whole tensors gathered from the shards (collective)
        params = None
        if self._module is not None:
            reshard(self._module)
            params = dict(self._module.named_parameters())
        return {
            "reference": None if reference is None else dict(reference),
            "mask": None if self.mask is None else self.mask.state(params),
            "best": best,
            "saved": list(self.saved),
        }

    def load_method_state(self, state: dict[str, Any]) -> None:
        self._reference_state = None if state["reference"] is None else dict(state["reference"])
        self.reference = None
        self.mask = None if state["mask"] is None else SaliencyMask.from_state(state["mask"])
        self.best = None if state["best"] is None else dict(state["best"])
        self.saved = list(state["saved"])


class FineTune(UnlearningMethod):
    """FT: fine-tune on the retained data only (the forget stream is ignored), a reference point of unlearning.

    Everything else is :class:`UnlearningMethod` (safety rails, optional mask, ``pretrained_ckpt``).
    The official FT (Unlearn-Sparse ``unlearn/FT.py``) trains 10 epochs at lr 0.01 on ``D_r``.
    """


class GradientAscent(UnlearningMethod):
    """GA (NegGrad): ascend the cross-entropy of the forget data; optionally keep training on retained data.

    Thudi et al., "Unrolling SGD" (EuroS&P 2022), as in Unlearn-Sparse ``unlearn/GA.py``
    and open-unlearning ``GradAscent``. Step loss:
    ``forget_weight·(−CE(forget))`` (or, with ``bound``, GS-LoRA's ``ReLU(bound − CE)``) ``+
    retain_weight·L_r``.

    Args:
        forget_weight: weight of the forget term (default 1).
        retain_weight: weight ``λ`` of the module's loss on retained data (default 0: pure GA; a
            retain forward still runs when the batch has a retain stream, its gradient cancelled).
        bound: ``None`` (default) or the bound of ``ReLU(bound − CE)``.
        **kwargs: :class:`UnlearningMethod`'s arguments.
    """

    method_name = "GradientAscent"
    log_prefix = "ga"

    def __init__(self, forget_weight: float = 1.0, retain_weight: float = 0.0, bound: Optional[float] = None,
                 **kwargs: Any) -> None:
        super().__init__(retain_weight=retain_weight, **kwargs)
        self.forget_weight = check_float("forget_weight", forget_weight, min=0)
        self.bound = check_float("bound", bound, min=0, allow_none=True)

    def forget_loss(self, pl_module: "pl.LightningModule", forget: Any) -> Optional[Tensor]:
        logits, target = self.logits(pl_module, forget)
        return self.forget_weight * L.gradient_ascent_loss(logits, target, self.bound)


class GradDiff(UnlearningMethod):
    """GradDiff: ``γ·(−CE(forget)) + α·retain term``, the retain term the module's loss or ``KL(p_ref ‖ p_θ)``.

    Liu et al., "Continual Learning and Private Unlearning" (CoLLAs 2022); open-unlearning
    ``GradDiff`` (defaults ``γ = α = 1``, ``retain_loss_type: NLL``).

    Args:
        gamma: weight of the forget term (default 1).
        alpha: weight of the retain term (default 1).
        retain_loss: ``"nll"`` (the module's own loss on retained data) or ``"kl"`` (the KL of the
            frozen reference's predictions to the model's on retained data, every position).
        **kwargs: :class:`UnlearningMethod`'s arguments.
    """

    method_name = "GradDiff"
    log_prefix = "graddiff"

    def __init__(self, gamma: float = 1.0, alpha: float = 1.0, retain_loss: Literal["nll", "kl"] = "nll",
                 **kwargs: Any) -> None:
        self.retain_loss_type = check_choice("retain_loss", retain_loss, ("nll", "kl"))
        super().__init__(retain_weight=check_float("alpha", alpha, min=0), **kwargs)
        self.gamma = check_float("gamma", gamma, min=0)
        self.alpha = self.retain_weight
        self.needs_reference = self.retain_loss_type == "kl"

    def forget_loss(self, pl_module: "pl.LightningModule", forget: Any) -> Optional[Tensor]:
        logits, target = self.logits(pl_module, forget)
        return self.gamma * L.gradient_ascent_loss(logits, target)

    def retain_loss(self, pl_module: "pl.LightningModule", retain: Any, module_loss: Tensor) -> Tensor:
        if self.retain_loss_type == "nll":
            return self.alpha * module_loss
        logits, _ = self.logits(pl_module, retain, shift=False)
        return self.alpha * L.kl_to_reference(logits, self.reference_logits(pl_module, retain)) + 0.0 * module_loss


class RandomLabels(UnlearningMethod):
    """RL: train the forget data toward random labels, and the retained data toward the true ones.

    Golatkar et al. (CVPR 2020)'s baseline as SalUn's ``unlearn/RL.py`` runs it: CE of the forget
    batch against uniformly random labels plus the module's loss on retained data.

    Args:
        forget_weight: weight of the forget term (default 1).
        exclude_true: draw from the other classes only (default False: all classes, as ``RL.py``).
        **kwargs: :class:`UnlearningMethod`'s arguments (``retain_weight`` default 1).

    Note:
        The labels are drawn afresh each step from a generator seeded by ``(seed, global step,
        rank)`` (reproducible and resumable); ``RL.py`` draws one label per sample once.
    """

    method_name = "RandomLabels"
    log_prefix = "rl"

    def __init__(self, forget_weight: float = 1.0, exclude_true: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.forget_weight = check_float("forget_weight", forget_weight, min=0)
        self.exclude_true = check_bool("exclude_true", exclude_true)

    def forget_loss(self, pl_module: "pl.LightningModule", forget: Any) -> Optional[Tensor]:
        logits, target = self.logits(pl_module, forget)
        trainer = pl_module.trainer
        generator = rank_generator(self.seed, trainer.global_step, trainer.global_rank)
        labels = L.random_labels(target, logits.shape[-1], generator, self.exclude_true)
        return self.forget_weight * L.cross_entropy(logits, labels)


class SalUn(RandomLabels):
    """SalUn: random labels with updates restricted to the weights most salient for the forget loss.

    Fan et al., "SalUn: Empowering Machine Unlearning via Gradient-based Weight Saliency in Both
    Image Classification and Generation" (ICLR 2024). :class:`RandomLabels` with
    ``mask_fraction=γ`` (default 0.5, the README's ``with_0.5.pt``); the mask is
    :class:`~lightning_forget.unlearning.SaliencyMask` and works with any method's ``mask_fraction``.

    Args:
        mask_fraction: share of weights updated (default 0.5).
        **kwargs: :class:`RandomLabels`' arguments.
    """

    method_name = "SalUn"
    log_prefix = "salun"

    def __init__(self, mask_fraction: float = 0.5, **kwargs: Any) -> None:
        super().__init__(mask_fraction=mask_fraction, **kwargs)


class L1Sparse(UnlearningMethod):
    """ℓ1-sparse: fine-tune on the retained data with a linearly decaying ``α_e·‖θ‖₁``.

    Jia et al., "Model Sparsity Can Simplify Machine Unlearning" (NeurIPS 2023), Unlearn-Sparse
    ``FT_prune``: ``α_e = α·(1 − e/(E − no_l1_epochs))`` in epoch ``e`` of ``E`` (per task), 0 in
    the last ``no_l1_epochs``. The penalty's gradient ``α_e·sign(θ)`` is added to every trainable
    parameter after DDP's reduction (the same on every rank).

    Args:
        alpha: the initial weight ``α`` (default 5e-4; ours: sweep it, the official scripts pass it
            per experiment).
        no_l1_epochs: final epochs without the penalty (default 0).
        **kwargs: :class:`UnlearningMethod`'s arguments.

    Logged: ``l1sparse/l1_alpha`` per step.
    """

    method_name = "L1Sparse"
    log_prefix = "l1sparse"

    def __init__(self, alpha: float = 5e-4, no_l1_epochs: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.alpha = check_float("alpha", alpha, min=0)
        self.no_l1_epochs = check_int("no_l1_epochs", no_l1_epochs, min=0)

    def current_alpha(self, trainer: "pl.Trainer") -> float:
        epoch, epochs = self.epoch_in_task(trainer)
        return L.l1_alpha(self.alpha, epoch, epochs, self.no_l1_epochs)

    def parameter_penalty(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        alpha = self.current_alpha(trainer)
        pl_module.log("l1sparse/l1_alpha", alpha, on_step=True, on_epoch=False)
        if alpha == 0:
            return
        with torch.no_grad():
            for p in pl_module.parameters():
                if p.requires_grad:
                    step = alpha * torch.sign(p)
                    if p.grad is None:
                        p.grad = step.clone()
                    else:
                        p.grad.add_(step)


class SCRUB(UnlearningMethod):
    """SCRUB: a student moves away from its frozen teacher on forget data and stays close on retained data.

    Kurmanji et al., "Towards Unbounded Machine Unlearning" (NeurIPS 2023). Teacher = the model at
    the task's start (frozen :class:`~lightning_forget.unlearning.ReferenceModel`). In the first
    ``msteps`` epochs of a task the step adds the max term ``−KL_T(teacher ‖ student)`` on the
    forget batch; every step has the min term ``γ·L_r + α·KL_T(teacher ‖ student)`` on the retain
    batch, ``KL_T`` being ``DistillKL`` (``T²``-scaled, per sample). Defaults: the official
    large-scale CIFAR-10 setting (``T = 4``, ``γ = 0.99``, ``α = 0.001``, ``msteps = 2``; SGD lr
    5e-4, 3 epochs in its notebook).

    Args:
        temperature: ``T`` (default 4).
        gamma: weight of the module's loss on retained data (default 0.99).
        alpha: weight of the retained-data KL (default 0.001).
        msteps: epochs per task with the max term (default 2).
        forget_weight: weight of the max term (default 1).
        **kwargs: :class:`UnlearningMethod`'s arguments.

    Note:
        The official loop runs a max pass over the forget data and then a min pass over the
        retained data in each epoch; here both terms are in one step of a two-stream batch.
    """

    method_name = "SCRUB"
    log_prefix = "scrub"
    needs_reference = True

    def __init__(self, temperature: float = 4.0, gamma: float = 0.99, alpha: float = 0.001, msteps: int = 2,
                 forget_weight: float = 1.0, **kwargs: Any) -> None:
        super().__init__(retain_weight=check_float("gamma", gamma, min=0), **kwargs)
        self.temperature = check_float("temperature", temperature, min=0, min_inclusive=False)
        self.gamma = self.retain_weight
        self.alpha = check_float("alpha", alpha, min=0)
        self.msteps = check_int("msteps", msteps, min=0)
        self.forget_weight = check_float("forget_weight", forget_weight, min=0)

    def forget_loss(self, pl_module: "pl.LightningModule", forget: Any) -> Optional[Tensor]:
        epoch, _ = self.epoch_in_task(pl_module.trainer)
        if epoch >= self.msteps:
            return None
        logits, _ = self.logits(pl_module, forget, shift=False)
        return self.forget_weight * L.scrub_max_loss(logits, self.reference_logits(pl_module, forget), self.temperature)

    def retain_loss(self, pl_module: "pl.LightningModule", retain: Any, module_loss: Tensor) -> Tensor:
        logits, _ = self.logits(pl_module, retain, shift=False)
        kl = L.distill_kl(logits, self.reference_logits(pl_module, retain), self.temperature)
        return self.gamma * module_loss + self.alpha * kl
