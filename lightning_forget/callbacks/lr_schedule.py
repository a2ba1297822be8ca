"""What :class:`LRRewarming` and :class:`InfiniteLRSchedule` share: the step clock, the scheduler
they install, task lengths and the optimizer state at task switches.

The schedules' maths lives in :mod:`lightning_forget.schedules`; a subclass only says which LR a
step gets (:meth:`BaseLRSchedule.lr_at`) and what a task start records.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lightning_forget.schedules import DECAYS, Decay, TaskSegment, resolve_warmup
from lightning_forget.tasks import ContinualCallback, task_schedule
from lightning_forget.validation import check_bool, check_choice, check_float, check_int, message

try:  # Python 3.12+
    from typing import override
except ImportError:  # pragma: no cover
    from typing_extensions import override

__all__ = ["BaseLRSchedule"]


class _CallbackLR(LRScheduler):
    """A step-interval scheduler whose LR comes from the callback's clock.

    Lightning steps it after every optimizer step, and ``LearningRateMonitor`` finds it in
    ``trainer.lr_scheduler_configs``. It keeps no state of its own: the callback's
    ``state_dict`` holds the clock, so ``load_state_dict`` ignores whatever Lightning restores.
    """

    def __init__(self, optimizer: Optimizer, lr_fn: Callable[[], Optional[float]], ratios: list[float]) -> None:
        self._lr_fn = lr_fn
        self._ratios = list(ratios)
        super().__init__(optimizer)

    @override
    def get_lr(self) -> list[float]:  # type: ignore[override]
        lr = self._lr_fn()
        if lr is None:  # the clock has not started yet: leave the optimizer as it is
            return [float(group["lr"]) for group in self.optimizer.param_groups]
        return [lr * ratio for ratio in self._ratios]

    @override
    def step(self, epoch: Optional[int] = None) -> None:  # noqa: ARG002 - torch's signature
        self._step_count = getattr(self, "_step_count", 0) + 1
        self.last_epoch += 1
        self.apply()

    def apply(self) -> None:
        """Write the callback's current LR into the optimizer's param groups."""
        values = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, values):
            group["lr"] = lr
        self._last_lr = list(values)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Ignored: the schedule's state is restored from the callback's own state."""


def _check_warmup(warmup: Any) -> Union[int, float]:
    if isinstance(warmup, bool) or not isinstance(warmup, (int, float)):
        raise TypeError(
            message("warmup", "an int (steps) or a float (fraction of the task's steps)", warmup, "e.g. warmup=100 or warmup=0.01")
        )
    if isinstance(warmup, int):
        if warmup < 0:
            raise ValueError(message("warmup", "an int >= 0 when it is a number of steps", warmup))
        return warmup
    if not (0.0 <= warmup < 1.0):
        raise ValueError(
            message("warmup", "a float in [0, 1) when it is a fraction of the task's steps", warmup,
                    "for a number of steps pass an int (e.g. warmup=100)")
        )
    return float(warmup)


