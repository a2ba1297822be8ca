"""AdaB²N as a callback: convert the model's BatchNorm2d layers and drive them through the stream."""

from __future__ import annotations

from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_forget.losses import CopySafeHook, ReplaySegment, StepContext, remove_training_step_hooks, step_context, training_step_hooks
from lightning_forget.nn.adab2n import AdaB2NBatchNorm2d, adab2n_conflicts, adab2n_layers, convert_adab2n
from lightning_forget.sharding import broadcast_buffers, is_sharded
from lightning_forget.tasks import DDP_STRATEGIES, SHARDED_STRATEGIES, ContinualCallback, strategy_name, task_schedule
from lightning_forget.validation import check_bool, check_float, check_int

try:  # Python 3.12+
    from typing import override
except ImportError:  # pragma: no cover
    from typing_extensions import override

__all__ = ["AdaB2N"]


def _rows_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Optional[int]:
    """The batch size of a forward call: the first dimension of its first tensor argument."""
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, Tensor) and value.dim() > 0:
            return int(value.shape[0])
        if isinstance(value, dict):
            for item in value.values():
                if isinstance(item, Tensor) and item.dim() > 0:
                    return int(item.shape[0])
    return None


def check_convertible(module: torch.nn.Module) -> None:
    """Refuse a module sharded (FSDP2) before its ``BatchNorm2d`` layers were converted.

    Raises:
        RuntimeError: ``module`` is sharded and still has ``BatchNorm2d`` layers.
    """
    if is_sharded(module) and any(type(m) is torch.nn.BatchNorm2d for m in module.modules()):
        raise RuntimeError(
            f"AdaB2N converts the BatchNorm2d layers of {type(module).__name__} into AdaB2N layers, but the "
            "module is already sharded (fully_shard ran before the callback's setup), and a sharded layer cannot "
            "be replaced. Fix: call `fully_shard` in the module's `configure_model` (Lightning runs it after the "
            "callbacks' setup), or convert first: `lightning_forget.nn.convert_adab2n(module, num_tasks, kappa)` "
            "before `fully_shard`."
        )


