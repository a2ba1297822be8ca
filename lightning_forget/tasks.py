"""The task protocol: which task a run is in, and callbacks that react to task boundaries.

A continual run is a sequence of tasks. ``lightning_forget`` supports two ways of running one:

1. **One fit over a** :class:`~lightning_forget.datamodules.ContinualDataModule`: the datamodule
   knows ``num_tasks`` and ``epochs_per_task``; the task of an epoch is
   ``epoch // epochs_per_task``; ``train_dataloader()`` serves the current task, so the Trainer
   must reload dataloaders every epoch (``reload_dataloaders_every_n_epochs=1``). Checkpoints and
   resume need nothing special: the epoch says where the run is.
2. **One fit per task** with plain datamodules (a new dataset each time) and the same callback
   objects: each ``fit`` is one task, and the task counter lives in the callback's
   ``state_dict``.

:class:`ContinualCallback` turns either mode into ``on_task_start`` / ``on_task_end`` events and
:func:`current_task` tells any code the task the trainer is in.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_forget.arguments import ARGUMENTS_ATTR, compare_arguments, describe_change, plain_value, record_init_arguments
from lightning_forget.distributed import unshare_memory
from lightning_forget.sharding import sharding_refusal

try:  # Python 3.12+
    from typing import override
except ImportError:  # pragma: no cover
    from typing_extensions import override

__all__ = [
    "ContinualCallback",
    "atomic_edit",
    "current_task",
    "fit_ends_after_batch",
    "is_continual_datamodule",
    "is_last_batch_of_epoch",
    "strategy_name",
    "task_schedule",
]

#: The strategies every method is tested under (one process; DDP with each start method).
DDP_STRATEGIES: tuple[str, ...] = ("single_device", "ddp", "ddp_spawn", "ddp_fork")

#: Sharded strategies a method may add to its ``supported_strategies`` once its per-parameter
#: work goes through :mod:`lightning_forget.sharding` (FSDP2 through ``ModelParallelStrategy``).
SHARDED_STRATEGIES: tuple[str, ...] = ("model_parallel",)

_DDP_START_METHODS = {"popen": "ddp", "spawn": "ddp_spawn", "fork": "ddp_fork", "forkserver": "ddp_forkserver"}


def strategy_name(strategy: Any) -> str:
    """The registry-style name of a Lightning strategy object, decided by its class.

    ``"single_device"``, ``"ddp"``/``"ddp_spawn"``/``"ddp_fork"`` (a ``DDPStrategy`` by its start
    method), ``"fsdp"``, ``"deepspeed"``, ``"model_parallel"``, ``"xla"``, ``"single_xla"``; any
    other class gives its class name.
    """
    from lightning.pytorch import strategies as st

    # Most specific first: DeepSpeed and XLA subclass DDPStrategy, single-device XLA subclasses
    # SingleDeviceStrategy.
    for cls_name, name in (
        ("DeepSpeedStrategy", "deepspeed"),
        ("XLAStrategy", "xla"),
        ("SingleDeviceXLAStrategy", "single_xla"),
        ("FSDPStrategy", "fsdp"),
        ("ModelParallelStrategy", "model_parallel"),
    ):
        cls = getattr(st, cls_name, None)
        if cls is not None and isinstance(strategy, cls):
            return name
    if isinstance(strategy, st.DDPStrategy):
        method = getattr(strategy, "_start_method", "popen")
        return _DDP_START_METHODS.get(method, f"ddp_{method}")
    if isinstance(strategy, st.SingleDeviceStrategy):
        return "single_device"
    return type(strategy).__name__


def check_strategy(callback: Any, trainer: "pl.Trainer") -> None:
    """Refuse a strategy the callback does not declare in ``supported_strategies``."""
    supported = tuple(callback.supported_strategies)
    name = strategy_name(trainer.strategy)
    if name == "model_parallel" and name not in supported:
        raise RuntimeError(
            f"{type(callback).__name__} does not support strategy={name!r} (ModelParallelStrategy: FSDP2 "
            f"parameters sharded across ranks): it supports {list(supported)}. "
            f"{sharding_refusal(type(callback))}"
            "Fix: use `strategy=\"ddp\"` (or one device); the callbacks that run sharded are listed in "
            "docs/sharding.md."
        )
    if name not in supported:
        raise RuntimeError(
            f"{type(callback).__name__} does not support strategy={name!r} "
            f"({type(trainer.strategy).__name__}): it supports {list(supported)}. Sharded strategies "
            "(FSDP, DeepSpeed, model parallel) split parameters and optimizer state across ranks, "
            "which this method's weight and state handling does not do. Fix: use `strategy=\"ddp\"` "
            "(or one device)."
        )


def is_continual_datamodule(datamodule: Any) -> bool:
    """Whether ``datamodule`` drives a task sequence inside one fit (duck-typed)."""
    return (
        datamodule is not None
        and hasattr(datamodule, "num_tasks")
        and hasattr(datamodule, "epochs_per_task")
        and callable(getattr(datamodule, "task_of_epoch", None))
    )


def task_schedule(trainer: "pl.Trainer") -> Optional[Any]:
    """The trainer's continual datamodule, or ``None`` when the run is one task per fit."""
    datamodule = getattr(trainer, "datamodule", None)
    return datamodule if is_continual_datamodule(datamodule) else None


