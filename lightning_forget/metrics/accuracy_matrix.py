"""``AccuracyMatrix``: the continual-learning accuracy matrix as a DDP-synced torchmetric."""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric

from lightning_forget.distributed import unshare_memory

__all__ = ["AccuracyMatrix"]


def _task_index(value: Union[int, Tensor], name: str, num_tasks: int) -> int:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"`{name}` must be one task index, got a tensor of shape {tuple(value.shape)}.")
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < num_tasks:
        raise ValueError(
            f"`{name}` must be a task index in [0, {num_tasks - 1}], got {value!r}. Fix: pass the "
            f"0-based task index, or build AccuracyMatrix(num_tasks=...) with more tasks."
        )
    return value


def _process_group_rank(group: Any) -> int:
    """This process's rank in ``group`` (the default group when ``None``); 0 outside DDP."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return int(dist.get_rank(group)) if group is not None else int(dist.get_rank())


class AccuracyMatrix(Metric):
    """Accuracy on every task after training every task: ``R[i, j]``, synced across processes.

    The accuracy matrix is the raw material of the continual-learning metrics (average
    accuracy, forgetting, backward/forward transfer; Lopez-Paz & Ranzato, "Gradient Episodic
    Memory for Continual Learning", NeurIPS 2017; Chaudhry et al., "Riemannian Walk for
    Incremental Learning", ECCV 2018). Row ``i`` is filled while the model that has just
    trained task ``i`` is evaluated; column ``j`` is the task the evaluated batch belongs to.

    Mechanism: two ``(T, T)`` counters, ``correct`` and ``total``, accumulate per
    ``(train_task, eval_task)`` cell. They are summed across processes (``dist_reduce_fx="sum"``),
    so :meth:`compute` gives the global accuracy of each cell under DDP, and they are persistent
    buffers, so the matrix is saved in checkpoints and survives a resume. Call
    :meth:`reset_row` at the start of each validation epoch (not :meth:`reset`, which would drop
    earlier rows) so that a task's row reflects its latest evaluation. The maths on the
    resulting matrix lives in :mod:`lightning_forget.metrics.functional`.

    Example::

        self.acc_matrix = AccuracyMatrix(num_tasks=5)
        # on_validation_epoch_start:
        self.acc_matrix.reset_row(task)
        # validation_step(batch, batch_idx, dataloader_idx):
        self.acc_matrix.update(logits, y, train_task=task, eval_task=dataloader_idx)
        # on_validation_epoch_end:
        R = self.acc_matrix.compute()          # (T, T), NaN where nothing was measured

    Args:
        num_tasks: number of tasks ``T`` in the stream.
        **kwargs: passed to :class:`torchmetrics.Metric` (``sync_on_compute``,
            ``process_group``, ...).

    Raises:
        ValueError: if ``num_tasks`` is not a positive int.

    Note:
        Saved state (``state_dict``, persistent): ``correct`` and ``total``, both ``(T, T)``
        ``int64`` counts. Under DDP they are the *global* counts as of the last synced
        :meth:`compute` (plus this rank's counts since then), so rank 0's checkpoint holds the
        whole matrix; when such a state is loaded in a process group, ranks other than 0 start
        from zero counts, so that the synced sums are the checkpoint's again.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: Tensor
    total: Tensor

    def __init__(self, num_tasks: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(
                f"`num_tasks` must be a positive int (the number of tasks in the stream), got {num_tasks!r}."
            )
        self.num_tasks = num_tasks
        zeros = torch.zeros(num_tasks, num_tasks, dtype=torch.long)
        self.add_state("correct", default=zeros.clone(), dist_reduce_fx="sum", persistent=True)
        self.add_state("total", default=zeros.clone(), dist_reduce_fx="sum", persistent=True)
        # Global minus local counts at the last synced compute(): added to the local counts in
        # state_dict(), so that rank 0's checkpoint holds the synced sums (None: not synced).
        self._sync_offset: Optional[dict[str, Tensor]] = None

    def update(
        self, preds: Tensor, target: Tensor, train_task: Union[int, Tensor], eval_task: Union[int, Tensor]
    ) -> None:
        """Count the correct predictions of one batch of ``eval_task`` after training ``train_task``.

        Args:
            preds: logits or probabilities ``(N, C, ...)`` (the class is the argmax over dim 1),
                or predicted labels with the shape of ``target``.
            target: true labels ``(N, ...)``.
            train_task: the row: the last task the model was trained on.
            eval_task: the column: the task this batch belongs to.

        Raises:
            ValueError: if a task index is out of range or the shapes do not match.
        """
        row = _task_index(train_task, "train_task", self.num_tasks)
        col = _task_index(eval_task, "eval_task", self.num_tasks)
        if preds.ndim == target.ndim + 1:
            preds = preds.argmax(dim=1)
        if preds.shape != target.shape:
            raise ValueError(
                f"`preds` must be logits of shape (N, C, ...) or labels shaped like `target` "
                f"{tuple(target.shape)}, got shape {tuple(preds.shape)}."
            )
        self.correct[row, col] += (preds == target).sum().to(self.correct.dtype)
        self.total[row, col] += target.numel()

    def compute(self) -> Tensor:
        """The ``(T, T)`` float accuracy matrix, ``NaN`` where nothing was counted."""
        if self._is_synced and self._cache is not None:
            # Inside torchmetrics' sync context: the states are the global sums and the cache
            # holds this rank's own counts, which are restored afterwards.
            self._sync_offset = {
                name: getattr(self, name).detach().clone() - self._cache[name].to(getattr(self, name).device)
                for name in ("correct", "total")
            }
        total = self.total.to(torch.float32)
        accuracy = self.correct.to(torch.float32) / total.clamp_min(1)
        return torch.where(self.total > 0, accuracy, torch.full_like(accuracy, float("nan")))

    def _wrap_compute(self, compute: Callable) -> Callable:
        wrapped = super()._wrap_compute(compute)

        @functools.wraps(compute)
        def keep_square(*args: Any, **kwargs: Any) -> Any:
            # torchmetrics squeezes a one-element result to a 0-dim tensor; with one task the
            # matrix must still be (1, 1) so that R[i, j] indexing works.
            return wrapped(*args, **kwargs).reshape(self.num_tasks, self.num_tasks)

        return keep_square

    def state_dict(self, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> dict[str, Any]:
        state = super().state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        if self._sync_offset is not None:
            for name, offset in self._sync_offset.items():
                if prefix + name in state:
                    state[prefix + name] = state[prefix + name] + offset.to(state[prefix + name].device)
        return state

    def reset(self) -> None:
        super().reset()
        self._sync_offset = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Unpickled in a ddp_spawn worker, the counters arrive in shared memory, one storage for
        # every rank; each rank must count into its own copy or the synced sums are wrong.
        unshare_memory(self)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._sync_offset = None
        if _process_group_rank(self.process_group) > 0:
            # The checkpoint holds the global counts (see state_dict): keep them on one rank only,
            # or the synced sums would count them once per rank.
            self.correct = torch.zeros_like(self.correct)
            self.total = torch.zeros_like(self.total)
        if int(self.total.sum()) > 0:
            # Restored counts are data: compute() after a resume should not warn "before update".
            self._update_count = max(self._update_count, 1)
            self._computed = None

    def reset_row(self, train_task: Union[int, Tensor]) -> None:
        """Zero row ``train_task`` of both counters (before re-evaluating after that task).

        Args:
            train_task: the row to clear.

        Raises:
            ValueError: if ``train_task`` is out of range.
        """
        row = _task_index(train_task, "train_task", self.num_tasks)
        self.correct[row].zero_()
        self.total[row].zero_()
        if self._sync_offset is not None:
            for offset in self._sync_offset.values():
                offset[row].zero_()
        self._computed = None  # drop the cached compute() result
