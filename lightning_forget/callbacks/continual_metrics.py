"""``ContinualMetrics``: build the accuracy matrix from logged validation accuracies and report it."""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_forget.tasks import DDP_STRATEGIES, SHARDED_STRATEGIES
from lightning_forget import reporting
from lightning_forget.metrics.functional import last_measured_row
from lightning_forget.tasks import ContinualCallback, task_schedule

try:  # Python 3.12+
    from typing import override
except ImportError:  # pragma: no cover
    from typing_extensions import override

__all__ = ["ContinualMetrics"]

_DATALOADER_SUFFIX = "/dataloader_idx_"
#: The keys the default ``key=None`` looks for, in this order (the first that is logged wins):
#: the library's per-task template, then Lightning's automatic form of one ``val_acc`` logged from
#: every validation dataloader (``val_acc/dataloader_idx_{t}``, or a bare ``val_acc`` with one loader).
DEFAULT_KEYS = ("val/acc/task_{task}", "val_acc")
#: Logged keys, with the functional metric each one holds.
LOGGED_KEYS = {"cl/acc_avg": "average_accuracy", "cl/forgetting": "forgetting", "cl/bwt": "bwt"}


def _key_pattern(key: str) -> tuple[re.Pattern[str], bool]:
    """Regex matching the logged keys of ``key`` (task in group 1) and whether it is a template.

    Raises:
        ValueError: if ``key`` is not a valid template with at most one bare ``{task}`` field.
    """
    try:
        parts = list(string.Formatter().parse(key))
    except ValueError as error:
        raise ValueError(
            f"`key`={key!r} is not a valid format template ({error}). Fix: e.g. key='val/acc/task_{{task}}'."
        ) from error
    fields = [(field, spec, conversion) for _, field, spec, conversion in parts if field is not None]
    if not fields:
        # Lightning's multi-dataloader form: "<key>/dataloader_idx_<task>".
        return re.compile(re.escape(key) + re.escape(_DATALOADER_SUFFIX) + r"(\d+)$"), False
    if fields != [("task", "", None)]:
        raise ValueError(
            f"`key`={key!r} must contain exactly one '{{task}}' field (no other field, format spec or "
            "conversion). Fix: e.g. key='val/acc/task_{task}', or a plain name such as 'val_acc' "
            "logged from one dataloader per task."
        )
    pattern = "".join(re.escape(literal) + (r"(\d+)" if field is not None else "") for literal, field, _, _ in parts)
    # Lightning appends "/dataloader_idx_<k>" to keys logged from several loaders unless
    # `add_dataloader_idx=False`; the task in the template wins.
    return re.compile(pattern + "(?:" + re.escape(_DATALOADER_SUFFIX) + r"\d+)?$"), True


