"""Learning-rate schedules for continual pre-training, as pure functions of the step count.

Paper: Ibrahim, Thérien, Gupta, Richter, Anthony, Lesort, Belilovsky, Rish, "Simple and Scalable
Strategies to Continually Pre-train Large Language Models", TMLR 2024 (arXiv:2403.08763).

Two schedules, each a function of how many optimizer steps have been taken:

- **Re-warming and re-decaying** (:func:`rewarm_lr`): at every new task (dataset) the LR warms up
  linearly to ``max_lr`` again over ``W`` steps and decays (cosine or linear) to ``min_lr`` over
  the rest of the task's ``T`` steps. The clock restarts at every task; :class:`TaskSegment`
  records where each task started and its ``T`` and ``W``.
- **Infinite** (:func:`infinite_lr`): one warm-up, a cooldown from ``max_lr`` to a constant LR,
  the constant LR for ever (no re-warming at task switches), and, whenever a release model is
  wanted, an anneal from the LR of that moment to ``min_lr``.

**Which step gets which LR.** With ``eta(t)`` the schedule written as a function of ``t``, the
number of optimizer steps already taken, step ``n`` (0-based) uses ``eta(n + 1)``. The first
step of a warm-up therefore uses ``max_lr / W`` (never a wasted step at LR 0), step ``W - 1`` is
the first to use ``max_lr``, and the last step of a task of ``T`` steps (``n = T - 1``) uses
exactly ``min_lr``.

The callbacks :class:`~lightning_forget.callbacks.LRRewarming` and
:class:`~lightning_forget.callbacks.InfiniteLRSchedule` apply these functions. No Lightning in
this module.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, Optional, Union

__all__ = [
    "ANNEALS",
    "DECAYS",
    "TaskSegment",
    "infinite_lr",
    "resolve_warmup",
    "rewarm_lr",
    "segment_lr",
    "schedule_lr",
]

Decay = Literal["cosine", "linear"]
Anneal = Literal["cosine", "linear", "exponential"]

#: Shapes of a re-decay or a cooldown.
DECAYS = ("cosine", "linear")
#: Shapes of an anneal.
ANNEALS = ("cosine", "linear", "exponential")
_MODES = ("rewarm", "infinite")


class TaskSegment(NamedTuple):
    """Where one task's re-warmed schedule starts and how long it is.

    Attributes:
        start: the run's optimizer-step count when the task started.
        total_steps: the task's length ``T`` in optimizer steps (``-1`` where the schedule does
            not restart at this task: the infinite schedule after its first task).
        warmup_steps: the task's warm-up length ``W`` (resolved, ``<= T``).
    """

    start: int
    total_steps: int
    warmup_steps: int


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


def _rewarm_eta(t: int, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int, decay: str) -> float:
    """The re-warmed LR after ``t`` steps of a task (``eta(t)`` of :func:`rewarm_lr`)."""
    if warmup_steps > 0 and t <= warmup_steps:
        return max_lr * t / warmup_steps
    if t >= total_steps:
        return min_lr
    return _shape((t - warmup_steps) / (total_steps - warmup_steps), max_lr, min_lr, decay)


def _infinite_eta(
    t: int, max_lr: float, warmup_steps: int, cooldown_steps: int, constant_lr: float, decay: str
) -> float:
    """The infinite schedule's LR after ``t`` steps of the run, before any anneal."""
    if warmup_steps > 0 and t <= warmup_steps:
        return max_lr * t / warmup_steps
    if cooldown_steps > 0 and t < warmup_steps + cooldown_steps:
        return _shape((t - warmup_steps) / cooldown_steps, max_lr, constant_lr, decay)
    return constant_lr


def _check_step(step: int) -> None:
    if step < 0:
        raise ValueError(f"`step` must be >= 0, got {step!r}.")


def rewarm_lr(
    step: int,
    max_lr: float,
    min_lr: float,
    warmup_steps: int,
    total_steps: int,
    decay: Decay = "cosine",
) -> float:
    """The LR of step ``step`` (0-based, counted from the task's start) of a re-warmed task.

    With ``t = step + 1`` steps taken, ``W = min(warmup_steps, T)`` and ``T = total_steps``:

    - ``eta(t) = max_lr * t / W`` for ``t <= W``;
    - ``eta(t) = min_lr + (max_lr - min_lr) * (1 + cos(pi * (t - W) / (T - W))) / 2`` for
      ``W < t <= T`` (``decay="linear"``: a straight line from ``max_lr`` to ``min_lr``);
    - ``eta(t) = min_lr`` for ``t > T``.

    Raises:
        ValueError: on a negative ``step`` or a ``total_steps`` below 1.
    """
    _check_step(step)
    if total_steps is None or total_steps < 1:
        raise ValueError(f"`total_steps` must be a positive int in mode='rewarm', got {total_steps!r}.")
    warmup_steps = min(warmup_steps, total_steps)
    return _rewarm_eta(step + 1, max_lr, min_lr, warmup_steps, total_steps, decay)


