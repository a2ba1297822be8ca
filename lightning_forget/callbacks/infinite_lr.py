"""``InfiniteLRSchedule``: warm up once, cool down to a constant LR kept across tasks, anneal on demand."""

from __future__ import annotations

from typing import Any, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from lightning_forget.tasks import DDP_STRATEGIES, SHARDED_STRATEGIES
from lightning_forget.callbacks.lr_schedule import BaseLRSchedule
from lightning_forget.schedules import ANNEALS, Anneal, Decay, TaskSegment, infinite_lr, resolve_warmup
from lightning_forget.validation import check_bool, check_choice, check_float, check_int

try:  # Python 3.12+
    from typing import override
except ImportError:  # pragma: no cover
    from typing_extensions import override

__all__ = ["InfiniteLRSchedule"]


class InfiniteLRSchedule(BaseLRSchedule):
    """An infinite learning-rate schedule for continual pre-training: no re-warming at task switches.

    Paper: Ibrahim, Thérien, Gupta, Richter, Anthony, Lesort, Belilovsky, Rish, "Simple and
    Scalable Strategies to Continually Pre-train Large Language Models", TMLR 2024
    (arXiv:2403.08763).

    Mechanism. Re-warming the LR at every new dataset (:class:`~lightning_forget.callbacks.LRRewarming`)
    causes a burst of forgetting each time, and a cosine schedule needs the total number of
    steps in advance. The paper's alternative has neither: one linear warm-up to ``max_lr``
    (over the first task only), a cooldown from ``max_lr`` to ``constant_lr`` over
    ``cooldown_steps``, then a constant LR across all later tasks, whatever their number. When
    a release model is wanted, an anneal from the current LR to ``min_lr`` over
    ``anneal_steps`` steps (:meth:`start_anneal`, ``anneal_at_start`` or
    ``anneal_after_steps``) gives a converged checkpoint. The formula, and which step gets which
    LR, is :func:`lightning_forget.schedules.infinite_lr`; the callback mechanics (installed
    scheduler, param-group ratios, exact resume, optimizer state at task switches) are
    :class:`~lightning_forget.callbacks.lr_schedule.BaseLRSchedule`'s.

    Branching a release checkpoint off the schedule without disturbing the main run: save a
    checkpoint during the constant phase (``ModelCheckpoint(every_n_train_steps=...)``) and let
    the main run continue at the constant LR. For the release, start a *separate* fit from that
    checkpoint with ``InfiniteLRSchedule(anneal_at_start=True, anneal_steps=A, <same schedule
    arguments>)`` and ``Trainer(max_steps=<checkpoint step> + A)``: the callback state in the
    checkpoint restores the clock, and the branch anneals from its first step.
    ``anneal_after_steps=N`` instead starts the anneal when the run has taken ``N`` optimizer
    steps (counted from the start of the run, across tasks and fits).

    Args:
        max_lr: peak learning rate ``eta_max`` (first param group).
        min_lr: the anneal's final LR ``eta_min``; default ``0.1 * max_lr``.
        warmup: warm-up length: an ``int >= 0`` is a number of steps, a ``float`` in ``[0, 1)``
            a fraction of the first task's steps, ``W = ceil(warmup * T_0)`` (default 1%).
        decay: ``"cosine"`` or ``"linear"``: the shape of the cooldown.
        steps_per_task: the first task's length in optimizer steps, needed only to resolve a
            fractional ``warmup`` before training (default: computed when the task starts).
        reset_optimizer_state: clear the optimizer's per-parameter state at every task switch
            (default ``False``: kept; carried from fit to fit with one fit per task).
        cooldown_steps: cooldown length ``C`` from ``max_lr`` to ``constant_lr``.
        constant_lr: the constant LR; default ``(max_lr + min_lr) / 2`` (1.65e-4 for 3e-4 /
            3e-5, the value reported for the paper's 405M infinite runs).
        anneal: the anneal's shape, ``"exponential"`` (default; needs ``min_lr > 0``),
            ``"cosine"`` or ``"linear"``.
        anneal_steps: default anneal length ``A`` in steps.
        anneal_at_start: anneal from the first step of this fit (for a release branch resumed
            from a checkpoint).
        anneal_after_steps: anneal once the run has taken this many optimizer steps.

    Raises:
        ValueError: on an invalid value (the message names the argument and the fix).
        TypeError: on an argument of the wrong type.
        RuntimeError: in ``on_fit_start`` when the fit has more than one optimizer; at the first
            task start when its length cannot be known and ``warmup`` is a fraction.

    Note:
        Logged keys: none by itself; with a ``LearningRateMonitor`` the LR appears as
        ``infinite_lr/lr`` (``infinite_lr/lr/pg{i}`` with several param groups). Built through
        the deprecated ``LRRewarming(mode="infinite")`` it keeps the old ``lr_rewarming/lr``.

        Saved state (``state_dict``, version 1): ``steps`` (optimizer steps taken in the run),
        ``segments`` (``[start_step, T, W]`` per task started: ``T`` and ``W`` of the first task
        where ``warmup`` was a fraction, ``T = -1`` where nothing restarts), ``warmup_steps``
        (resolved ``W``), ``anneal_start`` and ``anneal_steps``, plus
        :class:`~lightning_forget.tasks.ContinualCallback`'s protocol counters. Checkpoints of
        ``LRRewarming(mode="infinite")`` (state key ``LRRewarming``) are read too.
    """

    #: Tested single-process and under DDP; sharded strategies are refused in ``setup``.
    supported_strategies: tuple[str, ...] = DDP_STRATEGIES + SHARDED_STRATEGIES

    SCHEDULER_NAME = "infinite_lr/lr"
    #: State key of checkpoints written by ``LRRewarming(mode="infinite")`` (read by :meth:`on_load_checkpoint`).
    LEGACY_STATE_KEY = "LRRewarming"

    def __init__(
        self,
        max_lr: float,
        min_lr: Optional[float] = None,
        warmup: Union[int, float] = 0.01,
        decay: Decay = "cosine",
        steps_per_task: Optional[int] = None,
        reset_optimizer_state: bool = False,
        cooldown_steps: int = 0,
        constant_lr: Optional[float] = None,
        anneal: Anneal = "exponential",
        anneal_steps: Optional[int] = None,
        anneal_at_start: bool = False,
        anneal_after_steps: Optional[int] = None,
    ) -> None:
        super().__init__(max_lr, min_lr, warmup, decay, steps_per_task, reset_optimizer_state)
        self.cooldown_steps = check_int("cooldown_steps", cooldown_steps, min=0)
        check_float("constant_lr", constant_lr, min=0, allow_none=True)
        self.constant_lr = 0.5 * (self.max_lr + self.min_lr) if constant_lr is None else float(constant_lr)
        self.anneal = check_choice("anneal", anneal, ANNEALS)
        self.anneal_steps = check_int("anneal_steps", anneal_steps, min=1, allow_none=True)
        self.anneal_at_start = check_bool("anneal_at_start", anneal_at_start)
        self.anneal_after_steps = check_int("anneal_after_steps", anneal_after_steps, min=0, allow_none=True)
        if anneal_at_start and anneal_after_steps is not None:
            raise ValueError(
                f"`anneal_at_start=True` and `anneal_after_steps={anneal_after_steps!r}` both say when to anneal; "
                "pass only one."
            )
        if (anneal_at_start or anneal_after_steps is not None) and anneal_steps is None:
            raise ValueError(
                "`anneal_steps` is None, but `anneal_at_start`/`anneal_after_steps` asks for an anneal. "
                "Pass `anneal_steps=<number of steps>`."
            )
        if not (self.min_lr <= self.constant_lr <= self.max_lr):
            raise ValueError(
                f"`constant_lr` ({self.constant_lr!r}) must lie between `min_lr` ({self.min_lr!r}) and "
                f"`max_lr` ({self.max_lr!r})."
            )
        if self.anneal == "exponential" and (self.min_lr <= 0 or self.constant_lr <= 0):
            raise ValueError(
                f"`anneal='exponential'` decays geometrically towards `min_lr`, which must be > 0, got "
                f"min_lr={self.min_lr!r}. Pass a positive `min_lr` or `anneal='cosine'`/'linear'."
            )
        # the schedule (saved)
        self._warmup_steps: Optional[int] = self.warmup if isinstance(self.warmup, int) else None
        self._anneal_start: Optional[int] = anneal_after_steps
        self._anneal_len: Optional[int] = anneal_steps if anneal_after_steps is not None else None

    # ------------------------------------------------------------------ the schedule
    @property
    def annealing(self) -> bool:
        """Whether an anneal has been scheduled."""
        return self._anneal_start is not None

    @override
    def lr_at(self, step: int) -> float:
        """The LR (first param group) of the run's optimizer step ``step``.

        ``step`` is 0-based and counted across tasks and fits like :attr:`steps` (in a single
        fit it equals ``trainer.global_step``).

        Raises:
            RuntimeError: if ``warmup`` is a fraction and the first task's length is not known yet.
        """
        warmup_steps = self._warmup_steps
        if warmup_steps is None:
            if self.steps_per_task is None:
                raise RuntimeError(
                    f"`warmup={self.warmup!r}` is a fraction of the first task's steps, which is unknown until the "
                    "first task starts. Call `lr_at` later, or pass `steps_per_task` or an int `warmup`."
                )
            warmup_steps = resolve_warmup(self.warmup, self.steps_per_task)
        return infinite_lr(
            step, self.max_lr, self.min_lr, warmup_steps, self.cooldown_steps, self.constant_lr, self.decay,
            self.anneal, self._anneal_start, self._anneal_len,
        )

    @override
    def _clock_ready(self) -> bool:
        return self._warmup_steps is not None

    @override
    def _start_segment(self, trainer: "pl.Trainer", task: int) -> TaskSegment:
        if not self._segments and self._warmup_steps is None:  # a fractional warm-up of the first task
            segment = self._task_segment(trainer, task)
            self._warmup_steps = segment.warmup_steps
            return segment
        return TaskSegment(self.steps, -1, self._warmup_steps if self._warmup_steps is not None else -1)

    def start_anneal(self, steps: Optional[int] = None) -> None:
        """Switch the schedule into its anneal, from the current LR to ``min_lr``.

        The anneal starts with the next optimizer step and lasts ``steps`` steps (default:
        ``anneal_steps``). Checkpoint the pre-anneal state first if training should continue at
        the constant LR afterwards (see the class docstring).

        Raises:
            RuntimeError: when an anneal was already scheduled.
            ValueError: if neither ``steps`` nor ``anneal_steps`` gives a positive length.
        """
        if self._anneal_start is not None:
            raise RuntimeError(
                f"An anneal was already scheduled at step {self._anneal_start} (over {self._anneal_len} steps); "
                "it can be started only once per run."
            )
        length = self.anneal_steps if steps is None else steps
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(
                f"`steps` must be a positive int (or set `anneal_steps` in the constructor), got {length!r}."
            )
        self._anneal_start = self.steps
        self._anneal_len = length
        rank_zero_info(
            f"{type(self).__name__}: annealing to min_lr={self.min_lr:g} over {length} steps from step {self._anneal_start}."
        )
        self._apply_lr()

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_train_start(trainer, pl_module)
        if self.anneal_at_start and self._anneal_start is None:
            self.start_anneal()
        self._apply_lr()

    @override
    def on_load_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]) -> None:
        """Read the clock of a checkpoint written by ``LRRewarming(mode="infinite")``.

        That class kept its state under the key ``LRRewarming``; when this callback's own key is
        absent, no ``LRRewarming`` is attached, and that state is an infinite schedule's, it is
        copied to this callback's key before Lightning restores callback states.
        """
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        states = checkpoint.get("callbacks")
        if not states or self.state_key in states or self.LEGACY_STATE_KEY not in states:
            return
        if any(type(cb).__qualname__ == self.LEGACY_STATE_KEY for cb in trainer.callbacks):
            return
        legacy = states[self.LEGACY_STATE_KEY]
        method = legacy.get("method", legacy)  # lightning_forget 0.1.0 kept the keys at the top level
        infinite = (
            method.get("warmup_steps") is not None
            or method.get("anneal_start") is not None
            or any(int(segment[1]) == -1 for segment in method.get("segments", []))
        )
        if infinite:
            states[self.state_key] = legacy

    # ------------------------------------------------------------------ state
    @override
    def _schedule_state(self) -> dict[str, Any]:
        return {"warmup_steps": self._warmup_steps, "anneal_start": self._anneal_start, "anneal_steps": self._anneal_len}

    @override
    def _load_schedule_state(self, state: dict[str, Any]) -> None:
        if state["warmup_steps"] is not None:
            self._warmup_steps = int(state["warmup_steps"])
        if state["anneal_start"] is not None:
            self._anneal_start = int(state["anneal_start"])
            self._anneal_len = int(state["anneal_steps"])