class BaseLRSchedule(ContinualCallback):
    """Base of the LR-schedule callbacks: a clock of optimizer steps and the scheduler it drives.

    The callback replaces whatever scheduler the module's ``configure_optimizers`` returned (with
    a warning) by a step-interval scheduler named :attr:`SCHEDULER_NAME` in
    ``trainer.lr_scheduler_configs``, installed in ``on_fit_start``, so Lightning steps it and
    ``LearningRateMonitor`` logs it. The LR is a pure function (:meth:`lr_at`) of the run's
    optimizer-step count (``trainer.global_step`` plus the steps of earlier fits) and of what the
    callback recorded at task starts, all in its state: a run resumed mid-task gets the same LR
    at every step as an uninterrupted one, whatever Lightning restores into schedulers.

    Param groups: every group keeps its ratio to the first group's initial LR (its
    ``initial_lr`` or ``lr`` when the fit's optimizer was built): group ``g`` gets
    ``lr_at(step) * lr_g / lr_0``. Exactly one optimizer is supported.

    Subclasses implement :meth:`lr_at`, :meth:`_clock_ready` and :meth:`_start_segment`.

    Args:
        max_lr: peak learning rate ``eta_max`` (first param group).
        min_lr: final learning rate ``eta_min``; default ``0.1 * max_lr``.
        warmup: an ``int >= 0`` is a number of steps, a ``float`` in ``[0, 1)`` a fraction of
            the task's steps.
        decay: ``"cosine"`` or ``"linear"``.
        steps_per_task: the task length ``T`` in optimizer steps (default: computed when the
            task starts; see :meth:`_task_length`).
        reset_optimizer_state: clear the optimizer's per-parameter state at every task switch.
    """

    #: ``name`` of the scheduler in ``trainer.lr_scheduler_configs`` (the LearningRateMonitor key).
    SCHEDULER_NAME = "lr_schedule/lr"

    def __init__(
        self,
        max_lr: float,
        min_lr: Optional[float] = None,
        warmup: Union[int, float] = 0.01,
        decay: Decay = "cosine",
        steps_per_task: Optional[int] = None,
        reset_optimizer_state: bool = False,
    ) -> None:
        super().__init__()
        self.max_lr = check_float("max_lr", max_lr, min=0, min_inclusive=False, fix="pass the peak learning rate, e.g. max_lr=3e-4")
        check_float("min_lr", min_lr, min=0, allow_none=True, fix="pass a final LR >= 0, or None for 0.1 * max_lr")
        self.min_lr = 0.1 * self.max_lr if min_lr is None else float(min_lr)
        self.warmup = _check_warmup(warmup)
        self.decay = check_choice("decay", decay, DECAYS)
        self.steps_per_task = check_int(
            "steps_per_task", steps_per_task, min=1, allow_none=True, fix="pass the task's optimizer steps, or None to compute it"
        )
        self.reset_optimizer_state = check_bool("reset_optimizer_state", reset_optimizer_state)
        if self.min_lr > self.max_lr:
            raise ValueError(f"`min_lr` ({self.min_lr!r}) must not exceed `max_lr` ({self.max_lr!r}).")

        # the clock (saved)
        self._steps_before_fit: int = 0
        self._segments: list[TaskSegment] = []
        # runtime only (never saved, never pickled)
        self._trainer: Optional["pl.Trainer"] = None
        self._global_step_at_start: Optional[int] = None
        self._scheduler: Optional[_CallbackLR] = None
        self._carried_state: Optional[dict[Any, Any]] = None

    # ------------------------------------------------------------------ for subclasses
    def lr_at(self, step: int) -> float:
        """The LR (first param group) of the run's optimizer step ``step`` (0-based, across fits)."""
        raise NotImplementedError

    def _clock_ready(self) -> bool:
        """Whether enough is recorded to know the LR of the next step."""
        raise NotImplementedError

    def _start_segment(self, trainer: "pl.Trainer", task: int) -> TaskSegment:
        """What a task start records (called once per task, at :attr:`steps`)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the clock
    @property
    def steps(self) -> int:
        """Optimizer steps taken so far in the run (across tasks and fits)."""
        if self._trainer is not None and self._global_step_at_start is not None:
            return self._steps_before_fit + int(self._trainer.global_step) - self._global_step_at_start
        return self._steps_before_fit

    @property
    def segments(self) -> tuple[TaskSegment, ...]:
        """One :class:`~lightning_forget.schedules.TaskSegment` per task started, in order."""
        return tuple(self._segments)

    def _current_lr(self) -> Optional[float]:
        """The LR of the next optimizer step, or ``None`` before the clock is running."""
        if self._trainer is None or self._global_step_at_start is None or not self._clock_ready():
            return None
        return self.lr_at(self.steps)

    def _apply_lr(self) -> None:
        if self._scheduler is not None:
            self._scheduler.apply()

    # ------------------------------------------------------------------ task length and optimizer
    def _task_length(self, trainer: "pl.Trainer") -> int:
        """``T``: ``steps_per_task`` if given; with a continual datamodule (one fit over all
        tasks) ``ceil(len(train loader) / accumulate_grad_batches) * epochs_per_task``, read when
        the task starts (``max_steps`` is not taken into account, so stopping and resuming does
        not change ``T``); with one fit per task ``estimated_stepping_batches - global_step``
        (this honours ``max_steps``). Rank 0's value is broadcast to all ranks."""
        if self.steps_per_task is not None:
            return self.steps_per_task
        datamodule = task_schedule(trainer)
        if datamodule is not None:
            batches = trainer.num_training_batches
            if not math.isfinite(batches):
                length: float = math.inf
            else:
                length = math.ceil(batches / trainer.accumulate_grad_batches) * datamodule.epochs_per_task
        else:
            length = trainer.estimated_stepping_batches - trainer.global_step
        if not math.isfinite(length) or length < 1:
            raise RuntimeError(
                f"{type(self).__name__} cannot tell how many optimizer steps this task has (got {length!r}: the "
                "training loader has no length, or the Trainer has neither max_epochs nor max_steps). "
                f"Fix: pass `{type(self).__name__}(steps_per_task=...)`."
            )
        return int(trainer.strategy.broadcast(int(length), src=0))

    def _task_segment(self, trainer: "pl.Trainer", task: int) -> TaskSegment:
        """The task's ``(start, T, W)``, with ``W`` clamped to ``T`` (and a warning)."""
        length = self._task_length(trainer)
        warmup = resolve_warmup(self.warmup, length)
        if warmup > length:
            rank_zero_warn(
                f"{type(self).__name__}: warm-up of {warmup} steps is longer than task {task} ({length} steps); "
                "the task ends at the top of the warm-up. Pass a smaller `warmup`."
            )
            warmup = length
        return TaskSegment(self.steps, int(length), int(warmup))

    def _reset_optimizer(self, trainer: "pl.Trainer") -> None:
        for optimizer in trainer.optimizers:
            optimizer.state.clear()
        rank_zero_info(f"{type(self).__name__}: cleared the optimizer state at the task switch.")

    def _carry_optimizer_state(self, trainer: "pl.Trainer") -> None:
        carried, self._carried_state = self._carried_state, None
        if carried is None:
            return
        optimizer = trainer.optimizers[0]
        current = optimizer.state_dict()
        n_now = sum(len(group["params"]) for group in current["param_groups"])
        n_then = carried["n_params"]
        if n_now != n_then:
            rank_zero_warn(
                f"{type(self).__name__}: the previous task's optimizer had {n_then} parameters and this one has "
                f"{n_now}; its state (e.g. Adam moments) is not carried over. Pass `reset_optimizer_state=True` "
                "to silence this."
            )
            return
        current["state"] = carried["state"]
        optimizer.load_state_dict(current)

    # ------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_fit_start(trainer, pl_module)
        name = type(self).__name__
        if len(trainer.optimizers) != 1:
            raise RuntimeError(
                f"{name} drives exactly one optimizer; `configure_optimizers` returned {len(trainer.optimizers)}. "
                "Return a single optimizer (use param groups for different learning rates)."
            )
        optimizer = trainer.optimizers[0]
        base = [float(group.get("initial_lr", group["lr"])) for group in optimizer.param_groups]
        if base[0] > 0:
            ratios = [lr / base[0] for lr in base]
        else:
            ratios = [1.0] * len(base)
            if len(base) > 1:
                rank_zero_warn(
                    f"{name}: the first param group's LR is 0, so group ratios are undefined; every group "
                    "gets the same LR."
                )
        if trainer.lr_scheduler_configs:
            names = ", ".join(type(cfg.scheduler).__name__ for cfg in trainer.lr_scheduler_configs)
            rank_zero_warn(
                f"{name} replaced the scheduler(s) returned by `configure_optimizers` ({names}) with its own "
                "schedule. Remove them from `configure_optimizers` to silence this warning."
            )
        self._scheduler = _CallbackLR(optimizer, self._current_lr, ratios)
        trainer.strategy.lr_scheduler_configs = [
            LRSchedulerConfig(self._scheduler, name=self.SCHEDULER_NAME, interval="step", frequency=1)
        ]

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Loops (global_step) and the callback state are restored by now; start the clock.
        self._trainer = trainer
        self._global_step_at_start = int(trainer.global_step)
        super().on_train_start(trainer, pl_module)
        self._apply_lr()

    @override
    def on_task_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        super().on_task_start(trainer, pl_module, task)
        first = not self._segments
        self._segments.append(self._start_segment(trainer, task))
        if not first:
            if self.reset_optimizer_state:
                self._reset_optimizer(trainer)
            elif task_schedule(trainer) is None:
                self._carry_optimizer_state(trainer)
        self._apply_lr()

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        # Idempotent: also covers manual optimization, where Lightning does not step schedulers.
        self._apply_lr()

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_train_end(trainer, pl_module)
        self._steps_before_fit = self.steps
        self._global_step_at_start = None
        self._trainer = None
        if task_schedule(trainer) is None and not self.reset_optimizer_state and trainer.optimizers:
            state = trainer.optimizers[0].state_dict()
            n_params = sum(len(group["params"]) for group in state["param_groups"])
            self._carried_state = {"state": state["state"], "n_params": n_params}

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":
            if self._trainer is not None:  # the fit stopped with an exception: keep the clock consistent
                self._steps_before_fit = self.steps
            self._trainer = None
            self._global_step_at_start = None
            self._scheduler = None

    # ------------------------------------------------------------------ state
    # Layout (version 1, shared by both subclasses, as written by the single-class LRRewarming of
    # lightning_forget 0.1): {"steps", "segments": [[start, T, W], ...], "warmup_steps",
    # "anneal_start", "anneal_steps"}; the last three are the infinite schedule's (None otherwise).
    def _schedule_state(self) -> dict[str, Any]:
        """The infinite schedule's three entries of the state (``None`` for re-warming)."""
        return {"warmup_steps": None, "anneal_start": None, "anneal_steps": None}

    def _load_schedule_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`_schedule_state` wrote."""

    @override
    def method_state(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "segments": [list(segment) for segment in self._segments],
            **self._schedule_state(),
        }

    @override
    def load_method_state(self, state: dict[str, Any]) -> None:
        self._steps_before_fit = int(state["steps"])
        self._segments = [TaskSegment(*(int(v) for v in segment)) for segment in state["segments"]]
        self._load_schedule_state(state)
        self._global_step_at_start = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_trainer", "_scheduler", "_carried_state"):
            state[key] = None
        return state