def current_task(trainer: "pl.Trainer") -> int:
    """The index (0-based) of the task the trainer is training on now.

    With a continual datamodule this is ``datamodule.task_of_epoch(trainer.current_epoch)``.
    With one fit per task it is the counter of the first :class:`ContinualCallback` attached to
    the trainer. Without either, the run is a single task: 0.

    Outside ``fit`` (``validate``/``test``/``predict``, whose epoch counter is not restored from a
    checkpoint) it is the last task the model was trained on: the last task started by the
    attached :class:`ContinualCallback` (restored from the checkpoint), else the stream's last.
    """
    datamodule = task_schedule(trainer)
    fn = getattr(getattr(trainer, "state", None), "fn", None)
    if fn is not None and fn != TrainerFn.FITTING:
        started = [cb._started for cb in getattr(trainer, "callbacks", []) if isinstance(cb, ContinualCallback)]
        if started and max(started) >= 0:
            return max(started)
        if datamodule is not None and trainer.current_epoch == 0:
            return int(datamodule.task_of_epoch(int(datamodule.max_epochs) - 1))
    if datamodule is not None:
        return int(datamodule.task_of_epoch(trainer.current_epoch))
    for callback in getattr(trainer, "callbacks", []):
        if isinstance(callback, ContinualCallback):
            return callback.task
    return 0


def check_dataloader_reloading(trainer: "pl.Trainer") -> None:
    """Raise a clear error when a continual datamodule would not get its next task's loader."""
    datamodule = task_schedule(trainer)
    if datamodule is None or datamodule.num_train_phases <= 1:
        return
    every = getattr(trainer, "reload_dataloaders_every_n_epochs", 0)
    if every != 1:
        raise RuntimeError(
            f"{type(datamodule).__name__} serves a new task's training data every "
            f"`epochs_per_task` epochs, but the Trainer was built with "
            f"reload_dataloaders_every_n_epochs={every}, so it would train on task 0 forever. "
            "Fix: pass `Trainer(reload_dataloaders_every_n_epochs=1, ...)` (or set "
            "`trainer.reload_dataloaders_every_n_epochs: 1` in the YAML)."
        )


def _stream_text(datamodule: Any) -> str:
    return (
        f"{type(datamodule).__name__}'s stream is {datamodule.max_epochs} epochs "
        f"({datamodule.num_train_phases} training phases x epochs_per_task={datamodule.epochs_per_task})"
    )


