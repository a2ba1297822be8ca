"""Continual-evaluation metrics of the stability gap, as pure functions over accuracy curves.

Paper: Matthias De Lange, Gido van de Ven, Tinne Tuytelaars, "Continual evaluation for lifelong
learning: Identifying the stability gap", ICLR 2023.

When a model starts training on a new task, its accuracy on earlier tasks often collapses for a
few hundred iterations and then partly recovers (the *stability gap*). Evaluating only at task
ends misses it. *Continual evaluation* measures every task's accuracy every few training
iterations, and these metrics summarise the resulting curves:

- :func:`min_acc` (min-ACC): the worst accuracy each earlier task fell to after it was learned;
- :func:`wc_acc` (WC-ACC): worst-case accuracy, current-task accuracy traded against min-ACC;
- :func:`windowed_forgetting` (WF^w): the largest drop on an earlier task within a short window;
- :func:`windowed_plasticity` (WP^w): the largest gain on a task while it is being trained.

All functions take an :class:`EvalCurves` (or build one with :func:`as_curves`) and evaluate the
metric *now*, i.e. at its last evaluation; slice the curves with :meth:`EvalCurves.upto` to get
the value at an earlier evaluation. Nothing here depends on Lightning.

Conventions (shared by every function):

- ``steps[n]`` is the training iteration (optimizer step count, 1-based: the model after
  ``steps[n]`` updates) of evaluation ``n``; strictly increasing.
- ``acc[n, i]`` is the accuracy on task ``i`` at evaluation ``n``, ``NaN`` where task ``i`` was
  not evaluated (e.g. not seen yet).
- ``task_end_steps[i]`` is the last iteration of task ``i`` (only tasks that have ended are
  listed). An evaluation at ``steps[n] == task_end_steps[i]`` sees the model that has just
  finished task ``i``; it still belongs to task ``i``.
- The *current task* at evaluation ``n`` is ``k = #{i : task_end_steps[i] < steps[n]}``
  (0-based), and the *previous tasks* are ``0 .. k-1``.

Note:
    How the metrics aggregate: min-ACC takes, per task, the minimum over the evaluations made
    while another task is trained, averaged over tasks; WC-ACC is the mean of the current task's
    accuracy and the other tasks' minima; WF^w / WP^w keep, per seen task (the current one
    included), the largest drop / gain between two of its last ``w`` measurements, maximised
    over time and averaged over tasks. The paper reports windows w = 10 and 100. The windowed
    metrics' default ``scope="seen"`` uses that task selection; ``scope="phase"`` is a stricter
    one (see :func:`windowed_forgetting`). :func:`windowed_plasticity` takes the true largest
    gain; ``official=True`` gives the value of the authors' released implementation, which
    under-counts it (see its docstring).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence, Union

import torch
from torch import Tensor

__all__ = [
    "EvalCurves",
    "as_curves",
    "current_task_index",
    "min_acc",
    "wc_acc",
    "update_task_minima",
    "min_acc_from_minima",
    "wc_acc_from",
    "windowed_forgetting",
    "windowed_plasticity",
    "stability_metrics",
]

_ArrayLike = Union[Tensor, Sequence[float], Sequence[Sequence[float]]]


class EvalCurves(NamedTuple):
    """Accuracy curves of a continually evaluated run.

    Attributes:
        steps: ``(N,)`` int64, training iteration of each evaluation (strictly increasing).
        acc: ``(N, T)`` float64, accuracy of each task at each evaluation, ``NaN`` = not evaluated.
        task_end_steps: ``(E,)`` int64, last iteration of each task that has ended (``E <= T``).
    """

    steps: Tensor
    acc: Tensor
    task_end_steps: Tensor

    @property
    def num_evals(self) -> int:
        """Number of evaluations ``N``."""
        return int(self.steps.numel())

    @property
    def num_tasks(self) -> int:
        """Number of task columns ``T``."""
        return int(self.acc.shape[1])

    def upto(self, num_evals: int) -> "EvalCurves":
        """The curves as they were after the first ``num_evals`` evaluations."""
        return EvalCurves(self.steps[:num_evals], self.acc[:num_evals], self.task_end_steps)


def as_curves(
    steps: _ArrayLike, acc: _ArrayLike, task_end_steps: _ArrayLike
) -> EvalCurves:
    """Build and check an :class:`EvalCurves` from tensors or nested sequences.

    Raises:
        ValueError: if shapes disagree, ``steps`` is not strictly increasing, ``acc`` is not 2-D,
            or ``task_end_steps`` is not strictly increasing or lists more tasks than ``acc`` has.
    """
    steps_t = torch.as_tensor(steps, dtype=torch.int64).reshape(-1)
    acc_t = torch.as_tensor(acc, dtype=torch.float64)
    if acc_t.numel() == 0 and acc_t.dim() < 2:
        acc_t = acc_t.reshape(0, 0)
    ends_t = torch.as_tensor(task_end_steps, dtype=torch.int64).reshape(-1)
    if acc_t.dim() != 2:
        raise ValueError(f"`acc` must be a (num_evals, num_tasks) matrix, got shape {tuple(acc_t.shape)}.")
    if acc_t.shape[0] != steps_t.numel():
        raise ValueError(
            f"`acc` has {acc_t.shape[0]} rows but `steps` has {steps_t.numel()} entries; "
            "give one row of task accuracies per evaluation step."
        )
    if steps_t.numel() > 1 and not bool((steps_t[1:] > steps_t[:-1]).all()):
        raise ValueError(f"`steps` must be strictly increasing, got {steps_t.tolist()}.")
    if ends_t.numel() > 1 and not bool((ends_t[1:] > ends_t[:-1]).all()):
        raise ValueError(f"`task_end_steps` must be strictly increasing, got {ends_t.tolist()}.")
    if ends_t.numel() > acc_t.shape[1] and acc_t.shape[0] > 0:
        raise ValueError(
            f"`task_end_steps` lists {ends_t.numel()} ended tasks but `acc` has only "
            f"{acc_t.shape[1]} task columns."
        )
    return EvalCurves(steps_t, acc_t, ends_t)


def _check(curves: EvalCurves) -> EvalCurves:
    if not isinstance(curves, EvalCurves):
        raise TypeError(
            f"Expected an EvalCurves, got {type(curves).__name__}; build one with "
            "`as_curves(steps, acc, task_end_steps)`."
        )
    return curves


def _check_window(window: int) -> None:
    if not isinstance(window, int) or isinstance(window, bool) or window < 2:
        raise ValueError(
            f"`window` must be an int >= 2 (a window of w evaluations holds pairs up to w-1 "
            f"evaluations apart), got {window!r}."
        )


def current_task_index(curves: EvalCurves) -> int:
    """The current task ``k`` at the last evaluation: the number of tasks ended strictly before it.

    Returns -1 when there is no evaluation yet.
    """
    curves = _check(curves)
    if curves.num_evals == 0:
        return -1
    now = int(curves.steps[-1])
    return int((curves.task_end_steps < now).sum())


def _task_min_after_end(curves: EvalCurves, task: int) -> float:
    """min over evaluations n with ``task_end_steps[task] < steps[n] <= now`` of ``acc[n, task]``."""
    after = curves.steps > curves.task_end_steps[task]
    values = curves.acc[after, task]
    values = values[~torch.isnan(values)]
    return float(values.min()) if values.numel() else math.nan


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def update_task_minima(minima: dict[int, float], accuracies: Sequence[float], current_task: int) -> dict[int, float]:
    """Fold one evaluation into the running per-task minima of min-ACC (in place; returns ``minima``).

    ``minima[i]`` is the lowest accuracy task ``i`` has shown in the evaluations after its last
    iteration; this evaluation belongs there for every previous task ``i < current_task`` (the
    current task ``k`` of the evaluation, see :func:`current_task_index`). ``NaN`` accuracies are
    ignored. Keeping these minima lets a callback compute min-ACC at every evaluation in
    ``O(tasks)`` instead of rescanning the whole curves; :func:`min_acc_from_minima` finishes it.
    """
    for task in range(min(current_task, len(accuracies))):
        value = float(accuracies[task])
        previous = minima.get(task, math.nan)
        if math.isnan(previous) or value < previous:  # a NaN value never replaces a measured minimum
            minima[task] = value
    return minima


def min_acc_from_minima(minima: dict[int, float], current_task: int) -> float:
    """min-ACC from the per-task minima (:func:`update_task_minima`): their mean over ``i < current_task``.

    Tasks without a measured minimum are left out of the mean; ``NaN`` when none is left (or
    ``current_task <= 0``: there is no previous task).
    """
    if current_task <= 0:
        return math.nan
    return _nanmean([minima.get(task, math.nan) for task in range(current_task)])


def wc_acc_from(current_acc: float, current_task: int, worst: float) -> float:
    r"""WC-ACC from the current task's accuracy ``a_k`` and min-ACC ``worst``.

    .. math::
        \text{WC-ACC} = \frac{1}{k+1} a_k + \Big(1 - \frac{1}{k+1}\Big)\,\text{min-ACC}

    ``current_task`` is the 0-based ``k``; in the first task (``k == 0``), or when min-ACC
    ``worst`` is undefined (``NaN``), it is the current accuracy.
    """
    if current_task == 0 or math.isnan(worst):
        return float(current_acc)
    return current_acc / (current_task + 1) + (1.0 - 1.0 / (current_task + 1)) * worst


def min_acc(curves: EvalCurves) -> float:
    r"""min-ACC at the last evaluation ``t`` (current task ``k``).

    .. math::
        \text{min-ACC}_{T_k} = \frac{1}{k} \sum_{i<k} \min_{|T_i| < n \le t} A(E_i, f_n)

    (``k`` previous tasks with 0-based indices; the paper writes ``1/(k-1)`` with 1-based ``k``.)
    For each previous task, the minimum runs over the evaluations strictly after its last
    iteration up to now, ignoring ``NaN``; a previous task with no such evaluation is left out of
    the mean.

    Returns:
        The value, or ``NaN`` when there is no previous task (still in the first task) or no
        previous task has been evaluated after it ended.
    """
    curves = _check(curves)
    k = current_task_index(curves)
    minima = {i: _task_min_after_end(curves, i) for i in range(max(k, 0))}
    return min_acc_from_minima(minima, k)


def wc_acc(curves: EvalCurves) -> float:
    r"""WC-ACC (worst-case accuracy) at the last evaluation ``t`` (current task ``k``).

    .. math::
        \text{WC-ACC}_t = \frac{1}{k+1} A(E_k, f_t) + \Big(1 - \frac{1}{k+1}\Big)\,\text{min-ACC}_{T_k}

    with 0-based ``k`` (the paper's ``1/k`` with 1-based ``k``). In the first task it is the
    current accuracy ``A(E_0, f_t)``. If min-ACC is undefined later on (no previous task evaluated
    after its end) the current accuracy is returned as well.

    Returns:
        The value, or ``NaN`` when the current task was not evaluated at the last evaluation.
    """
    curves = _check(curves)
    k = current_task_index(curves)
    if k < 0 or k >= curves.num_tasks:
        return math.nan
    return wc_acc_from(float(curves.acc[-1, k]), k, min_acc(curves) if k > 0 else math.nan)


def _max_windowed_change(values: Tensor, window: int, sign: float) -> float:
    """max over pairs ``n1 < n2 <= n1 + window - 1`` of ``sign * (values[n2] - values[n1])``.

    ``NaN`` entries (evaluations where the task was not measured) are dropped first, so a window
    holds ``window`` consecutive *measurements*. The result is clipped at 0: 0 with one value,
    ``NaN`` with none.
    """
    values = values[~torch.isnan(values)]
    n = values.numel()
    if n == 0:
        return math.nan
    best = 0.0
    for lag in range(1, min(window, n)):
        best = max(best, float((sign * (values[lag:] - values[:-lag])).max()))
    return best


def _official_windowed_gain(values: Tensor, window: int) -> float:
    """WP^w of one task as the authors' released implementation computes it (published numbers).

    Over every window of the last ``window`` measurements (as they arrive), window starts below
    the running maximum of earlier starts are skipped, then the per-window values are maximised
    over time from 0. Skipping is exact for drops but not for gains, so this under-counts.
    """
    values = values[~torch.isnan(values)]
    n = values.numel()
    if n == 0:
        return math.nan
    series = values.tolist()
    best = 0.0
    for end in range(n):
        chunk = series[max(0, end - window + 1) : end + 1]
        running = -math.inf
        for i, start in enumerate(chunk):
            if start < running:
                continue
            running = start
            for later in chunk[i + 1 :]:
                best = max(best, later - start)
    return best


_SCOPES = ("seen", "phase")


def _check_scope(scope: str, name: str = "scope") -> None:
    if scope not in _SCOPES:
        raise ValueError(
            f"`{name}` must be 'seen' (every seen task over its whole measured history) or 'phase' "
            f"(forgetting after a task ended, plasticity while it is trained), got {scope!r}."
        )


def _windowed(curves: EvalCurves, window: int, scope: str, sign: float, official: bool = False) -> float:
    """Mean over tasks of the largest ``sign``-change within ``window`` measurements (see callers)."""
    curves = _check(curves)
    _check_window(window)
    _check_scope(scope)
    k = current_task_index(curves)
    per_task = []
    for i in range(min(k + 1, curves.num_tasks) if k >= 0 else 0):
        if scope == "seen":
            mask = torch.ones_like(curves.steps, dtype=torch.bool)
        elif sign < 0:  # forgetting of a previous task, from its last iteration on
            if i >= k:
                continue
            mask = curves.steps >= curves.task_end_steps[i]
        else:  # plasticity of a task while it is trained
            mask = torch.ones_like(curves.steps, dtype=torch.bool)
            if i > 0:
                mask &= curves.steps > curves.task_end_steps[i - 1]
            if i < curves.task_end_steps.numel():
                mask &= curves.steps <= curves.task_end_steps[i]
        values = curves.acc[mask, i]
        if scope == "phase" and int((~torch.isnan(values)).sum()) < 2:
            continue  # nothing to compare within the phase
        if official:
            per_task.append(_official_windowed_gain(values, window))
        else:
            per_task.append(_max_windowed_change(values, window, sign))
    return _nanmean(per_task)


def windowed_forgetting(curves: EvalCurves, window: int = 10, scope: str = "seen") -> float:
    r"""WF^w: the largest accuracy drop of a task within ``window`` consecutive evaluations.

    For a task ``i`` with measured accuracies ``a_1, a_2, ...`` (in evaluation order),

    .. math::
        F_i^w = \max\Big(0, \max_{n_1 < n_2 \le n_1 + w - 1} a_{n_1} - a_{n_2}\Big),
        \qquad \text{WF}^w = \frac{1}{|\mathcal{I}|} \sum_{i \in \mathcal{I}} F_i^w .

    ``scope="seen"`` (default, the selection behind the paper's numbers): ``I`` is every task
    seen so far *including the current one*, each over all its measurements up to now (a task
    measured once counts as 0). ``scope="phase"`` keeps only previous tasks ``i < k``, measured
    from their last iteration on (the task-end evaluation included, so the drop right after the
    switch is inside the window), and leaves out tasks with fewer than two such measurements.

    Args:
        curves: the curves.
        window: ``w``, the number of consecutive measurements in a window (>= 2); the paper
            reports w = 10 and w = 100. With evaluation every ρ iterations, a window spans
            ``(w - 1)·ρ`` iterations (the paper evaluates every iteration, ρ = 1).
        scope: ``"seen"`` or ``"phase"`` (above).

    Returns:
        The value, or ``NaN`` when no task qualifies.

    Raises:
        ValueError: if ``window`` is not an int >= 2 or ``scope`` is unknown.
    """
    return _windowed(curves, window, scope, sign=-1.0)


def windowed_plasticity(curves: EvalCurves, window: int = 10, scope: str = "seen", official: bool = False) -> float:
    r"""WP^w: the largest accuracy gain of a task within ``window`` consecutive evaluations.

    The same as :func:`windowed_forgetting` with the largest *increase*
    ``a_{n_2} - a_{n_1}``. ``scope="seen"`` (default, as for
    :func:`windowed_forgetting`): every seen task including the current one, over all its
    measurements. ``scope="phase"``: each task ``i <= k`` only while it is trained
    (``task_end_steps[i-1] < steps[n] <= task_end_steps[i]``; the current task up to now), tasks
    with fewer than two such measurements left out.

    Args:
        curves: the curves.
        window: ``w``, the number of consecutive measurements in a window (>= 2).
        scope: ``"seen"`` or ``"phase"``.
        official: compute it as the authors' released implementation does (for comparison
            with published numbers). That implementation skips window starts below the running
            maximum of the window, which is exact for forgetting (a largest drop starts at a
            maximum) but not for plasticity (a largest gain starts at a minimum), so it
            under-counts: on ``[0.5, 0.2, 0.8]`` with ``w = 3`` it gives 0.3 where the largest
            gain is 0.6. The default (``False``) takes the true maximum.

    Returns:
        The value, or ``NaN`` when no task qualifies.

    Raises:
        ValueError: if ``window`` is not an int >= 2 or ``scope`` is unknown.
    """
    return _windowed(curves, window, scope, sign=1.0, official=official)


def stability_metrics(curves: EvalCurves, window: int = 10, scope: str = "seen") -> dict[str, float]:
    """All four metrics at the last evaluation: ``min_acc``, ``wc_acc``, ``wf``, ``wp``."""
    return {
        "min_acc": min_acc(curves),
        "wc_acc": wc_acc(curves),
        "wf": windowed_forgetting(curves, window, scope),
        "wp": windowed_plasticity(curves, window, scope),
    }
