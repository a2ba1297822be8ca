"""Continual-learning metrics computed from an accuracy matrix (pure torch, no Lightning).

Convention: an accuracy matrix ``R`` is a 2-D float array with ``R[i, j]`` the accuracy on task
``j`` measured after training task ``i`` (rows: training progress, columns: evaluated task). It
is usually square ``(T, T)``; entries that were not measured are ``NaN``. Rows of tasks not yet
trained are all ``NaN``, so "the last measured row" is the task the model has reached.

Every function accepts a :class:`torch.Tensor`, a NumPy array or nested lists (``None`` counts as
not measured), skips unmeasured entries, and returns a Python ``float`` that is ``NaN`` when the
metric is undefined (for example forgetting after a single task). The scale of the accuracies
(fractions or percent) is kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "MatrixLike",
    "as_accuracy_matrix",
    "last_measured_row",
    "average_accuracy",
    "average_incremental_accuracy",
    "forgetting",
    "backward_transfer",
    "forward_transfer",
    "learning_accuracy",
    "bwt",
    "fwt",
]

MatrixLike = Union[Tensor, np.ndarray, Sequence[Sequence[Optional[float]]]]

_NAN = float("nan")


def as_accuracy_matrix(R: MatrixLike) -> Tensor:
    """``R`` as a 2-D ``float64`` CPU tensor (``None`` entries become ``NaN``).

    Args:
        R: accuracy matrix as a tensor, NumPy array or nested lists.

    Raises:
        TypeError: if ``R`` cannot be read as a numeric array.
        ValueError: if ``R`` is not 2-D.
    """
    if isinstance(R, Tensor):
        matrix = R.detach().to(device="cpu", dtype=torch.float64)
    else:
        try:
            matrix = torch.from_numpy(np.array(R, dtype=np.float64))
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"`R` must be a tensor, NumPy array or nested lists of numbers (None for "
                f"unmeasured entries), got {type(R).__name__}: {error}"
            ) from error
    if matrix.ndim != 2:
        raise ValueError(
            f"`R` must be a 2-D accuracy matrix with R[i, j] = accuracy on task j after training "
            f"task i, got shape {tuple(matrix.shape)}. Fix: pass a (T, T) matrix (NaN where not measured)."
        )
    return matrix


def last_measured_row(R: MatrixLike) -> Optional[int]:
    """Index of the last row of ``R`` with at least one measured entry (``None`` if none)."""
    matrix = as_accuracy_matrix(R)
    measured = torch.isfinite(matrix).any(dim=1).nonzero().flatten()
    return int(measured[-1]) if measured.numel() else None


def _finite_mean(values: Tensor) -> float:
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if finite.numel() else _NAN


def _check_row(matrix: Tensor, row: int, name: str) -> None:
    if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < matrix.shape[0]:
        raise ValueError(
            f"`{name}` must be a row index in [0, {matrix.shape[0] - 1}] of the accuracy matrix, "
            f"got {row!r}. Fix: pass the index of a trained task, or None for the last measured row."
        )


def average_accuracy(R: MatrixLike, after_task: Optional[int] = None) -> float:
    """Average accuracy over the tasks seen so far, after training task ``t``.

    ``ACC_t = mean_{j <= t} R[t, j]`` (Chaudhry, Dokania, Ajanthan, Torr, "Riemannian Walk for
    Incremental Learning: Understanding Forgetting and Intransigence", ECCV 2018; the final
    ``ACC`` of Lopez-Paz & Ranzato, NeurIPS 2017).

    Args:
        R: accuracy matrix (see the module docstring).
        after_task: the row ``t``; ``None`` takes the last measured row.

    Returns:
        The mean of the measured entries of ``R[t, :t + 1]``; ``NaN`` if there are none.

    Raises:
        ValueError: if ``after_task`` is not a row of ``R``.
    """
    matrix = as_accuracy_matrix(R)
    if after_task is None:
        after_task = last_measured_row(matrix)
        if after_task is None:
            return _NAN
    _check_row(matrix, after_task, "after_task")
    return _finite_mean(matrix[after_task, : after_task + 1])


def average_incremental_accuracy(R: MatrixLike) -> float:
    """Mean over training steps of the average accuracy after each step.

    ``AIA = mean_{t} ACC_t`` over the measured rows ``t`` (Rebuffi, Kolesnikov, Sperl, Lampert,
    "iCaRL: Incremental Classifier and Representation Learning", CVPR 2017).

    Args:
        R: accuracy matrix (see the module docstring).

    Returns:
        The mean of :func:`average_accuracy` over rows up to the last measured one, skipping
        rows with nothing measured on seen tasks; ``NaN`` if there are none.
    """
    matrix = as_accuracy_matrix(R)
    last = last_measured_row(matrix)
    if last is None:
        return _NAN
    per_row = torch.tensor([average_accuracy(matrix, t) for t in range(last + 1)], dtype=torch.float64)
    return _finite_mean(per_row)


def forgetting(R: MatrixLike) -> float:
    """Average forgetting of earlier tasks at the last measured row.

    Chaudhry et al., "Riemannian Walk for Incremental Learning: Understanding Forgetting and
    Intransigence", ECCV 2018: with ``t`` the last measured row, the forgetting of task
    ``j < t`` is ``f_j = max_{l < t} R[l, j] - R[t, j]`` (best accuracy ever seen on ``j``
    before now, minus accuracy now), and the metric is the mean of ``f_j`` over ``j < t``.

    Args:
        R: accuracy matrix (see the module docstring).

    Returns:
        Mean forgetting over the earlier tasks with a measured current and earlier accuracy;
        ``NaN`` when undefined (one task, or nothing measured).
    """
    matrix = as_accuracy_matrix(R)
    t = last_measured_row(matrix)
    if t is None or t == 0:
        return _NAN
    drops = []
    for j in range(min(t, matrix.shape[1])):
        now = matrix[t, j]
        before = matrix[:t, j]
        before = before[torch.isfinite(before)]
        if torch.isfinite(now) and before.numel():
            drops.append(float(before.max() - now))
    return float(np.mean(drops)) if drops else _NAN


def backward_transfer(R: MatrixLike) -> float:
    """Backward transfer: how training later tasks changed accuracy on earlier ones.

    Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017:
    ``BWT = mean_{j < T-1} (R[T-1, j] - R[j, j])``, with ``T-1`` the last measured row (negative
    values are forgetting).

    Args:
        R: accuracy matrix (see the module docstring).

    Returns:
        BWT over the earlier tasks whose two entries are measured; ``NaN`` when undefined.
    """
    matrix = as_accuracy_matrix(R)
    t = last_measured_row(matrix)
    if t is None:
        return _NAN
    deltas = [
        float(matrix[t, j] - matrix[j, j])
        for j in range(min(t, matrix.shape[1]))
        if torch.isfinite(matrix[t, j]) and torch.isfinite(matrix[j, j])
    ]
    return float(np.mean(deltas)) if deltas else _NAN


def forward_transfer(R: MatrixLike, baseline: Union[Tensor, np.ndarray, Sequence[float], float]) -> float:
    """Forward transfer: accuracy on a task before training it, relative to a baseline.

    Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017:
    ``FWT = mean_{j >= 1} (R[j-1, j] - b[j])``, where ``b[j]`` is the accuracy on task ``j`` of
    a model that never trained (usually the randomly initialised one).

    Args:
        R: accuracy matrix (see the module docstring); needs the entries above the diagonal.
        baseline: ``b``, one value per task (length at least the number of columns of ``R``),
            or one number for all tasks.

    Returns:
        FWT over the tasks whose entries are measured; ``NaN`` when undefined.

    Raises:
        ValueError: if ``baseline`` is shorter than the number of tasks.
    """
    matrix = as_accuracy_matrix(R)
    if isinstance(baseline, Tensor):
        baseline = baseline.detach().cpu().numpy()
    base = torch.from_numpy(np.array(baseline, dtype=np.float64))
    num_tasks = matrix.shape[1]
    if base.ndim == 0:
        base = base.expand(num_tasks)
    base = base.flatten()
    if base.numel() < num_tasks:
        raise ValueError(
            f"`baseline` needs one accuracy per task ({num_tasks}), got {base.numel()} values: "
            f"{base.tolist()}. Fix: pass the untrained model's accuracy on every task (or one number)."
        )
    deltas = [
        float(matrix[j - 1, j] - base[j])
        for j in range(1, min(num_tasks, matrix.shape[0] + 1))
        if torch.isfinite(matrix[j - 1, j]) and math.isfinite(float(base[j]))
    ]
    return float(np.mean(deltas)) if deltas else _NAN


def learning_accuracy(R: MatrixLike) -> float:
    """Mean accuracy on each task right after training it (the diagonal of ``R``).

    Riemer et al., "Learning to Learn without Forgetting by Maximizing Transfer and Minimizing
    Interference", ICLR 2019 (``LA``): it measures plasticity, independently of forgetting.

    Args:
        R: accuracy matrix (see the module docstring).

    Returns:
        The mean of the measured diagonal entries; ``NaN`` if none.
    """
    return _finite_mean(torch.diagonal(as_accuracy_matrix(R)))


bwt = backward_transfer
fwt = forward_transfer