class AdaB2N(ContinualCallback):
    """AdaB²N (Lyu et al., NeurIPS 2023): task-balanced BatchNorm statistics for a continual run.

    In ``setup`` (before the optimizers exist, so the task weights are trained by the module's
    optimizer like every other parameter) every ``nn.BatchNorm2d`` of the module is replaced by an
    :class:`~lightning_forget.nn.AdaB2NBatchNorm2d` (see there for the statistics). Then, for
    every training forward through the layers (hooks on the layers themselves, so it makes no
    difference whether ``training_step`` calls ``self(x)`` or a submodule such as ``self.net(x)``;
    the module needs no ``forward``), the layers get each row's task id:

    - rows the loader produced: the current task;
    - rows a replay callback appended (:class:`~lightning_forget.callbacks.ExperienceReplay`; the
      rows recorded in :func:`~lightning_forget.losses.step_context`): the task each was stored in;
    - rows :class:`~lightning_forget.callbacks.DarkExperienceReplay` joins to the step's forward
      (:attr:`~lightning_forget.losses.StepContext.joined_forward`): the task each was stored in;
    - forwards of stored samples outside the user's step (the k-FPF/FPF fine-tuning on buffer
      batches, or a callback's own forward, marked with
      :meth:`~lightning_forget.losses.StepContext.forward_of_stored`): the stored task ids;
    - other training-mode forwards outside the step (refresh learning's unlearn forward on the
      loader's batch): the current task.

    Where a buffer has no task id for a row (``-1``: restored from an old checkpoint), the task is
    taken from the label, ``label // classes_per_task``, when ``classes_per_task`` is given (class-
    incremental streams with contiguous classes per task only); otherwise the step raises.

    From task ``ada_t0`` on, ``lambd · Σ_layers stat_loss`` is added to the step's loss through
    :func:`~lightning_forget.losses.training_step_hooks` (one loss, one backward, also under DDP),
    summed over the training forwards of the step (one with the library's replay callbacks). At
    each task end every layer's task index advances. Forwards outside the step (refresh's unlearn
    forward, the k-FPF/FPF fine-tuning) add no statistics loss; refresh restores the layers'
    buffers after its forward, the fine-tuning refits them on buffer batches.

    As in the official code, the layers see one joined batch per step: with
    :class:`~lightning_forget.callbacks.ExperienceReplay` the buffer rows join the stream batch
    (the official ER-ACE variant); with :class:`~lightning_forget.callbacks.DarkExperienceReplay`
    its two buffer draws are appended to the step's one forward (the official DER++ variant), so
    the statistics mix stream and buffer rows, the momentum recursion advances once per step and
    the statistics loss is counted once. The official ER-ACE variant adds no statistics loss
    during all of task 0 (its stream and buffer are joined only from task 1 on): ``ada_t0=1``
    reproduces that.

    Args:
        kappa: ``κ`` of the running-statistics momentum (1: BatchNorm's EMA, 0: cumulative average).
            The official code has no default and sweeps {0.1, 0.4, 0.7, 1.0}; 0.7 is one point of it.
        lambd: weight ``λ`` of the statistics loss. No official default (grid {0.01, 0.1, 1, 10} on
            CIFAR); 0.1 is one point of it.
        ada_t0: first task whose steps get the statistics loss (official grid {0, 1}).
        num_tasks: tasks of the stream (the length of the task weights); default: the
            datamodule's ``num_tasks``.
        init_weight: initial task weight ``w_k`` (official default 0.0).
        renormalize: spread absent tasks' mass over present ones (off, as the official code).
        classes_per_task: the labels-to-task fallback for rows without a stored task id.
        target_key: the buffer field holding the labels of stored rows (``"y"`` for tuple batches).

    Raises:
        TypeError / ValueError: an argument of the wrong type or range.
        RuntimeError: ``Trainer(sync_batchnorm=True)``; a module without ``BatchNorm2d`` layers;
            a module sharded before ``setup`` that still has ``BatchNorm2d`` layers;
            AdaB²N layers already in the module with another ``num_tasks``, ``kappa`` or
            ``renormalize`` than the callback's;
            no ``num_tasks``; a training forward whose rows do not match the step's batch; a
            replayed row without task id and no ``classes_per_task``.

    Note:
        Logged keys: ``adab2n/stat_loss`` (the unweighted sum of the layers' statistics losses).
        Saved state: none besides the task counters; the layers' task index, momentum recursion,
        step counter and task weights are buffers and parameters of the model, saved with it.
        Under DDP every rank keeps its own statistics between task ends (as BatchNorm does; with
        ``broadcast_buffers=True`` DDP copies rank 0's before each training forward); at each task
        end the layers' buffers are broadcast from rank 0, so the checkpointed model is the same
        on every rank.

        Under ``ModelParallelStrategy`` (FSDP2), which neither shards nor synchronises buffers,
        the callback broadcasts the layers' buffers from rank 0 before each training step's
        forward that DDP would sync (not on the accumulation micro-batches DDP runs under
        ``no_sync``), with :func:`lightning_forget.sharding.broadcast_buffers`, so the run equals
        DDP's; and again after that step, because a sharded checkpoint writes each buffer (a
        replicated tensor) from whichever rank ``torch.distributed.checkpoint`` picks, so a
        resume would otherwise start from another rank's statistics. Deviation from DDP: between
        steps every rank holds rank 0's statistics (under DDP the other ranks keep their own
        until the next step), which only an evaluation-mode forward on another rank can see. The conversion must happen before ``fully_shard``: the callback converts in
        ``setup``, which Lightning runs before ``configure_model``; a module sharded earlier
        (``fully_shard`` in ``__init__``) that still has ``BatchNorm2d`` layers is refused.
    """

    #: Tested single-process, under DDP and under ModelParallelStrategy (FSDP2).
    supported_strategies: tuple[str, ...] = DDP_STRATEGIES + SHARDED_STRATEGIES
    #: Constructor arguments whose change a resume refuses (see ContinualCallback.state_arguments).
    state_arguments: tuple[str, ...] = ('num_tasks', 'classes_per_task')
    #: Whether the task end edits weights (then it runs inside tasks.atomic_edit).
    task_end_edits_weights = True

    def __init__(
        self,
        kappa: float = 0.7,
        lambd: float = 0.1,
        ada_t0: int = 0,
        num_tasks: Optional[int] = None,
        init_weight: float = 0.0,
        renormalize: bool = False,
        classes_per_task: Optional[int] = None,
        target_key: str = "y",
    ) -> None:
        super().__init__()
        self.kappa = check_float("kappa", kappa, min=0.0, max=1.0, fix="pass a kappa in [0, 1], e.g. 0.7")
        self.lambd = check_float("lambd", lambd, min=0.0, fix="pass a finite weight >= 0, e.g. 0.1")
        self.ada_t0 = check_int("ada_t0", ada_t0, min=0, fix="pass the first task (0-based) with the statistics loss")
        self.num_tasks = check_int("num_tasks", num_tasks, min=1, allow_none=True,
                                   fix="pass the number of tasks, or None to read it from the datamodule")
        self.init_weight = check_float("init_weight", init_weight)
        self.renormalize = check_bool("renormalize", renormalize)
        self.classes_per_task = check_int("classes_per_task", classes_per_task, min=1, allow_none=True,
                                          fix="pass the classes per task of a contiguous class-incremental stream, or None")
        if not isinstance(target_key, str):
            raise TypeError(f"`target_key` must be a str (the buffer field of the labels, e.g. 'y'), got {target_key!r}.")
        self.target_key = target_key
        self._layers: list[AdaB2NBatchNorm2d] = []
        self._losses: list[Tensor] = []
        self._in_step = False
        self._handles: list[Any] = []
        self._ids_cache: Optional[tuple[Any, Tensor]] = None
        self._trainer: Optional["pl.Trainer"] = None
        self._sharded = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(kappa=self.kappa, lambd=self.lambd, ada_t0=self.ada_t0)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update({"_layers": [], "_losses": [], "_handles": [], "_trainer": None, "_in_step": False,
                      "_ids_cache": None})
        return state

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            # validate/test/predict with `ckpt_path` of an AdaB2N run: the module needs AdaB2N's
            # layers to load that checkpoint (its task weights and statistics are evaluated as saved).
            datamodule = task_schedule(trainer)
            num_tasks = self.num_tasks if self.num_tasks is not None else getattr(datamodule, "num_tasks", None)
            if num_tasks is not None and not adab2n_layers(pl_module):
                convert_adab2n(pl_module, int(num_tasks), self.kappa, init_weight=self.init_weight, renormalize=self.renormalize)
            return
        if getattr(trainer.strategy, "_layer_sync", None) is not None:
            raise RuntimeError(
                "AdaB2N does not support `Trainer(sync_batchnorm=True)`: its task-balanced statistics are "
                "computed per rank (as in the official code) and have no synchronised form, and its layers "
                "are deliberately not BatchNorm subclasses, so SyncBatchNorm would not convert them. "
                "Fix: pass `sync_batchnorm=False`."
            )
        num_tasks = self.num_tasks
        if num_tasks is None:
            datamodule = task_schedule(trainer)
            if datamodule is None:
                raise RuntimeError(
                    "AdaB2N needs the number of tasks (the length of the task weights), and the datamodule "
                    "does not say it (one fit per task). Fix: pass `AdaB2N(num_tasks=...)`."
                )
            num_tasks = int(datamodule.num_tasks)
        check_convertible(pl_module)
        self._sharded = strategy_name(trainer.strategy) in SHARDED_STRATEGIES and trainer.world_size > 1
        conflicts = adab2n_conflicts(pl_module, num_tasks, self.kappa, self.renormalize)
        if conflicts:
            raise RuntimeError(
                f"AdaB2N(num_tasks={num_tasks}, kappa={self.kappa}, renormalize={self.renormalize}) found AdaB2N "
                f"layers already in {type(pl_module).__name__} with other settings ({'; '.join(conflicts)}); they "
                "would be used as they are, not with this callback's settings. Fix: pass the layers' settings to "
                "AdaB2N, or give it a model with BatchNorm2d layers to convert."
            )
        convert_adab2n(pl_module, num_tasks, self.kappa, init_weight=self.init_weight, renormalize=self.renormalize)
        self._layers = adab2n_layers(pl_module)
        if not self._layers:
            raise RuntimeError(
                f"AdaB2N found no nn.BatchNorm2d layer in {type(pl_module).__name__} to convert (only modules "
                "whose type is exactly BatchNorm2d are). Fix: use a backbone with BatchNorm2d, e.g. "
                "`ContinualClassifier(backbone='resnet')`."
            )
        self._trainer = trainer
        hooks = training_step_hooks(pl_module)
        hooks.add_batch_transform(self.state_key, self._start_step)
        hooks.add_loss_term(self.state_key, self._stat_term)
        if not self._handles:
            # Hooks on the converted layers themselves, where the statistics are computed: they see
            # every forward, whether `training_step` calls `self(x)` or a submodule (`self.net(x)`).
            for layer in self._layers:
                self._handles.append(layer.register_forward_pre_hook(CopySafeHook(self._before_layer)))
                self._handles.append(layer.register_forward_hook(CopySafeHook(self._after_layer)))

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        remove_training_step_hooks(pl_module, self.state_key)
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._losses = []
        self._ids_cache = None
        self._in_step = False

    # ------------------------------------------------------------------ per step
    def _start_step(self, pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> Any:
        # The statistics term runs last, after the terms (DER++) whose forwards it sums.
        training_step_hooks(pl_module).terms.move_to_end(self.state_key)
        trainer = self._trainer
        if self._sharded and trainer is not None and not trainer.fit_loop.epoch_loop._should_accumulate():
            # DDP (broadcast_buffers=True) copies rank 0's buffers before each syncing training forward.
            broadcast_buffers(self._layers)
        self._losses = []
        self._ids_cache = None
        self._in_step = True
        return batch

    def _labels_to_tasks(self, segment: ReplaySegment) -> Tensor:
        labels = segment.fields.get(self.target_key)
        if self.classes_per_task is None or labels is None:
            why = "no task ids" if segment.task_ids is None else "rows with task id -1"
            raise RuntimeError(
                f"AdaB2N: the replayed rows of {segment.source} have {why}, so their task is unknown. Fix: "
                "pass `AdaB2N(classes_per_task=...)` for a class-incremental stream with contiguous classes "
                f"per task (labels under the buffer field {self.target_key!r}, see `target_key`), or use a buffer "
                "that stores task ids."
            )
        return labels.detach().cpu().long() // self.classes_per_task

    def _segment_ids(self, segment: ReplaySegment) -> Tensor:
        ids = segment.task_ids
        if ids is None or bool((ids < 0).any()):
            fallback = self._labels_to_tasks(segment)
            ids = fallback if ids is None else torch.where(ids.cpu() < 0, fallback, ids.cpu())
        return ids.cpu().long()

    def row_task_ids(self, context: StepContext, rows: int, task: int) -> Tensor:
        """The task id of each of the ``rows`` rows of the training forward about to run, in a
        step with ``context`` during ``task``."""
        if context.stored_forward is not None:
            ids = self._segment_ids(context.stored_forward)
            if int(ids.numel()) != rows:
                raise RuntimeError(
                    f"AdaB2N: {context.stored_forward.source} announced a forward of {ids.numel()} stored rows, "
                    f"but the module's forward got {rows} rows."
                )
            return ids
        if not self._in_step:  # a training-mode forward outside the step: stream samples
            return torch.full((rows,), task, dtype=torch.long)
        segments = [s for s in context.segments if s.stream is None]
        joined = list(context.joined_forward)  # rows appended to this forward only (DER++ draws)
        stream = context.loader_size(None)
        if stream is None:
            stream = rows - sum(s.stop - s.start for s in segments + joined)
        replayed = sum(s.stop - s.start for s in segments)
        extra = sum(s.stop - s.start for s in joined)
        expected = stream + replayed + extra
        if rows != expected:
            raise RuntimeError(
                f"AdaB2N: the training forward got {rows} rows, but the step's batch has {stream + replayed} "
                f"({stream} from the loader, {replayed} replayed)"
                + (f" and {extra} buffer rows were joined to this forward" if extra else "")
                + ", so the rows' tasks are unknown. "
                "Fix: call the module's forward on the whole batch of the step (`self(x)` or `self.net(x)`), or mark "
                "forwards of other rows with `lightning_forget.losses.step_context(module).forward_of_stored`."
            )
        parts = [torch.full((stream,), task, dtype=torch.long)] + [self._segment_ids(s) for s in segments + joined]
        return torch.cat(parts)

    def _before_layer(self, layer: AdaB2NBatchNorm2d, args: tuple[Any, ...]) -> None:
        trainer = self._trainer
        if not layer.training or trainer is None or not trainer.training or trainer.lightning_module is None:
            return
        rows = _rows_of(args, {})
        if rows is None:
            return
        context = step_context(trainer.lightning_module)
        task = self.current_task(trainer)
        # Every layer of one forward sees the same rows: compute their task ids once.
        key = (context, context.stored_forward, rows, task, self._in_step)
        cached = self._ids_cache
        if cached is None or not all(a is b for a, b in zip(cached[0][:2], key[:2])) or cached[0][2:] != key[2:]:
            self._ids_cache = (key, self.row_task_ids(context, rows, task))
        layer.set_task_ids(self._ids_cache[1])

    def _after_layer(self, layer: AdaB2NBatchNorm2d, args: Any, output: Any) -> None:
        if layer.training and self._in_step and layer.stat_loss is not None:
            self._losses.append(layer.stat_loss.float())

    def _stat_term(self, pl_module: "pl.LightningModule", batch: Any, batch_idx: int, output: Any) -> Optional[Tensor]:
        self._in_step = False
        losses, self._losses = self._losses, []
        if not losses or self.current_task(pl_module.trainer) < self.ada_t0:
            return None
        total = torch.stack(losses).sum()
        pl_module.log("adab2n/stat_loss", total.detach(), on_step=True, on_epoch=False)
        return self.lambd * total

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._in_step = False
        self._losses = []
        self._ids_cache = None
        if self._sharded and not trainer.fit_loop.epoch_loop._should_accumulate():
            # A sharded checkpoint of this step writes each (replicated) buffer from whichever rank
            # torch.distributed.checkpoint picks: make that rank 0's, as DDP's checkpoint holds.
            broadcast_buffers(self._layers)

    # ------------------------------------------------------------------ task events
    @override
    def on_task_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        layers = self._layers or adab2n_layers(pl_module)
        if trainer.world_size > 1:
            # Rank 0's statistics are the model's (what DDP's broadcast_buffers does every step).
            broadcast_buffers(layers)
        for layer in layers:
            layer.next_task()
