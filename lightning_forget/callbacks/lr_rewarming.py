"""LR re-warming and re-decaying per task, and infinite LR schedules, for continual pre-training."""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lightning_forget.tasks import ContinualCallback, task_schedule

try:  # Python 3.12+
    from typing import override
except ImportError:  # pragma: no cover
    from typing_extensions import override

__all__ = ["LRRewarming", "schedule_lr", "resolve_warmup"]

Mode = Literal["rewarm", "infinite"]
Decay = Literal["cosine", "linear"]
Anneal = Literal["cosine", "linear", "exponential"]

_MODES = ("rewarm", "infinite")
_DECAYS = ("cosine", "linear")
_ANNEALS = ("cosine", "linear", "exponential")


# ---------------------------------------------------------------------------------------- formulas
def resolve_warmup(warmup: Union[int, float], total_steps: Optional[int]) -> int:
    """The number of warm-up steps ``W`` for a task of ``total_steps`` optimizer steps.

    Args:
        warmup: an ``int`` is a number of steps; a ``float`` in ``[0, 1)`` is a fraction of
            ``total_steps``, rounded up: ``W = ceil(warmup * total_steps)``.
        total_steps: the task's number of optimizer steps (needed only for a fraction).

    Raises:
        ValueError: if ``warmup`` is a fraction and ``total_steps`` is unknown.
    """
    if isinstance(warmup, int) and not isinstance(warmup, bool):
        return warmup
    if total_steps is None:
        raise ValueError(
            f"`warmup={warmup!r}` is a fraction of the task's steps, but the number of steps is "
            "unknown. Pass `steps_per_task`, or give `warmup` as an int number of steps."
        )
    return int(math.ceil(float(warmup) * total_steps))


def _shape(progress: float, start: float, end: float, shape: str) -> float:
    """Go from ``start`` (progress 0) to ``end`` (progress 1) along a cosine or a straight line."""
    progress = min(max(progress, 0.0), 1.0)
    if shape == "cosine":
        return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))
    return start + (end - start) * progress


def _eta(
    t: int,
    mode: str,
    max_lr: float,
    min_lr: float,
    warmup_steps: int,
    total_steps: Optional[int],
    decay: str,
    cooldown_steps: int,
    constant_lr: float,
) -> float:
    """The LR after ``t`` optimizer steps, in the notation of METHODS.md §7.2 (no annealing)."""
    if warmup_steps > 0 and t <= warmup_steps:
        return max_lr * t / warmup_steps
    if mode == "rewarm":
        assert total_steps is not None
        if t >= total_steps:
            return min_lr
        return _shape((t - warmup_steps) / (total_steps - warmup_steps), max_lr, min_lr, decay)
    if cooldown_steps > 0 and t < warmup_steps + cooldown_steps:
        return _shape((t - warmup_steps) / cooldown_steps, max_lr, constant_lr, decay)
    return constant_lr


def _annealed(k: int, from_lr: float, min_lr: float, anneal_steps: int, anneal: str) -> float:
    """The LR ``k`` steps into an anneal from ``from_lr`` to ``min_lr`` over ``anneal_steps``."""
    if k >= anneal_steps:
        return min_lr
    if anneal == "exponential":
        return from_lr * (min_lr / from_lr) ** (k / anneal_steps)
    return _shape(k / anneal_steps, from_lr, min_lr, anneal)


