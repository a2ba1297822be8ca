"""``LRRewarming``: re-warm and re-decay the learning rate at every task of a continual pre-training run."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.rank_zero import rank_zero_deprecation

from lightning_forget.tasks import DDP_STRATEGIES, SHARDED_STRATEGIES
from lightning_forget.callbacks.infinite_lr import InfiniteLRSchedule
from lightning_forget.callbacks.lr_schedule import BaseLRSchedule
from lightning_forget.schedules import Anneal, Decay, TaskSegment, resolve_warmup, schedule_lr, segment_lr
from lightning_forget.validation import check_choice

try:  # Python 3.12+
    from typing import override
except ImportError:  # pragma: no cover
    from typing_extensions import override

# `schedule_lr` and `resolve_warmup` are re-exported: they lived here before `schedules.py`.
__all__ = ["LRRewarming", "schedule_lr", "resolve_warmup"]

_MODES = ("rewarm", "infinite")
# Arguments of the infinite schedule that LRRewarming still accepts (with their defaults), so
# that `LRRewarming(mode="infinite", ...)` configs keep working; see `LRRewarming.__new__`.
_INFINITE_ONLY = {
    "cooldown_steps": 0,
    "constant_lr": None,
    "anneal": "exponential",
    "anneal_steps": None,
    "anneal_at_start": False,
    "anneal_after_steps": None,
}


class LRRewarming(BaseLRSchedule):
    """Re-warm and re-decay the learning rate at every task.

    Paper: Ibrahim, Thérien, Gupta, Richter, Anthony, Lesort, Belilovsky, Rish, "Simple and
    Scalable Strategies to Continually Pre-train Large Language Models", TMLR 2024
    (arXiv:2403.08763).

    Mechanism. When an LLM is pre-trained further on a new dataset, re-warming the LR (linear
    warm-up back to ``max_lr``), re-decaying it (cosine down to ``min_lr`` over the new data) and
    replaying a little old data (see :class:`~lightning_forget.callbacks.ExperienceReplay`)
    together match re-training on the union of all data. This callback does the first two: at
    every task start the schedule's clock restarts at 0, with ``W`` warm-up steps and ``T``
    steps in the task (:func:`lightning_forget.schedules.rewarm_lr` has the formula and says
    which step gets which LR). For the paper's alternative without re-warming see
    :class:`~lightning_forget.callbacks.InfiniteLRSchedule`.

    The scheduler it installs, the param-group ratios, the task length ``T`` (``steps_per_task``
    or computed when the task starts) and exact mid-task resume are described in
    :class:`~lightning_forget.callbacks.lr_schedule.BaseLRSchedule`.

    Optimizer state at task switches: with ``reset_optimizer_state=True`` the optimizer's
    per-parameter state (Adam moments, step counts, momentum buffers) is cleared at the start of
    every task after the first; the paper's runs reset it between datasets, so pass ``True`` to
    match them. With ``False`` (the default) it is kept: in one-fit-per-task mode, where each fit
    builds a fresh optimizer, the callback hands the previous fit's per-parameter state to the
    new optimizer when the next task starts (the new optimizer keeps its own hyperparameters; a
    mismatch in parameter count is reported with a warning and the state is not carried).

    Args:
        max_lr: peak learning rate ``eta_max`` (first param group).
        min_lr: final learning rate ``eta_min`` of each decay; default ``0.1 * max_lr`` (the
            paper's runs decay 3e-4 → 3e-5).
        warmup: warm-up length: an ``int >= 0`` is a number of steps, a ``float`` in ``[0, 1)``
            a fraction of the task's steps, ``W = ceil(warmup * T)`` (default 1%; 0-2% behave
            alike in the paper).
        decay: ``"cosine"`` or ``"linear"``: the shape of the re-decay.
        steps_per_task: the task length ``T`` in optimizer steps (default: computed at each
            task start). Needed for iterable datasets without a length.
        reset_optimizer_state: clear the optimizer's per-parameter state at every task switch.
        mode: deprecated. ``"rewarm"`` (the default) is this callback; ``"infinite"`` builds an
            :class:`~lightning_forget.callbacks.InfiniteLRSchedule` from the remaining arguments
            (with a deprecation warning): use that class.
        cooldown_steps: (deprecated, for ``mode="infinite"`` only, like the five below) the
            cooldown length; :class:`~lightning_forget.callbacks.InfiniteLRSchedule` documents
            these six arguments.
        constant_lr: (deprecated) the constant LR.
        anneal: (deprecated) the anneal's shape.
        anneal_steps: (deprecated) the anneal length.
        anneal_at_start: (deprecated) anneal from the first step.
        anneal_after_steps: (deprecated) anneal after this many steps.

    Raises:
        ValueError: on an invalid argument (the message names it and the fix), or an argument of
            the infinite schedule without ``mode="infinite"``.
        TypeError: on an argument of the wrong type.
        RuntimeError: in ``on_fit_start`` when the fit has more than one optimizer; at a task
            start when the task length cannot be known. (Lightning itself refuses two
            ``LRRewarming`` callbacks in one Trainer: they would share a state key.)

    Note:
        Logged keys: none by itself; with a ``LearningRateMonitor`` the LR appears as
        ``lr_rewarming/lr`` (``lr_rewarming/lr/pg{i}`` with several param groups).

        Saved state (``state_dict``, version 1): ``steps`` (optimizer steps taken in the run),
        ``segments`` (``[start_step, T, W]`` of every task started, in order; in memory
        :attr:`segments` holds them as :class:`~lightning_forget.schedules.TaskSegment`), and
        ``warmup_steps``, ``anneal_start``, ``anneal_steps`` (always ``None`` here: the layout is
        shared with :class:`~lightning_forget.callbacks.InfiniteLRSchedule`), plus
        :class:`~lightning_forget.tasks.ContinualCallback`'s protocol counters. Only one
        instance per Trainer is allowed, so the state key is the class name.
    """

    #: Tested single-process and under DDP; sharded strategies are refused in ``setup``.
    supported_strategies: tuple[str, ...] = DDP_STRATEGIES + SHARDED_STRATEGIES
    #: Constructor arguments whose change a resume refuses (see ContinualCallback.state_arguments).
    state_arguments: tuple[str, ...] = ('mode',)
    #: Whether the task end edits weights (then it runs inside tasks.atomic_edit).
    task_end_edits_weights = False

    SCHEDULER_NAME = "lr_rewarming/lr"

    def __new__(
        cls,
        max_lr: float,
        min_lr: Optional[float] = None,
        warmup: Union[int, float] = 0.01,
        decay: Decay = "cosine",
        steps_per_task: Optional[int] = None,
        reset_optimizer_state: bool = False,
        mode: Literal["rewarm", "infinite"] = "rewarm",
        cooldown_steps: int = 0,
        constant_lr: Optional[float] = None,
        anneal: Anneal = "exponential",
        anneal_steps: Optional[int] = None,
        anneal_at_start: bool = False,
        anneal_after_steps: Optional[int] = None,
    ) -> Any:
        # `LRRewarming(mode="infinite", ...)` was the infinite schedule before it had its own class;
        # existing code and YAML configs build it that way: build the new class instead. (The
        # parameters repeat `__init__`'s so that LightningCLI, which reads `__new__` when a class
        # defines one, sees them.)
        if cls is LRRewarming and mode == "infinite":
            rank_zero_deprecation(
                "`LRRewarming(mode='infinite')` is deprecated: use "
                "`lightning_forget.callbacks.InfiniteLRSchedule` with the same arguments (without `mode`)."
            )
            instance = InfiniteLRSchedule(
                max_lr, min_lr, warmup, decay, steps_per_task, reset_optimizer_state, cooldown_steps, constant_lr,
                anneal, anneal_steps, anneal_at_start, anneal_after_steps,
            )
            instance.SCHEDULER_NAME = cls.SCHEDULER_NAME  # keep the logged LR key of existing runs
            return instance
        return super().__new__(cls)

    def __getnewargs__(self) -> tuple[Any, ...]:
        # pickle and deepcopy call `__new__(cls, *these)` before restoring `__dict__`
        return (self.max_lr,)

    def __init__(
        self,
        max_lr: float,
        min_lr: Optional[float] = None,
        warmup: Union[int, float] = 0.01,
        decay: Decay = "cosine",
        steps_per_task: Optional[int] = None,
        reset_optimizer_state: bool = False,
        mode: Literal["rewarm", "infinite"] = "rewarm",
        cooldown_steps: int = 0,
        constant_lr: Optional[float] = None,
        anneal: Anneal = "exponential",
        anneal_steps: Optional[int] = None,
        anneal_at_start: bool = False,
        anneal_after_steps: Optional[int] = None,
    ) -> None:
        super().__init__(max_lr, min_lr, warmup, decay, steps_per_task, reset_optimizer_state)
        check_choice("mode", mode, _MODES)
        if mode == "infinite":  # reached only by subclasses: LRRewarming itself redirects in __new__
            raise ValueError(
                f"`mode='infinite'` is not supported by {type(self).__name__}. Fix: use InfiniteLRSchedule."
            )
        given = dict(cooldown_steps=cooldown_steps, constant_lr=constant_lr, anneal=anneal, anneal_steps=anneal_steps,
                     anneal_at_start=anneal_at_start, anneal_after_steps=anneal_after_steps)
        for name, value in given.items():
            if value != _INFINITE_ONLY[name]:
                raise ValueError(
                    f"`{name}={value!r}` only applies to the infinite schedule. Use InfiniteLRSchedule "
                    "(formerly `mode='infinite'`), or drop the argument."
                )
        self.mode = mode
        self._warned_overrun: set[int] = set()

    # ------------------------------------------------------------------ the schedule
    def _segment_for(self, step: int) -> Optional[TaskSegment]:
        found = None
        for segment in self._segments:
            if segment.start <= step:
                found = segment
        return found

    @override
    def lr_at(self, step: int) -> float:
        """The LR (first param group) of the run's optimizer step ``step``.

        ``step`` is 0-based and counted across tasks and fits like :attr:`steps` (in a single
        fit it equals ``trainer.global_step``). The answer is a pure function of the tasks
        already started (:attr:`segments`).

        Raises:
            RuntimeError: if the schedule at ``step`` is not known yet (no task started).
        """
        segment = self._segment_for(step)
        if segment is None:
            if self.steps_per_task is None or self._segments:
                raise RuntimeError(
                    f"LRRewarming does not know the task of step {step} yet: no task had started by then. "
                    "Call `lr_at` after the task started, or pass `steps_per_task`."
                )
            segment = TaskSegment(0, self.steps_per_task, resolve_warmup(self.warmup, self.steps_per_task))
        return segment_lr(step, segment, self.max_lr, self.min_lr, self.decay)

    @override
    def _clock_ready(self) -> bool:
        return bool(self._segments)

    @override
    def _start_segment(self, trainer: "pl.Trainer", task: int) -> TaskSegment:
        segment = self._task_segment(trainer, task)
        rank_zero_info(f"LRRewarming: task {task}: re-warming over {segment.warmup_steps} of {segment.total_steps} steps.")
        return segment

    def start_anneal(self, steps: Optional[int] = None) -> None:  # noqa: ARG002 - InfiniteLRSchedule's signature
        """Not part of re-warming: the anneal belongs to :class:`InfiniteLRSchedule`.

        Raises:
            RuntimeError: always.
        """
        raise RuntimeError(
            "`start_anneal` belongs to the infinite schedule; use InfiniteLRSchedule (formerly "
            "LRRewarming(mode='infinite'))."
        )

    def _warn_on_overrun(self) -> None:
        if not self._segments or self._trainer is None:
            return
        start, length, _ = self._segments[-1]
        if self.steps - start >= length and start not in self._warned_overrun:
            self._warned_overrun.add(start)
            rank_zero_warn(
                f"LRRewarming: the task that started at step {start} has run past its {length} steps; the LR "
                f"stays at min_lr={self.min_lr:g}. Fix: pass `steps_per_task` matching the task, or leave it "
                "unset to compute it."
            )

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        self._warn_on_overrun()
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    # ------------------------------------------------------------------ state
    @override
    def _load_schedule_state(self, state: dict[str, Any]) -> None:
        if state["warmup_steps"] is not None or state["anneal_start"] is not None:
            raise RuntimeError(
                "LRRewarming: the checkpoint's state was written by an infinite LR schedule "
                "(`LRRewarming(mode='infinite')`). Fix: resume it with InfiniteLRSchedule and the same arguments."
            )