def check_stream_length(trainer: "pl.Trainer") -> None:
    """Warn when the Trainer's ``max_epochs``/``max_steps`` do not cover the continual stream.

    The stream is ``num_tasks × epochs_per_task`` epochs. A shorter run leaves its last task
    unfinished (:class:`ContinualCallback` then ends it at train end); a longer one keeps
    training the last task.
    """
    datamodule = task_schedule(trainer)
    if datamodule is None:
        return
    max_epochs = getattr(trainer, "max_epochs", None)
    max_steps = getattr(trainer, "max_steps", -1)
    fix = f"Fix: pass `Trainer(max_epochs={datamodule.max_epochs})` (the datamodule's `max_epochs`) and no `max_steps`."
    if max_steps is not None and max_steps != -1:
        rank_zero_warn(
            f"The Trainer stops after max_steps={max_steps} steps, but {_stream_text(datamodule)}: a task "
            "boundary falls where the epochs say, so the run may stop in the middle of a task (which is then "
            f"ended at train end) or train the last task for extra steps. {fix}",
            category=UserWarning,
        )
    elif max_epochs not in (None, -1) and int(max_epochs) != int(datamodule.max_epochs):
        effect = (
            "the last tasks are not trained (the unfinished one is ended at train end)"
            if max_epochs < datamodule.max_epochs
            else "the last task is trained for the extra epochs"
        )
        rank_zero_warn(
            f"The Trainer has max_epochs={max_epochs}, but {_stream_text(datamodule)}: {effect}. {fix}",
            category=UserWarning,
        )


def is_last_batch_of_epoch(trainer: "pl.Trainer", batch_idx: int) -> bool:
    """Whether ``batch_idx`` (in ``on_train_batch_end``) is the epoch's last training batch.

    Counts ``limit_train_batches``; for a loader without a length it asks the fit loop whether
    the data fetcher is exhausted.
    """
    total = trainer.num_training_batches
    if isinstance(total, int) or (isinstance(total, float) and math.isfinite(total)):
        return batch_idx + 1 >= int(total)
    return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


def fit_ends_after_batch(trainer: "pl.Trainer", batch_idx: int) -> bool:
    """Whether the fit stops after this training batch (``max_steps`` reached, or the last batch
    of the last epoch by ``max_epochs``). A stop requested by a callback (early stopping) is not
    foreseen: :class:`ContinualCallback` handles it at train end."""
    max_steps = trainer.max_steps
    if max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps:
        return True
    max_epochs = trainer.max_epochs
    if max_epochs is None or max_epochs < 0:
        return False
    return trainer.current_epoch + 1 >= max_epochs and is_last_batch_of_epoch(trainer, batch_idx)


def _named_tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    yield from (("buffer:" + name, value) for name, value in module.named_buffers())


@contextmanager
def atomic_edit(module: torch.nn.Module) -> Iterator[None]:
    """Run a weight edit so that an exception leaves ``module`` as it was before it.

    Takes a CPU copy of every parameter and buffer, and on an exception copies them back (the
    tensors whose name and shape still exist) before re-raising. :class:`ContinualCallback`
    runs every task end inside it (see ``task_end_edits_weights``); use it for any other edit
    outside the optimizer (a merge at fit end, a scaling).
    """
    saved = {name: tensor.detach().to("cpu", copy=True) for name, tensor in _named_tensors(module)}
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for name, tensor in _named_tensors(module):
                value = saved.get(name)
                if value is not None and value.shape == tensor.shape:
                    tensor.copy_(value.to(tensor.device))
        raise