def schedule_lr(
    step: int,
    max_lr: float,
    min_lr: float = 0.0,
    warmup_steps: int = 0,
    total_steps: Optional[int] = None,
    decay: Decay = "cosine",
    mode: Mode = "rewarm",
    cooldown_steps: int = 0,
    constant_lr: Optional[float] = None,
    anneal: Anneal = "exponential",
    anneal_start: Optional[int] = None,
    anneal_steps: Optional[int] = None,
) -> float:
    """The learning rate of optimizer step ``step`` (0-based) under :class:`LRRewarming`.

    This is the pure formula the callback applies; it knows nothing of Lightning.

    **Which step gets which LR.** With ``eta(t)`` the schedule of METHODS.md §7.2 written as a
    function of ``t``, the number of optimizer steps already taken, step ``n`` (0-based) uses
    ``eta(n + 1)``. The first step of a warm-up therefore uses ``max_lr / W`` (never a wasted
    step at LR 0), step ``W - 1`` is the first to use ``max_lr``, and the last step of a task of
    ``T`` steps (``n = T - 1``) uses exactly ``min_lr``.

    ``mode="rewarm"`` (``step`` counts from the start of the task, ``total_steps`` = ``T``):

    - ``eta(t) = max_lr * t / W`` for ``t <= W``;
    - ``eta(t) = min_lr + (max_lr - min_lr) * (1 + cos(pi * (t - W) / (T - W))) / 2`` for
      ``W < t <= T`` (``decay="linear"``: a straight line from ``max_lr`` to ``min_lr``);
    - ``eta(t) = min_lr`` for ``t > T``.

    ``mode="infinite"`` (``step`` counts from the start of the run, across tasks):

    - warm-up as above, then a cooldown from ``max_lr`` to ``constant_lr`` over
      ``cooldown_steps`` steps (cosine or linear, by ``decay``), then ``constant_lr`` for ever;
    - if ``anneal_start`` is given (the number of steps taken when annealing began), every step
      ``n >= anneal_start`` instead uses ``a(n + 1 - anneal_start)``, an anneal from
      ``a(0) = eta(anneal_start)`` (the LR of the last step before it) to ``min_lr`` over
      ``anneal_steps`` steps: ``exponential``: ``a(k) = a(0) * (min_lr / a(0)) ** (k / A)``;
      ``cosine`` / ``linear`` as for the decay; ``min_lr`` once ``k >= A``.

    Args:
        step: 0-based index of the optimizer step (task-local in ``rewarm`` mode, run-wide in
            ``infinite`` mode).
        max_lr: peak learning rate ``eta_max``.
        min_lr: final learning rate ``eta_min``.
        warmup_steps: warm-up length ``W`` in steps (see :func:`resolve_warmup`).
        total_steps: the task's length ``T`` (``rewarm`` mode only; required there).
        decay: shape of the re-decay (``rewarm``) or of the cooldown (``infinite``).
        mode: ``"rewarm"`` or ``"infinite"``.
        cooldown_steps: cooldown length ``C`` (``infinite`` mode).
        constant_lr: the constant LR (``infinite`` mode; defaults to ``(max_lr + min_lr) / 2``).
        anneal: shape of the anneal (``infinite`` mode).
        anneal_start: steps taken when annealing began, or ``None`` for no anneal.
        anneal_steps: anneal length ``A`` (required with ``anneal_start``).

    Returns:
        The learning rate (of the first parameter group; see :class:`LRRewarming` for others).

    Raises:
        ValueError: on a negative ``step``, a missing ``total_steps`` in ``rewarm`` mode, or a
            missing ``anneal_steps`` with ``anneal_start``.
    """
    if step < 0:
        raise ValueError(f"`step` must be >= 0, got {step!r}.")
    if mode not in _MODES:
        raise ValueError(f"`mode` must be one of {_MODES}, got {mode!r}.")
    if mode == "rewarm" and (total_steps is None or total_steps < 1):
        raise ValueError(f"`total_steps` must be a positive int in mode='rewarm', got {total_steps!r}.")
    if constant_lr is None:
        constant_lr = 0.5 * (max_lr + min_lr)
    if mode == "rewarm":
        assert total_steps is not None
        warmup_steps = min(warmup_steps, total_steps)
    args = (mode, max_lr, min_lr, warmup_steps, total_steps, decay, cooldown_steps, constant_lr)
    if mode == "infinite" and anneal_start is not None and step >= anneal_start:
        if anneal_steps is None or anneal_steps < 1:
            raise ValueError(f"`anneal_steps` must be a positive int with `anneal_start`, got {anneal_steps!r}.")
        from_lr = _eta(anneal_start, *args)
        return _annealed(step + 1 - anneal_start, from_lr, min_lr, anneal_steps, anneal)
    return _eta(step + 1, *args)