class ContinualMetrics(ContinualCallback):
    """Fill the accuracy matrix at every task end, log forgetting/BWT, and report at the end.

    The accuracy matrix ``R[i, j]`` (accuracy on task ``j`` after training task ``i``) and the
    metrics computed from it are the standard way to report a continual run: average accuracy
    and backward transfer (Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual
    Learning", NeurIPS 2017), forgetting (Chaudhry et al., "Riemannian Walk for Incremental
    Learning: Understanding Forgetting and Intransigence", ECCV 2018).

    Mechanism: this callback computes nothing itself. It works with any LightningModule that logs
    its validation accuracy per task, under a key formatted with the task index
    (``self.log(f"val/acc/task_{t}", acc)``), or under one name logged from every validation
    dataloader, which Lightning suffixes with ``/dataloader_idx_{t}`` (``self.log("val_acc", acc)``
    in a ``validation_step(self, batch, batch_idx, dataloader_idx=0)``; a bare ``val_acc`` from a
    single dataloader counts as task 0). The default ``key=None`` finds either, in that order
    (:data:`DEFAULT_KEYS`); pass ``key`` for any other name. After each task's end (in the report
    phase of :class:`~lightning_forget.tasks.ContinualCallback`: at the validation that follows
    every callback's end-of-task work, so the row measures the model the task leaves behind) it
    reads ``trainer.callback_metrics``, writes row ``task`` of the matrix
    (columns: every task found in the keys; the matrix grows when the number of tasks is not
    known, as with one ``fit`` per task), and logs the summary metrics. At the end of the stream
    (the last task of a :class:`~lightning_forget.datamodules.ContinualDataModule`; every task end
    in one-fit-per-task mode, since any fit may be the last; or ``on_fit_end`` when the run
    stopped early) rank 0 prints a rich table and writes the report files. A template key also
    matches when Lightning appended ``/dataloader_idx_{k}`` (``add_dataloader_idx=True``). A task
    that ends without a validation since it started gets no row (and a warning), since the
    logged values would be those of an earlier task.

    Under DDP the row read on rank 0 is broadcast, so the matrix is identical on every rank; log
    the accuracies with ``sync_dist=True`` (or as a torchmetric such as
    :class:`~lightning_forget.metrics.AccuracyMatrix`) so that they are global, not rank 0's.

    Args:
        key: the logged accuracy: a template with a ``{task}`` field such as
            ``"val/acc/task_{task}"``, or a plain name logged from one dataloader per task such as
            ``"val_acc"``. ``None`` (default): the first of :data:`DEFAULT_KEYS` that is logged.
        report: print the table and write the files at the end of the stream.
        log_dir: where to write the files; defaults to the run's results folder
            (:func:`lightning_forget.reporting.results_dir`: the logger's version directory,
            else the Trainer's ``default_root_dir``).
        filename_prefix: prepended to the file names (for several instances in one directory).

    Raises:
        TypeError: if an argument has the wrong type, or ``key`` is empty.
        ValueError: if ``key`` has template fields other than one bare ``{task}``.

    Note:
        Logged keys: ``cl/acc_avg`` (average accuracy on the tasks seen), ``cl/forgetting``,
        ``cl/bwt``; metrics that are undefined (forgetting after one task) are not logged. They are
        logged with ``pl_module.log`` where Lightning allows it, else (at validation end, train
        end) straight to ``trainer.loggers`` and into ``trainer.callback_metrics``
        (:meth:`~lightning_forget.tasks.ContinualCallback.log_task_metrics`).

        Warnings: once per run when no logged key matches (naming the keys looked for and the
        keys logged; those tasks get no row), and for each task that ended without a validation.

        Files (in ``log_dir``, with ``filename_prefix``): ``metrics.json``,
        ``accuracy_matrix.csv``, ``accuracy_matrix.png`` (see
        :func:`lightning_forget.reporting.write_report`); the heatmap also goes, tagged
        ``cl/accuracy_matrix``, to every logger that takes images
        (:func:`lightning_forget.reporting.log_figure`).

        Saved state: ``matrix`` (the ``(T, T)`` float64 CPU tensor, NaN where not measured),
        ``reported`` (last row reported), and the task counters of
        :class:`~lightning_forget.tasks.ContinualCallback` (``task``, ``started``, ``ended``,
        ``version``).
    """

    #: Tested single-process and under DDP; sharded strategies are refused in ``setup``.
    supported_strategies: tuple[str, ...] = DDP_STRATEGIES + SHARDED_STRATEGIES
    #: Constructor arguments whose change a resume refuses (see ContinualCallback.state_arguments).
    state_arguments: tuple[str, ...] = ()
    #: Whether the task end edits weights (then it runs inside tasks.atomic_edit).
    task_end_edits_weights = False

    def __init__(
        self,
        key: Optional[str] = None,
        report: bool = True,
        log_dir: Optional[str] = None,
        filename_prefix: str = "",
    ) -> None:
        super().__init__()
        if key is not None and (not isinstance(key, str) or not key):
            raise TypeError(
                f"`key` must be a non-empty str such as 'val/acc/task_{{task}}' or 'val_acc', or None (find "
                f"{' or '.join(DEFAULT_KEYS)}), got {key!r}."
            )
        candidates = DEFAULT_KEYS if key is None else (key,)
        patterns = [(name, *_key_pattern(name)) for name in candidates]
        if not isinstance(report, bool):
            raise TypeError(f"`report` must be a bool, got {report!r}.")
        if log_dir is not None and not isinstance(log_dir, (str, Path)):
            raise TypeError(f"`log_dir` must be a path string or None (use the trainer's log dir), got {log_dir!r}.")
        if not isinstance(filename_prefix, str):
            raise TypeError(f"`filename_prefix` must be a str, got {filename_prefix!r}.")
        self.key = key
        self.report = report
        self.log_dir = None if log_dir is None else str(log_dir)
        self.filename_prefix = filename_prefix
        self._patterns = patterns
        #: The key whose values filled the last row (one of :data:`DEFAULT_KEYS` when ``key=None``).
        self.matched_key: Optional[str] = None
        self._matrix: Tensor = torch.empty(0, 0, dtype=torch.float64)
        self._reported: int = -1
        self._validated: Optional[bool] = None  # None: unknown (e.g. after a resume)
        self._validated_before_end = False
        self._pending: dict[int, float] = {}  # the current task's latest validation row
        self._warned_no_key = False

    # ------------------------------------------------------------------ public views
    @property
    def state_key(self) -> str:
        # `key=None` keeps the state key of the former default, so older checkpoints still resume.
        return self._generate_state_key(key=DEFAULT_KEYS[0] if self.key is None else self.key)

    @property
    def matrix(self) -> Tensor:
        """The accuracy matrix so far: ``(T, T)`` float64, NaN where not measured."""
        return self._matrix.clone()

    @property
    def summary(self) -> dict[str, Any]:
        """:func:`lightning_forget.reporting.summarize` of :attr:`matrix` (``None`` when undefined)."""
        return reporting.summarize(self._matrix)

    # ------------------------------------------------------------------ reading the logs
    @property
    def looked_for(self) -> list[str]:
        """The logged names this callback reads, in order (``{t}``: the task index)."""
        names = []
        for name, _, is_template in self._patterns:
            if is_template:
                names.append(name.replace("{task}", "{t}"))
            else:
                names += [f"{name}{_DATALOADER_SUFFIX}{{t}}", name]
        return names

    def read_accuracies(self, metrics: dict[str, Any]) -> dict[int, float]:
        """The per-task accuracies in ``metrics`` (``{task: value}``) under the first matching key.

        Also sets :attr:`matched_key` (``None`` when nothing matched).
        """
        for key, pattern, is_template in self._patterns:
            found: dict[int, float] = {}
            for name, value in metrics.items():
                match = pattern.match(name)
                if match is not None:
                    found[int(match.group(1))] = float(value)
            if not found and not is_template and key in metrics:
                found[0] = float(metrics[key])  # one dataloader: Lightning adds no suffix
            if found:
                self.matched_key = key
                return found
        self.matched_key = None
        return {}

    def _grow(self, size: int) -> None:
        old = self._matrix.shape[0]
        if size > old:
            grown = torch.full((size, size), float("nan"), dtype=torch.float64)
            grown[:old, :old] = self._matrix
            self._matrix = grown

    # ------------------------------------------------------------------ hooks
    @override
    def on_task_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        super().on_task_start(trainer, pl_module, task)
        self._validated = False
        self._pending = {}

    @override
    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not trainer.sanity_checking:
            # Read the task's row at every validation, where the epoch's logged values are final,
            # and keep it in the state (`callback_metrics` is empty after a resume). Rank 0's
            # reading decides, so that the state is the same on all ranks.
            self._pending = trainer.strategy.broadcast(self.read_accuracies(dict(trainer.callback_metrics)), src=0)
            self._validated = True
        # Then the report phase: a task that ended before this validation gets its row from it,
        # measured after every callback's task-end edits.
        super().on_validation_end(trainer, pl_module)

    @override
    def on_task_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        super().on_task_end(trainer, pl_module, task)
        # Values read before the task ended predate its end-of-task edits (FPF, merges, scaling):
        # the row waits for the validation that follows.
        self._validated_before_end = bool(self._validated)
        self._validated = False

    @override
    def on_task_report(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        super().on_task_report(trainer, pl_module, task)
        if self._validated is False and not self._validated_before_end:
            rank_zero_warn(
                f"ContinualMetrics: no validation ran during task {task}, so its row of the accuracy "
                "matrix is left empty (the logged values would be stale). Fix: validate at least at "
                "the last epoch of each task (`check_val_every_n_epoch`, `limit_val_batches`)."
            )
            return
        if self._validated is False:
            rank_zero_warn(
                f"ContinualMetrics: no validation ran after task {task} ended, so its row is the validation "
                "before the task's end-of-task work (fine-tuning, merges, scaling). Fix: validate at the last "
                "epoch of each task (`check_val_every_n_epoch=1`)."
            )
        accuracies = dict(self._pending)
        if not accuracies:
            if self._warned_no_key:
                return  # said once: the same missing key at every task end is noise
            self._warned_no_key = True
            rank_zero_warn(
                f"ContinualMetrics: no logged metric matches key={self.key!r} at the end of task {task}: "
                f"looked for {', '.join(self.looked_for)}; the logged keys are "
                f"{sorted(trainer.callback_metrics)}. Fix: "
                "log each task's accuracy as self.log(f'val/acc/task_{t}', acc), or self.log('val_acc', acc) "
                "in validation_step(self, batch, batch_idx, dataloader_idx=0), or pass `key=` naming yours. "
                "(Said once; every task without a match gets no row.)"
            )
            return
        datamodule = task_schedule(trainer)
        known_tasks = int(datamodule.num_tasks) if datamodule is not None else 0
        self._grow(max(known_tasks, task + 1, max(accuracies) + 1))
        self._matrix[task] = float("nan")
        for column, value in accuracies.items():
            self._matrix[task, column] = value
        summary = self.summary
        self.log_task_metrics(
            trainer, pl_module, {name: summary[field] for name, field in LOGGED_KEYS.items() if summary[field] is not None}
        )
        stream_over = datamodule is None or task >= int(datamodule.num_tasks) - 1
        if stream_over:
            self._write(trainer)

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_fit_end(trainer, pl_module)
        # A run stopped before its last task (or a fixed-task datamodule) still gets its report.
        last = last_measured_row(self._matrix)
        if last is not None and last != self._reported:
            self._write(trainer)

    # ------------------------------------------------------------------ outputs
    def _report_paths(self, directory: str) -> dict[str, Any]:
        names = {kind: f"{self.filename_prefix}{name}" for kind, name in reporting.REPORT_FILES.items()}
        return reporting.output_paths(self, directory, names)

    def _directory(self, trainer: "pl.Trainer") -> str:
        """Where the report files go (read on every rank: ``trainer.log_dir`` broadcasts)."""
        return reporting.results_dir(trainer, self.log_dir)

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.report:
            # Fail now, not after the whole run, when the report could not be written.
            directory = self._directory(trainer)
            if trainer.is_global_zero:
                reporting.ensure_writable_dir(
                    directory, "ContinualMetrics", "metrics.json, accuracy_matrix.csv and accuracy_matrix.png",
                    "pass a writable `log_dir`, or `report=False`",
                )
                self._report_paths(directory)  # chosen now: never over another run's files

    def _write(self, trainer: "pl.Trainer") -> None:
        measured = last_measured_row(self._matrix)  # None: every accuracy so far is NaN
        last = len(self._matrix) - 1 if measured is None else measured
        self._reported = last
        if measured is None:
            rank_zero_warn(
                f"ContinualMetrics: every accuracy logged under key={self.key!r} so far is NaN; the report "
                "shows an empty matrix. Fix: check the logged validation accuracies (an empty validation "
                "set or a diverged model gives NaN)."
            )
        if not self.report:
            return
        directory = self._directory(trainer)
        if not trainer.is_global_zero:
            return
        summary = self.summary
        reporting.print_report(self._matrix, summary, title=f"Accuracy matrix after task {last}")
        paths = reporting.write_report(
            directory,
            self._matrix,
            summary,
            extra={"key": self.matched_key or self.key, "global_step": trainer.global_step, "epoch": trainer.current_epoch},
            prefix=self.filename_prefix,
            title=f"Accuracy matrix after task {last}",
            paths=self._report_paths(directory),
        )
        reporting.log_figure(
            trainer, lambda: reporting.accuracy_heatmap(self._matrix, summary, f"Accuracy matrix after task {last}"),
            "cl/accuracy_matrix",
        )
        reporting.announce_results(trainer, "ContinualMetrics", paths)

    # ------------------------------------------------------------------ state
    @override
    def method_state(self) -> dict[str, Any]:
        return {
            "matrix": self._matrix.clone(),
            "reported": self._reported,
            "pending": {int(k): float(v) for k, v in self._pending.items()},
        }

    @override
    def load_method_state(self, state: dict[str, Any]) -> None:
        self._matrix = torch.as_tensor(state["matrix"], dtype=torch.float64).cpu().clone()
        self._reported = int(state["reported"])
        self._pending = {int(k): float(v) for k, v in state["pending"].items()}
        self._validated = None