def segment_lr(step: int, segment: TaskSegment, max_lr: float, min_lr: float, decay: Decay = "cosine") -> float:
    """:func:`rewarm_lr` for the run's step ``step`` inside the task ``segment`` describes."""
    return rewarm_lr(step - segment.start, max_lr, min_lr, segment.warmup_steps, segment.total_steps, decay)


def infinite_lr(
    step: int,
    max_lr: float,
    min_lr: float,
    warmup_steps: int,
    cooldown_steps: int = 0,
    constant_lr: Optional[float] = None,
    decay: Decay = "cosine",
    anneal: Anneal = "exponential",
    anneal_start: Optional[int] = None,
    anneal_steps: Optional[int] = None,
) -> float:
    """The LR of the run's step ``step`` (0-based, across tasks) under the infinite schedule.

    Warm-up as in :func:`rewarm_lr`, then a cooldown from ``max_lr`` to ``constant_lr`` over
    ``cooldown_steps`` steps (cosine or linear, by ``decay``), then ``constant_lr`` for ever.
    If ``anneal_start`` is given (the number of steps taken when annealing began), every step
    ``n >= anneal_start`` instead uses ``a(n + 1 - anneal_start)``, an anneal from
    ``a(0) = eta(anneal_start)`` (the LR of the last step before it) to ``min_lr`` over
    ``A = anneal_steps`` steps: ``exponential``: ``a(k) = a(0) * (min_lr / a(0)) ** (k / A)``;
    ``cosine`` / ``linear`` as for the decay; ``min_lr`` once ``k >= A``.

    Args:
        constant_lr: the constant LR (default ``(max_lr + min_lr) / 2``).

    Raises:
        ValueError: on a negative ``step``, or ``anneal_start`` without a positive ``anneal_steps``.
    """
    _check_step(step)
    if constant_lr is None:
        constant_lr = 0.5 * (max_lr + min_lr)
    if anneal_start is not None and step >= anneal_start:
        if anneal_steps is None or anneal_steps < 1:
            raise ValueError(f"`anneal_steps` must be a positive int with `anneal_start`, got {anneal_steps!r}.")
        from_lr = _infinite_eta(anneal_start, max_lr, warmup_steps, cooldown_steps, constant_lr, decay)
        k = step + 1 - anneal_start
        if k >= anneal_steps:
            return min_lr
        if anneal == "exponential":
            return from_lr * (min_lr / from_lr) ** (k / anneal_steps)
        return _shape(k / anneal_steps, from_lr, min_lr, anneal)
    return _infinite_eta(step + 1, max_lr, warmup_steps, cooldown_steps, constant_lr, decay)


def schedule_lr(
    step: int,
    max_lr: float,
    min_lr: float = 0.0,
    warmup_steps: int = 0,
    total_steps: Optional[int] = None,
    decay: Decay = "cosine",
    mode: Literal["rewarm", "infinite"] = "rewarm",
    cooldown_steps: int = 0,
    constant_lr: Optional[float] = None,
    anneal: Anneal = "exponential",
    anneal_start: Optional[int] = None,
    anneal_steps: Optional[int] = None,
) -> float:
    """Either schedule by name: :func:`rewarm_lr` (``mode="rewarm"``) or :func:`infinite_lr`.

    One entry point with every argument, kept for code written against the single-callback API;
    new code calls the two functions directly. ``total_steps`` is used by ``"rewarm"`` only;
    ``cooldown_steps``, ``constant_lr``, ``anneal*`` by ``"infinite"`` only.

    Raises:
        ValueError: on an unknown ``mode``, and as the two functions do.
    """
    if mode not in _MODES:
        raise ValueError(f"`mode` must be one of {_MODES}, got {mode!r}.")
    if mode == "rewarm":
        return rewarm_lr(step, max_lr, min_lr, warmup_steps, total_steps, decay)  # type: ignore[arg-type]
    return infinite_lr(
        step, max_lr, min_lr, warmup_steps, cooldown_steps, constant_lr, decay, anneal, anneal_start, anneal_steps
    )