# ---------------------------------------------------------------------------------------- scheduler
class _CallbackLR(LRScheduler):
    """A step-interval scheduler whose LR comes from :class:`LRRewarming`'s clock.

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
        """Ignored: the schedule's state is restored from :class:`LRRewarming`'s own state."""


# ---------------------------------------------------------------------------------------- callback
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class LRRewarming(ContinualCallback):
    """Re-warm and re-decay the learning rate at every task, or run an infinite LR schedule.

    Paper: Ibrahim, Thérien, Gupta, Richter, Anthony, Lesort, Belilovsky, Rish, "Simple and
    Scalable Strategies to Continually Pre-train Large Language Models", TMLR 2024
    (arXiv:2403.08763).

    Mechanism. When an LLM is pre-trained further on a new dataset, re-warming the LR (linear
    warm-up back to ``max_lr``), re-decaying it (cosine down to ``min_lr`` over the new data) and
    replaying a little old data (see :class:`~lightning_forget.callbacks.ExperienceReplay`)
    together match re-training on the union of all data. ``mode="rewarm"`` does the first two:
    at every task start the schedule's clock restarts at 0, with ``W`` warm-up steps and ``T``
    steps in the task (see :func:`schedule_lr` for the formula and for which step gets which
    LR). ``mode="infinite"`` is the paper's alternative that needs no re-warming: one warm-up
    (first task only), a cooldown from ``max_lr`` to ``constant_lr`` over ``cooldown_steps``,
    then a constant LR across all later tasks; whenever a release checkpoint is wanted, an
    anneal from the current LR to ``min_lr`` over ``anneal_steps`` steps (:meth:`start_anneal`,
    ``anneal_at_start`` or ``anneal_after_steps``).

    The callback replaces whatever scheduler the module's ``configure_optimizers`` returned (with
    a warning) by a step-interval scheduler named ``"lr_rewarming/lr"`` in
    ``trainer.lr_scheduler_configs``, installed in ``on_fit_start``, so Lightning steps it and
    ``LearningRateMonitor`` logs it. The LR is a pure function of the run's optimizer-step count
    (``trainer.global_step`` plus the steps of earlier fits), the start step of the current task
    and the task's length, all saved in the callback's state: a run resumed mid-task gets the
    same LR at every step as an uninterrupted one, whatever Lightning restores into schedulers.

    Task length ``T``: ``steps_per_task`` if given; else, with a
    :class:`~lightning_forget.datamodules.ContinualDataModule` (one fit over all tasks),
    ``ceil(len(train loader) / accumulate_grad_batches) * epochs_per_task``, read when the task
    starts (Lightning has loaded the new task's loader by ``on_train_epoch_start``;
    ``max_steps`` is not taken into account, so stopping and resuming does not change ``T``);
    with one fit per task, ``trainer.estimated_stepping_batches - trainer.global_step`` (this
    honours ``max_steps``). Rank 0's value is broadcast to all ranks.

    Param groups: every group keeps its ratio to the first group's initial LR (its
    ``initial_lr`` or ``lr`` when the fit's optimizer was built): group ``g`` gets
    ``schedule_lr(...) * lr_g / lr_0``. ``max_lr``, ``min_lr`` and ``constant_lr`` are the first
    group's values. Exactly one optimizer is supported.

    Optimizer state at task switches: with ``reset_optimizer_state=True`` the optimizer's
    per-parameter state (Adam moments, step counts, momentum buffers) is cleared at the start of
    every task after the first. With ``False`` (the default, as METHODS.md §7.2 asks) it is
    kept (summaries of the paper say its runs reset the optimizer states between datasets: pass
    ``True`` to match them): in one-fit-per-task mode, where each fit builds a fresh optimizer,
    the callback hands the previous fit's per-parameter state to the new optimizer when the next
    task starts (the new optimizer keeps its own hyperparameters; a mismatch in parameter count
    is reported with a warning and the state is not carried).

    Branching a release checkpoint off an infinite schedule without disturbing the main run:
    save a checkpoint during the constant phase (``ModelCheckpoint(every_n_train_steps=...)``)
    and let the main run continue at the constant LR. For the release, start a *separate* fit
    from that checkpoint with ``LRRewarming(mode="infinite", anneal_at_start=True,
    anneal_steps=A, <same schedule arguments>)`` and ``Trainer(max_steps=<checkpoint step> + A)``:
    the callback state in the checkpoint restores the clock, and the branch anneals from its
    first step. ``anneal_after_steps=N`` instead starts the anneal when the run has taken ``N``
    optimizer steps (counted from the start of the run, across tasks and fits).

    Args:
        max_lr: peak learning rate ``eta_max`` (first param group).
        min_lr: final learning rate ``eta_min`` of a decay or anneal; default ``0.1 * max_lr``
            (METHODS.md §7.2; the paper's runs use 3e-4 → 3e-5 and 1.2e-4 → 1.2e-5 according to
            summaries of its Table 14 and a co-author's GPT-NeoX config; the paper text itself
            was not read).
        warmup: warm-up length: an ``int >= 0`` is a number of steps, a ``float`` in ``[0, 1)``
            a fraction of the task's steps, ``W = ceil(warmup * T)`` (default 1%, the paper's
            value per summaries of it, with 0-2% reported to behave alike).
            In ``infinite`` mode the fraction is of the first task's steps.
        decay: ``"cosine"`` or ``"linear"``: the shape of the re-decay (``rewarm``) or of the
            cooldown (``infinite``).
        steps_per_task: the task length ``T`` in optimizer steps (default: computed at each
            task start, see above). Needed for iterable datasets without a length.
        reset_optimizer_state: clear the optimizer's per-parameter state at every task switch.
        mode: ``"rewarm"`` (re-warm and re-decay at every task) or ``"infinite"``.
        cooldown_steps: ``infinite`` mode: cooldown length ``C`` from ``max_lr`` to
            ``constant_lr``.
        constant_lr: ``infinite`` mode: the constant LR; default ``(max_lr + min_lr) / 2``
            (1.65e-4 for 3e-4 / 3e-5, the value reported for the paper's 405M infinite runs;
            its cooldown shape is not verified: ours is ``decay``, cosine or linear).
        anneal: ``infinite`` mode: the anneal's shape, ``"exponential"`` (default; needs
            ``min_lr > 0``), ``"cosine"`` or ``"linear"``.
        anneal_steps: ``infinite`` mode: default anneal length ``A`` in steps.
        anneal_at_start: ``infinite`` mode: anneal from the first step of this fit (for a
            release branch resumed from a checkpoint).
        anneal_after_steps: ``infinite`` mode: anneal once the run has taken this many steps.

    Raises:
        ValueError: on an invalid argument (the message names it and the fix).
        TypeError: on an argument of the wrong type.
        RuntimeError: in ``on_fit_start`` when the fit has more than one optimizer; at a task
            start when the task length cannot be known. (Lightning itself refuses two
            ``LRRewarming`` callbacks in one Trainer: they would share a state key.)

    Note:
        Logged keys: none by itself; with a ``LearningRateMonitor`` the LR appears as
        ``lr_rewarming/lr`` (``lr_rewarming/lr/pg{i}`` with several param groups).

        Saved state (``state_dict``): ``steps`` (optimizer steps taken in the run),
        ``segments`` (``[start_step, T, W]`` of every task started, in order),
        ``warmup_steps`` (resolved ``W`` of the infinite schedule), ``anneal_start`` and
        ``anneal_steps``, plus :class:`~lightning_forget.tasks.ContinualCallback`'s ``task``,
        ``started``, ``ended``, and ``version``. Only one instance per Trainer is allowed, so
        the state key is the class name (a release branch with different ``anneal_*``
        arguments still restores the main run's clock).
    """

    SCHEDULER_NAME = "lr_rewarming/lr"

    def __init__(
        self,
        max_lr: float,
        min_lr: Optional[float] = None,
        warmup: Union[int, float] = 0.01,
        decay: Decay = "cosine",
        steps_per_task: Optional[int] = None,
        reset_optimizer_state: bool = False,
        mode: Mode = "rewarm",
        cooldown_steps: int = 0,
        constant_lr: Optional[float] = None,
        anneal: Anneal = "exponential",
        anneal_steps: Optional[int] = None,
        anneal_at_start: bool = False,
        anneal_after_steps: Optional[int] = None,
    ) -> None:
        super().__init__()
        self._validate(
            max_lr, min_lr, warmup, decay, steps_per_task, reset_optimizer_state, mode, cooldown_steps,
            constant_lr, anneal, anneal_steps, anneal_at_start, anneal_after_steps,
        )
        self.max_lr = float(max_lr)
        self.min_lr = 0.1 * self.max_lr if min_lr is None else float(min_lr)
        self.warmup = warmup
        self.decay = decay
        self.steps_per_task = steps_per_task
        self.reset_optimizer_state = reset_optimizer_state
        self.mode = mode
        self.cooldown_steps = cooldown_steps
        self.constant_lr = 0.5 * (self.max_lr + self.min_lr) if constant_lr is None else float(constant_lr)
        self.anneal = anneal
        self.anneal_steps = anneal_steps
        self.anneal_at_start = anneal_at_start
        self.anneal_after_steps = anneal_after_steps
        self._check_lr_order()

        # the clock (saved)
        self._steps_before_fit: int = 0
        self._segments: list[list[int]] = []
        self._warmup_steps: Optional[int] = warmup if (_is_int(warmup) and mode == "infinite") else None
        self._anneal_start: Optional[int] = anneal_after_steps
        self._anneal_len: Optional[int] = anneal_steps if anneal_after_steps is not None else None
        # runtime only (never saved, never pickled)
        self._trainer: Optional["pl.Trainer"] = None
        self._global_step_at_start: Optional[int] = None
        self._scheduler: Optional[_CallbackLR] = None
        self._carried_state: Optional[dict[Any, Any]] = None
        self._warned_overrun: set[int] = set()

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _validate(
        max_lr: Any, min_lr: Any, warmup: Any, decay: Any, steps_per_task: Any, reset_optimizer_state: Any,
        mode: Any, cooldown_steps: Any, constant_lr: Any, anneal: Any, anneal_steps: Any, anneal_at_start: Any,
        anneal_after_steps: Any,
    ) -> None:
        if not _is_number(max_lr) or max_lr <= 0:
            raise ValueError(f"`max_lr` must be a positive finite number, got {max_lr!r}.")
        if min_lr is not None and (not _is_number(min_lr) or min_lr < 0):
            raise ValueError(f"`min_lr` must be a finite number >= 0 (or None for 0.1 * max_lr), got {min_lr!r}.")
        if _is_int(warmup):
            if warmup < 0:
                raise ValueError(f"`warmup` as an int is a number of steps and must be >= 0, got {warmup!r}.")
        elif isinstance(warmup, float):
            if not (0.0 <= warmup < 1.0):
                raise ValueError(
                    f"`warmup` as a float is a fraction of the task's steps and must be in [0, 1), got {warmup!r}. "
                    "For a number of steps pass an int (e.g. `warmup=100`)."
                )
        else:
            raise TypeError(f"`warmup` must be an int (steps) or a float (fraction), got {type(warmup).__name__}.")
        if decay not in _DECAYS:
            raise ValueError(f"`decay` must be one of {_DECAYS}, got {decay!r}.")
        if steps_per_task is not None and (not _is_int(steps_per_task) or steps_per_task < 1):
            raise ValueError(f"`steps_per_task` must be a positive int (or None to compute it), got {steps_per_task!r}.")
        if not isinstance(reset_optimizer_state, bool):
            raise TypeError(f"`reset_optimizer_state` must be a bool, got {reset_optimizer_state!r}.")
        if mode not in _MODES:
            raise ValueError(f"`mode` must be one of {_MODES}, got {mode!r}.")
        if not _is_int(cooldown_steps) or cooldown_steps < 0:
            raise ValueError(f"`cooldown_steps` must be an int >= 0, got {cooldown_steps!r}.")
        if constant_lr is not None and (not _is_number(constant_lr) or constant_lr < 0):
            raise ValueError(f"`constant_lr` must be a finite number >= 0 (or None), got {constant_lr!r}.")
        if anneal not in _ANNEALS:
            raise ValueError(f"`anneal` must be one of {_ANNEALS}, got {anneal!r}.")
        if anneal_steps is not None and (not _is_int(anneal_steps) or anneal_steps < 1):
            raise ValueError(f"`anneal_steps` must be a positive int (or None), got {anneal_steps!r}.")
        if not isinstance(anneal_at_start, bool):
            raise TypeError(f"`anneal_at_start` must be a bool, got {anneal_at_start!r}.")
        if anneal_after_steps is not None and (not _is_int(anneal_after_steps) or anneal_after_steps < 0):
            raise ValueError(f"`anneal_after_steps` must be an int >= 0 (or None), got {anneal_after_steps!r}.")
        if mode == "rewarm":
            for name, value, default in (
                ("cooldown_steps", cooldown_steps, 0),
                ("constant_lr", constant_lr, None),
                ("anneal_steps", anneal_steps, None),
                ("anneal_at_start", anneal_at_start, False),
                ("anneal_after_steps", anneal_after_steps, None),
            ):
                if value != default:
                    raise ValueError(
                        f"`{name}={value!r}` only applies to the infinite schedule. "
                        "Pass `mode='infinite'`, or drop the argument."
                    )
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

    def _check_lr_order(self) -> None:
        if self.min_lr > self.max_lr:
            raise ValueError(f"`min_lr` ({self.min_lr!r}) must not exceed `max_lr` ({self.max_lr!r}).")
        if self.mode == "infinite":
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

    # ------------------------------------------------------------------ the clock
    @property
    def steps(self) -> int:
        """Optimizer steps taken so far in the run (across tasks and fits)."""
        if self._trainer is not None and self._global_step_at_start is not None:
            return self._steps_before_fit + int(self._trainer.global_step) - self._global_step_at_start
        return self._steps_before_fit

    @property
    def annealing(self) -> bool:
        """Whether an anneal has been scheduled (infinite mode)."""
        return self._anneal_start is not None

    def _segment_for(self, step: int) -> Optional[list[int]]:
        found = None
        for segment in self._segments:
            if segment[0] <= step:
                found = segment
        return found

    def lr_at(self, step: int) -> float:
        """The LR (first param group) of the run's optimizer step ``step``.

        ``step`` is 0-based and counted across tasks and fits like :attr:`steps` (in a single
        fit it equals ``trainer.global_step``). The answer is a pure function of the recorded
        schedule: the tasks already started, the resolved warm-up and any scheduled anneal.

        Raises:
            RuntimeError: if the schedule at ``step`` is not known yet (no task started).
        """
        if self.mode == "rewarm":
            segment = self._segment_for(step)
            if segment is None:
                if self.steps_per_task is None or self._segments:
                    raise RuntimeError(
                        f"LRRewarming does not know the task of step {step} yet: no task had started by then. "
                        "Call `lr_at` after the task started, or pass `steps_per_task`."
                    )
                segment = [0, self.steps_per_task, resolve_warmup(self.warmup, self.steps_per_task)]
            start, total, warmup = segment
            return schedule_lr(
                step - start, self.max_lr, self.min_lr, warmup, total, self.decay, mode="rewarm"
            )
        warmup_steps = self._warmup_steps
        if warmup_steps is None:
            if self.steps_per_task is None:
                raise RuntimeError(
                    f"`warmup={self.warmup!r}` is a fraction of the first task's steps, which is unknown until the "
                    "first task starts. Call `lr_at` later, or pass `steps_per_task` or an int `warmup`."
                )
            warmup_steps = resolve_warmup(self.warmup, self.steps_per_task)
        return schedule_lr(
            step, self.max_lr, self.min_lr, warmup_steps, None, self.decay, mode="infinite",
            cooldown_steps=self.cooldown_steps, constant_lr=self.constant_lr, anneal=self.anneal,
            anneal_start=self._anneal_start, anneal_steps=self._anneal_len,
        )

    def _current_lr(self) -> Optional[float]:
        """The LR of the next optimizer step, or ``None`` before the clock is running."""
        if self._trainer is None or self._global_step_at_start is None:
            return None
        if self.mode == "rewarm" and not self._segments:
            return None
        if self.mode == "infinite" and self._warmup_steps is None:
            return None
        return self.lr_at(self.steps)

    def _warn_on_overrun(self) -> None:
        if self.mode != "rewarm" or not self._segments or self._trainer is None:
            return
        start, length, _ = self._segments[-1]
        if self.steps - start >= length and start not in self._warned_overrun:
            self._warned_overrun.add(start)
            rank_zero_warn(
                f"LRRewarming: the task that started at step {start} has run past its {length} steps; the LR "
                f"stays at min_lr={self.min_lr:g}. Fix: pass `steps_per_task` matching the task, or leave it "
                "unset to compute it."
            )

    def _apply_lr(self) -> None:
        if self._scheduler is not None:
            self._scheduler.apply()

    def start_anneal(self, steps: Optional[int] = None) -> None:
        """Switch the infinite schedule into its anneal, from the current LR to ``min_lr``.

        The anneal starts with the next optimizer step (see :func:`schedule_lr`) and lasts
        ``steps`` steps (default: ``anneal_steps``). Checkpoint the pre-anneal state first if
        training should continue at the constant LR afterwards (see the class docstring).

        Args:
            steps: anneal length in optimizer steps.

        Raises:
            RuntimeError: in ``rewarm`` mode, or when an anneal was already scheduled.
            ValueError: if neither ``steps`` nor ``anneal_steps`` gives a positive length.
        """
        if self.mode != "infinite":
            raise RuntimeError("`start_anneal` belongs to the infinite schedule; build LRRewarming(mode='infinite').")
        if self._anneal_start is not None:
            raise RuntimeError(
                f"An anneal was already scheduled at step {self._anneal_start} (over {self._anneal_len} steps); "
                "it can be started only once per run."
            )
        length = self.anneal_steps if steps is None else steps
        if not _is_int(length) or length < 1:
            raise ValueError(
                f"`steps` must be a positive int (or set `anneal_steps` in the constructor), got {length!r}."
            )
        self._anneal_start = self.steps
        self._anneal_len = length
        rank_zero_info(f"LRRewarming: annealing to min_lr={self.min_lr:g} over {length} steps from step {self._anneal_start}.")
        self._apply_lr()

    # ------------------------------------------------------------------ task length and optimizer
    def _task_length(self, trainer: "pl.Trainer") -> int:
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
                f"LRRewarming cannot tell how many optimizer steps this task has (got {length!r}: the training "
                "loader has no length, or the Trainer has neither max_epochs nor max_steps). "
                "Fix: pass `LRRewarming(steps_per_task=...)`."
            )
        return int(trainer.strategy.broadcast(int(length), src=0))

    def _reset_optimizer(self, trainer: "pl.Trainer") -> None:
        for optimizer in trainer.optimizers:
            optimizer.state.clear()
        rank_zero_info("LRRewarming: cleared the optimizer state at the task switch.")

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
                f"LRRewarming: the previous task's optimizer had {n_then} parameters and this one has {n_now}; "
                "its state (e.g. Adam moments) is not carried over. Pass `reset_optimizer_state=True` to "
                "silence this."
            )
            return
        current["state"] = carried["state"]
        optimizer.load_state_dict(current)

    # ------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_fit_start(trainer, pl_module)
        if len(trainer.optimizers) != 1:
            raise RuntimeError(
                f"LRRewarming drives exactly one optimizer; `configure_optimizers` returned {len(trainer.optimizers)}. "
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
                    "LRRewarming: the first param group's LR is 0, so group ratios are undefined; every group "
                    "gets the same LR."
                )
        if trainer.lr_scheduler_configs:
            names = ", ".join(type(cfg.scheduler).__name__ for cfg in trainer.lr_scheduler_configs)
            rank_zero_warn(
                f"LRRewarming replaced the scheduler(s) returned by `configure_optimizers` ({names}) with its own "
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
        if self.mode == "infinite" and self.anneal_at_start and self._anneal_start is None:
            self.start_anneal()
        self._apply_lr()

    @override
    def on_task_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        super().on_task_start(trainer, pl_module, task)
        first = not self._segments
        if self.mode == "rewarm" or (self._warmup_steps is None and first):
            length = self._task_length(trainer)
            warmup = resolve_warmup(self.warmup, length)
            if warmup > length:
                rank_zero_warn(
                    f"LRRewarming: warm-up of {warmup} steps is longer than task {task} ({length} steps); "
                    "the task ends at the top of the warm-up. Pass a smaller `warmup`."
                )
                warmup = length
            if self.mode == "infinite":
                self._warmup_steps = warmup
        else:  # infinite schedule after its first task: nothing restarts
            length = -1
            warmup = self._warmup_steps if self._warmup_steps is not None else -1
        self._segments.append([self.steps, int(length), int(warmup)])
        if not first:
            if self.reset_optimizer_state:
                self._reset_optimizer(trainer)
            elif task_schedule(trainer) is None:
                self._carry_optimizer_state(trainer)
        if self.mode == "rewarm":
            rank_zero_info(f"LRRewarming: task {task}: re-warming over {warmup} of {length} steps.")
        self._apply_lr()

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        # Idempotent: also covers manual optimization, where Lightning does not step schedulers.
        self._warn_on_overrun()
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
    @override
    def method_state(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "segments": [list(segment) for segment in self._segments],
            "warmup_steps": self._warmup_steps,
            "anneal_start": self._anneal_start,
            "anneal_steps": self._anneal_len,
        }

    @override
    def load_method_state(self, state: dict[str, Any]) -> None:
        self._steps_before_fit = int(state["steps"])
        self._segments = [[int(v) for v in segment] for segment in state["segments"]]
        if state["warmup_steps"] is not None:
            self._warmup_steps = int(state["warmup_steps"])
        if state["anneal_start"] is not None:
            self._anneal_start = int(state["anneal_start"])
            self._anneal_len = int(state["anneal_steps"])
        self._global_step_at_start = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_trainer", "_scheduler", "_carried_state"):
            state[key] = None
        return state
