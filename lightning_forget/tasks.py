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

from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_warn

from lightning_forget.distributed import unshare_memory

try:  # Python 3.12+
    from typing import override
except ImportError:  # pragma: no cover
    from typing_extensions import override

__all__ = ["ContinualCallback", "current_task", "is_continual_datamodule", "strategy_name", "task_schedule"]

#: The strategies every method is tested under (one process; DDP with each start method).
DDP_STRATEGIES: tuple[str, ...] = ("single_device", "ddp", "ddp_spawn", "ddp_fork")

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
    """
    datamodule = task_schedule(trainer)
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


class ContinualCallback(Callback):
    """Base class for callbacks that act on task boundaries.

    Subclasses override :meth:`on_task_start` and :meth:`on_task_end` (and any Lightning hook;
    call ``super()`` from the hooks this class uses: ``setup``, ``on_sanity_check_start``,
    ``on_train_start``,
    ``on_train_epoch_start``, ``on_train_epoch_end``, ``on_train_end``, ``state_dict`` and
    ``load_state_dict``).

    Each task's start and end fire exactly once, also across a resume: the indices of the last
    started and ended tasks are part of the state, so a run resumed in the middle of a task does
    not start it again.

    ``setup`` gives the callback private copies of tensors that arrived in shared memory
    (``strategy="ddp_spawn"`` pickles callbacks into the workers, and ``torch.multiprocessing``
    shares every pickled CPU tensor; see :func:`lightning_forget.distributed.unshare_memory`).

    Checkpointed state has one layout for every subclass: ``{"version": STATE_VERSION,
    "protocol": {...}, "method": method_state()}``. Subclasses override :meth:`method_state` and
    :meth:`load_method_state` (never ``state_dict`` itself), read keys strictly, and bump
    :attr:`STATE_VERSION` with a :meth:`migrate_state` branch when their layout changes.

    ``setup`` refuses a strategy not listed in :attr:`supported_strategies` (sharded strategies
    such as FSDP and DeepSpeed are not supported by any method yet) with a ``RuntimeError`` that
    names the alternative, ``strategy="ddp"``.

    Note:
        Saved state: ``protocol`` = ``task`` (the task counter used in one-fit-per-task mode),
        ``started`` and ``ended`` (last task whose start/end fired); ``method`` = the subclass's
        state; ``version``.
    """

    #: Version of the subclass's checkpointed state layout (see :meth:`migrate_state`).
    STATE_VERSION: int = 1

    #: Strategies (by :func:`strategy_name`) the method supports; ``setup`` refuses any other
    #: with a ``RuntimeError``. Each method declares its own.
    supported_strategies: tuple[str, ...] = DDP_STRATEGIES

    def __init__(self) -> None:
        super().__init__()
        self.task: int = 0
        self._started: int = -1
        self._ended: int = -1
        #: True while `on_task_end` runs from `on_train_end` (a run stopped inside a task), where
        #: Lightning refuses `self.log`.
        self._stopped_inside_task = False

    # ------------------------------------------------------------------ task events
    def on_task_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        """Called once when training on ``task`` begins (before its first batch)."""

    def on_task_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        """Called once when training on ``task`` is over (after its last validation)."""

    def current_task(self, trainer: "pl.Trainer") -> int:
        """The task being trained (see :func:`current_task`)."""
        datamodule = task_schedule(trainer)
        if datamodule is not None:
            return int(datamodule.task_of_epoch(trainer.current_epoch))
        return self.task

    # ------------------------------------------------------------------ dispatch
    def _fire_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        if task > self._started:
            self._started = task
            self.on_task_start(trainer, pl_module, task)

    def _fire_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        if task > self._ended:
            self._ended = task
            self.on_task_end(trainer, pl_module, task)

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
            # A checkpoint written at the last validation of a task (before `on_train_epoch_end`)
            # resumes at the next task's first epoch: end the previous task first.
            if task > 0 and self._started == task - 1:
                self._fire_end(trainer, pl_module, task - 1)
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
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        datamodule = task_schedule(trainer)
        if datamodule is not None and datamodule.is_last_epoch_of_task(trainer.current_epoch):
            self._fire_end(trainer, pl_module, int(datamodule.task_of_epoch(trainer.current_epoch)))

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if task_schedule(trainer) is None:
            self._fire_end(trainer, pl_module, self.task)
        elif self._started > self._ended:
            # The run stopped inside a task (max_steps, max_epochs, early stopping): end it, so
            # that its end-of-task work (snapshots, reports) is not lost.
            rank_zero_warn(
                f"Training stopped in the middle of task {self._started} (epoch {trainer.current_epoch}, "
                f"step {trainer.global_step}); ending that task now. If the run stopped by `max_steps` or "
                "`max_epochs`, make them match the stream (see the datamodule's `max_epochs`).",
                category=UserWarning,
            )
            self._stopped_inside_task = True
            try:
                self._fire_end(trainer, pl_module, self._started)
            finally:
                self._stopped_inside_task = False

    # ------------------------------------------------------------------ state
    # One rule for every subclass:
    #   {"version": <the subclass's STATE_VERSION>,
    #    "protocol": {"task", "started", "ended"},      <- this class's own, namespaced
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
            "protocol": {"task": self.task, "started": self._started, "ended": self._ended},
            "method": self.method_state(),
        }

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
        try:
            self.load_method_state(method)
        except KeyError as error:
            raise RuntimeError(
                f"{type(self).__name__}: the checkpoint's state lacks the key {error.args[0]!r} (it has "
                f"{sorted(method)}); it was written by an incompatible version of this callback."
            ) from error