class ContinualCallback(Callback):
    """Base class for callbacks that act on task boundaries.

    Subclasses override :meth:`on_task_start`, :meth:`on_task_end` and :meth:`on_task_report`
    (and any Lightning hook; call ``super()`` from the hooks this class uses: ``setup``,
    ``on_sanity_check_start``, ``on_train_start``, ``on_train_epoch_start``,
    ``on_train_epoch_end``, ``on_validation_end``, ``on_train_end``, ``on_fit_end``,
    ``on_load_checkpoint``, ``state_dict`` and ``load_state_dict``; ``on_train_batch_end`` is
    wrapped for them).

    **When a task ends.** Each task's start and end fire exactly once, also across a resume: the
    indices of the last started and ended tasks are part of the state. A task ends right after
    its last training batch (the last batch of the task's last epoch; in one-fit-per-task mode
    the last batch of the fit by ``max_epochs``/``max_steps``), in ``on_train_batch_end``, where
    ``self.log`` is allowed. That is before the epoch's validation and before any checkpoint of
    that step or epoch (Lightning runs ``ModelCheckpoint`` after every other callback), so the
    checkpoint a task leaves and the validation that follows see the model after every task-end
    edit. Then :meth:`on_task_report` fires once every callback's task end has run: after that
    validation (``on_validation_end``), or at the epoch's end when no validation follows. A fit
    stopped otherwise (early stopping, a stop requested by a callback) ends its task at train
    end, and a resumed fit that has nothing left to train ends a task left pending by its
    checkpoint at fit end; there ``self.log`` is refused (:meth:`log_task_metrics` knows).

    **Atomic task ends.** With :attr:`task_end_edits_weights` (the default), ``on_task_end`` runs
    inside :func:`atomic_edit`: an exception restores every parameter and buffer of the module
    and leaves the task not ended.

    **Resume with changed arguments.** The arguments a callback was built with are recorded by
    the constructor and saved in its state. On resume its state is found by class whatever
    arguments changed (:meth:`on_load_checkpoint` moves the state of the one instance of the class
    in the checkpoint under this callback's ``state_key``); an argument listed in
    :attr:`state_arguments` that changed is refused (``RuntimeError`` naming it with both
    values), any other change goes on with a warning naming it. Only ``fit`` resumes training:
    ``validate``/``test``/``predict`` with ``ckpt_path`` never refuse (an incompatible state is
    then not loaded, with a warning).

    ``setup`` gives the callback private copies of tensors that arrived in shared memory
    (``strategy="ddp_spawn"`` pickles callbacks into the workers, and ``torch.multiprocessing``
    shares every pickled CPU tensor; see :func:`lightning_forget.distributed.unshare_memory`).

    Checkpointed state has one layout for every subclass: ``{"version": STATE_VERSION,
    "protocol": {...}, "arguments": {...}, "method": method_state()}``. Subclasses override
    :meth:`method_state` and :meth:`load_method_state` (never ``state_dict`` itself), read keys
    strictly, and bump :attr:`STATE_VERSION` with a :meth:`migrate_state` branch when their
    layout changes.

    ``setup`` refuses a strategy not listed in :attr:`supported_strategies` (sharded strategies
    such as FSDP and DeepSpeed are not supported by any method yet) with a ``RuntimeError`` that
    names the alternative, ``strategy="ddp"``.

    Note:
        Saved state: ``protocol`` = ``task`` (the task counter used in one-fit-per-task mode),
        ``started``, ``ended`` and ``reported`` (last task whose start/end/report fired);
        ``arguments`` = the constructor arguments as plain values; ``method`` = the subclass's
        state; ``version``.
    """

    #: Version of the subclass's checkpointed state layout (see :meth:`migrate_state`).
    STATE_VERSION: int = 1

    #: Strategies (by :func:`strategy_name`) the method supports; ``setup`` refuses any other
    #: with a ``RuntimeError``. Each method declares its own.
    supported_strategies: tuple[str, ...] = DDP_STRATEGIES

    #: Constructor arguments whose change invalidates the saved state (a buffer size, a LoRA
    #: rank, the number of tasks): a resume with another value is refused naming the argument.
    #: A change of any other argument goes on with a warning. Each method declares its own.
    state_arguments: tuple[str, ...] = ()

    #: Whether ``on_task_end`` may edit the module's weights: it then runs inside
    #: :func:`atomic_edit` (a CPU copy of the weights per task end). Methods whose task end only
    #: updates their own state declare ``False``.
    task_end_edits_weights: bool = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = record_init_arguments(cls.__dict__["__init__"])  # type: ignore[method-assign]
        hook = cls.__dict__.get("on_train_batch_end")
        if hook is not None and not getattr(hook, "_ends_tasks", False):
            cls.on_train_batch_end = _ending_tasks_after(hook)  # type: ignore[method-assign]

    def __init__(self) -> None:
        super().__init__()
        self.task: int = 0
        self._started: int = -1
        self._ended: int = -1
        self._reported_task: int = -1
        #: True while a task end or report runs where Lightning refuses `self.log` (train end,
        #: fit end, validation end); :meth:`log_task_metrics` then writes to the loggers directly.
        self._stopped_inside_task = False
        #: The stage (a ``TrainerFn``) the checkpoint being restored is loaded for.
        self._restoring_for: Optional[str] = None

    # ------------------------------------------------------------------ task events
    def on_task_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        """Called once when training on ``task`` begins (before its first batch)."""

    def on_task_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        """Called once when training on ``task`` is over: after its last training batch, before
        the validation and the checkpoint that follow it. Edit weights and state here."""

    def on_task_report(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        """Called once per task after every callback's :meth:`on_task_end` and the validation that
        follows it (when one runs). Measure and report here."""

    def current_task(self, trainer: "pl.Trainer") -> int:
        """The task being trained (see :func:`current_task`)."""
        datamodule = task_schedule(trainer)
        if datamodule is not None:
            return int(datamodule.task_of_epoch(trainer.current_epoch))
        return self.task

    @property
    def arguments(self) -> dict[str, Any]:
        """The constructor arguments this callback was built with (as given)."""
        return dict(self.__dict__.get(ARGUMENTS_ATTR, {}))

    def log_task_metrics(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", values: Mapping[str, float], **log_kwargs: Any
    ) -> None:
        """Log ``values`` from a task end or report: through ``self.log`` where Lightning allows it,
        else straight to ``trainer.callback_metrics`` and the loggers (rank 0). The values must be
        equal on every rank."""
        values = {name: float(value) for name, value in values.items()}
        if not values:
            return
        if not self._stopped_inside_task:
            options = {"on_step": False, "on_epoch": True, "sync_dist": True, **log_kwargs}
            for name, value in values.items():
                pl_module.log(name, value, **options)
            return
        for name, value in values.items():
            trainer.callback_metrics[name] = torch.tensor(value)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=trainer.global_step)

    # ------------------------------------------------------------------ dispatch
    def _fire_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        if task > self._started + 1 and self._started == self._ended == self._reported_task:
            # Tasks the stream skips (a joint run trains every task at once as the last one; a
            # fixed `task=k` trains only task k) are never trained: no start, end or report.
            self._started = self._ended = self._reported_task = task - 1
        if task > self._started:
            self._started = task
            self.on_task_start(trainer, pl_module, task)

    def _fire_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int, *, can_log: bool = True
    ) -> None:
        if task <= self._ended:
            return
        previous = self._ended
        self._ended = task
        refused = self._stopped_inside_task
        self._stopped_inside_task = refused or not can_log
        try:
            if self.task_end_edits_weights:
                with atomic_edit(pl_module):
                    self.on_task_end(trainer, pl_module, task)
            else:
                self.on_task_end(trainer, pl_module, task)
        except BaseException:
            self._ended = previous  # not ended: the model is as before the edit
            raise
        finally:
            self._stopped_inside_task = refused

    def _fire_reports(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", *, can_log: bool) -> None:
        refused = self._stopped_inside_task
        self._stopped_inside_task = refused or not can_log
        try:
            while self._reported_task < self._ended:
                self._reported_task += 1
                self.on_task_report(trainer, pl_module, self._reported_task)
        finally:
            self._stopped_inside_task = refused

    def _end_unfinished_task(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", *, can_log: bool) -> None:
        """End the task that started and has not ended (the run stopped inside it)."""
        if self._started <= self._ended:
            return
        if task_schedule(trainer) is not None:
            rank_zero_warn(
                f"Training stopped in the middle of task {self._started} (epoch {trainer.current_epoch}, "
                f"step {trainer.global_step}); ending that task now. If the run stopped by `max_steps` or "
                "`max_epochs`, make them match the stream (see the datamodule's `max_epochs`).",
                category=UserWarning,
            )
        self._fire_end(trainer, pl_module, self._started, can_log=can_log)

    def _end_task_after_batch(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch_idx: int) -> None:
        if trainer.sanity_checking:
            return
        datamodule = task_schedule(trainer)
        if datamodule is None:
            if fit_ends_after_batch(trainer, batch_idx):
                self._fire_end(trainer, pl_module, self.task)
            return
        # A stream's task ends at its last batch. A fit stopped inside a task (max_epochs or
        # max_steps shorter than the stream) ends it only at train end, in memory: its checkpoint
        # keeps the task open, so a resume trains the rest of the task and ends it where it ends.
        epoch = trainer.current_epoch
        if is_last_batch_of_epoch(trainer, batch_idx) and datamodule.is_last_epoch_of_task(epoch):
            self._fire_end(trainer, pl_module, int(datamodule.task_of_epoch(epoch)))

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        # Under ddp_spawn this object was pickled into the worker with its tensors in shared
        # memory, one storage for all ranks: take private copies before any rank writes.
        unshare_memory(self)
        check_strategy(self, trainer)
        if stage == "fit":
            check_dataloader_reloading(trainer)
            check_stream_length(trainer)
            in_workers = isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher)
            if in_workers and task_schedule(trainer) is None:
                rank_zero_warn(
                    f"{type(self).__name__}: with `strategy=\"ddp_spawn\"`/`\"ddp_fork\"` the fit runs in worker "
                    "processes, and what this callback learns there (task counter, buffers, snapshots) "
                    "is not returned when `fit` ends. If this is one of several fits, one per task, "
                    "the next fit would start again from task 0 with empty state. Fix: use "
                    "`strategy=\"ddp\"` (its processes keep the callbacks between fits) or one fit "
                    "over a ContinualDataModule.",
                    category=UserWarning,
                )

    def _advance_to_next_fit(self) -> None:
        # One fit per task: a fit that starts after the previous task ended is the next task.
        if self._ended >= self.task:
            self.task = self._ended + 1

    @override
    def on_sanity_check_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # The sanity check runs before `on_train_start`: advance the counter first, so that what
        # it evaluates is filed under the task about to be trained, not the one that has ended.
        if task_schedule(trainer) is None:
            self._advance_to_next_fit()

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if task_schedule(trainer) is None:
            self._advance_to_next_fit()
            self._fire_start(trainer, pl_module, self.task)

    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        datamodule = task_schedule(trainer)
        if datamodule is not None:
            task = int(datamodule.task_of_epoch(trainer.current_epoch))
            # A checkpoint written before the previous task's end fired (by an older release, or
            # a loader whose last batch could not be told) resumes at the next task's first
            # epoch: end the previous task first.
            if task > 0 and self._started == task - 1:
                self._fire_end(trainer, pl_module, task - 1)
                self._fire_reports(trainer, pl_module, can_log=True)
            self.task = task
            self._fire_start(trainer, pl_module, task)
            if trainer.current_epoch == datamodule.max_epochs:
                rank_zero_warn(
                    f"Epoch {trainer.current_epoch} is past the end of the stream ({_stream_text(datamodule)}); "
                    f"the extra epochs train task {task} again. Fix: pass "
                    f"`Trainer(max_epochs={datamodule.max_epochs})` and no `max_steps`.",
                    category=UserWarning,
                )

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._end_task_after_batch(trainer, pl_module, batch_idx)

    on_train_batch_end._ends_tasks = True  # type: ignore[attr-defined]

    @override
    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._fire_reports(trainer, pl_module, can_log=False)

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        datamodule = task_schedule(trainer)
        if datamodule is not None and datamodule.is_last_epoch_of_task(trainer.current_epoch):
            # Normally ended after the epoch's last batch already; a loader whose end could not
            # be told ends here.
            self._fire_end(trainer, pl_module, int(datamodule.task_of_epoch(trainer.current_epoch)))
        self._fire_reports(trainer, pl_module, can_log=True)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # The fit stopped before the end the batch hooks foresee (early stopping, a stop requested
        # by a callback, a loader whose end could not be told): end the task now, so that its
        # end-of-task work is not lost. Lightning refuses `self.log` here.
        self._end_unfinished_task(trainer, pl_module, can_log=False)
        self._fire_reports(trainer, pl_module, can_log=False)

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # A resume from a checkpoint whose task had not ended, with nothing left to train (the
        # loop skips `on_train_start`/`on_train_end`): run the pending end once now.
        if self._started > self._ended:
            rank_zero_info(
                f"{type(self).__name__}: task {self._started} had not ended in the restored checkpoint and "
                "the fit had nothing left to train; ending it now."
            )
        self._end_unfinished_task(trainer, pl_module, can_log=False)
        self._fire_reports(trainer, pl_module, can_log=False)

    # ------------------------------------------------------------------ state
    # One rule for every subclass:
    #   {"version": <the subclass's STATE_VERSION>,
    #    "protocol": {"task", "started", "ended", "reported"},   <- this class's own, namespaced
    #    "arguments": {<constructor argument>: <plain value>},
    #    "method": <what method_state() returns>}
    # Subclasses implement `method_state` / `load_method_state` (plain key access: a renamed key
    # must fail, not silently reset) and, when they change their layout, bump STATE_VERSION and
    # implement `migrate_state` for the older versions they can read.

    def method_state(self) -> dict[str, Any]:
        """The subclass's checkpointed state: plain values and CPU tensors (override)."""
        return {}

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`method_state` returned; read keys with ``state[key]`` (override)."""
        if state:
            raise RuntimeError(
                f"{type(self).__name__} keeps no method state, but the checkpoint has {sorted(state)}: "
                "it was written by another callback class or an incompatible version."
            )

    def migrate_state(self, state: dict[str, Any], version: int) -> dict[str, Any]:
        """Turn method state written at an older ``version`` into the current layout (override).

        The default knows no older layout and raises.
        """
        raise RuntimeError(
            f"{type(self).__name__} cannot read checkpoint state of version {version} (this library "
            f"writes version {self.STATE_VERSION}); resume with the lightning_forget release that wrote it."
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": int(self.STATE_VERSION),
            "protocol": {"task": self.task, "started": self._started, "ended": self._ended, "reported": self._reported_task},
            "arguments": plain_value(self.arguments),
            "method": self.method_state(),
        }

    @override
    def on_load_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]) -> None:
        # Lightning calls this for every callback before any `load_state_dict`. Find this
        # callback's state by class: the key also holds constructor arguments (so that two
        # instances can coexist), and a resume with one of them changed must not lose the state.
        self._restoring_for = trainer.state.fn
        states = checkpoint.get("callbacks")
        if not states or self.state_key in states:
            return
        claimed = {callback.state_key for callback in trainer.callbacks}
        candidates = [key for key in states if key not in claimed and _key_of_class(key, type(self))]
        if not candidates:
            return  # this class was not in the run: it starts fresh
        if len(candidates) > 1:
            candidates = [key for key in candidates if self._keeps_state_of(states[key])] or candidates
        if len(candidates) > 1:
            raise RuntimeError(
                f"{type(self).__name__}: the checkpoint holds the states of {len(candidates)} {type(self).__name__} "
                f"callbacks ({candidates}) and none has this callback's key {self.state_key!r}, so it cannot tell "
                "which one is this callback's. Fix: build the callbacks with the arguments the checkpoint was "
                "written with (their keys above), or start a new run without `ckpt_path`."
            )
        states[self.state_key] = states.pop(candidates[0])

    def _keeps_state_of(self, state: Any) -> bool:
        """Whether a saved state agrees with this callback on every argument in ``state_arguments``."""
        saved = state.get("arguments") if isinstance(state, Mapping) else None
        if saved is None:
            return False
        changes = compare_arguments(saved, self.arguments)
        return not any(name in self.state_arguments for name in changes)

    def _check_arguments(self, saved: Mapping[str, Any]) -> bool:
        """Refuse or warn about constructor arguments that differ from the checkpoint's.

        Returns whether the state may be loaded (``False`` only outside ``fit``, for a state the
        changed arguments invalidate).
        """
        changes = compare_arguments(saved, self.arguments)
        if not changes:
            return True
        name = type(self).__name__
        invalidating = {key: value for key, value in changes.items() if key in self.state_arguments}
        others = {key: value for key, value in changes.items() if key not in self.state_arguments}
        fitting = self._restoring_for in (None, TrainerFn.FITTING)
        if invalidating and fitting:
            raise RuntimeError(
                f"{name}: cannot resume with changed {', '.join(f'`{key}`' for key in invalidating)} "
                f"({describe_change(invalidating)}): the saved state depends on it. Fix: build {name} with "
                + ", ".join(f"{key}={saved_value!r}" for key, (saved_value, _) in invalidating.items())
                + " to resume, or start a new run without `ckpt_path`."
            )
        if others:
            rank_zero_warn(
                f"{name}: resuming with changed {', '.join(f'`{key}`' for key in others)} ({describe_change(others)}); "
                "the saved state is kept and the new value applies from now on.",
                category=UserWarning,
            )
        if invalidating:
            rank_zero_warn(
                f"{name}: the checkpoint's state was written with other {', '.join(f'`{key}`' for key in invalidating)} "
                f"({describe_change(invalidating)}); it is not loaded for {self._restoring_for}, which does not "
                "train (resuming `fit` would refuse).",
                category=UserWarning,
            )
            return False
        return True

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        if "protocol" not in state:
            # Checkpoints written by lightning_forget 0.1.0 kept every key at the top level, with
            # the protocol's counters beside the method's keys; read them as version 1.
            protocol = {key: state.pop(key) for key in ("task", "started", "ended")}
            for legacy in ("version", "base_version", "lines_version"):
                state.pop(legacy, None)
            state = {"version": 1, "protocol": protocol, "method": state}
        # Checkpoints written before the arguments were saved (their key held some of them) have
        # none to compare.
        if "arguments" in state and not self._check_arguments(state["arguments"]):
            return
        version = int(state["version"])
        if version > self.STATE_VERSION:
            raise RuntimeError(
                f"{type(self).__name__}: the checkpoint's state has version {version}, newer than this "
                f"library's {self.STATE_VERSION}. Fix: upgrade lightning_forget to resume it."
            )
        method = dict(state["method"])
        if version < self.STATE_VERSION:
            method = self.migrate_state(method, version)
        protocol = state["protocol"]
        self.task = int(protocol["task"])
        self._started = int(protocol["started"])
        self._ended = int(protocol["ended"])
        # Protocols written before the report phase existed reported each task at its end.
        self._reported_task = int(protocol["reported"]) if "reported" in protocol else self._ended
        try:
            self.load_method_state(method)
        except KeyError as error:
            raise RuntimeError(
                f"{type(self).__name__}: the checkpoint's state lacks the key {error.args[0]!r} (it has "
                f"{sorted(method)}); it was written by an incompatible version of this callback."
            ) from error


def _key_of_class(key: Any, cls: type) -> bool:
    """Whether a checkpoint's callback-state key belongs to ``cls`` (its qualname, alone or followed
    by the ``{...}`` of ``Callback._generate_state_key``)."""
    if not isinstance(key, str):
        return False
    name = cls.__qualname__
    return key == name or key.startswith(name + "{")


def _ending_tasks_after(hook: Any) -> Any:
    """Wrap a subclass's ``on_train_batch_end`` so that the task end still fires after it (whether
    or not it calls ``super()``; firing twice is a no-op)."""
    import functools

    @functools.wraps(hook)
    def on_train_batch_end(self: ContinualCallback, trainer: "pl.Trainer", pl_module: "pl.LightningModule",
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        hook(self, trainer, pl_module, outputs, batch, batch_idx)
        self._end_task_after_batch(trainer, pl_module, batch_idx)

    on_train_batch_end._ends_tasks = True  # type: ignore[attr-defined]
    return on_train_batch_end
