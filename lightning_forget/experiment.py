"""One call that runs a method over a stream and returns its accuracy matrix (demos, benchmarks).

This is a convenience over an ordinary ``Trainer.fit``: the callbacks are the library's own,
nothing here is needed to use them in an existing training script.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_forget.callbacks.continual_metrics import ContinualMetrics
from lightning_forget.datamodules.base import ContinualDataModule
from lightning_forget.reporting import summarize

__all__ = ["RunResult", "run_continual"]


@dataclass
class RunResult:
    """What one continual run produced."""

    name: str
    matrix: torch.Tensor
    summary: dict[str, Any]
    train_seconds: float
    peak_rss_mb: float
    rss_after_task_mb: list[float] = field(default_factory=list)  # resident memory at task ends


class _TaskMemory(Callback):
    """Resident memory of the process at each task end (MB)."""

    def __init__(self) -> None:
        self.after_task: list[float] = []

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        datamodule = trainer.datamodule
        if isinstance(datamodule, ContinualDataModule) and datamodule.is_last_epoch_of_task(trainer.current_epoch):
            self.after_task.append(current_rss_mb())


#: ``callback_metrics`` keys that carry a run's results out of spawned worker processes.
_MATRIX_KEY = "lightning_forget/run_continual/matrix"
_RSS_AFTER_TASK_KEY = "lightning_forget/run_continual/rss_after_task_mb"
_PEAK_RSS_KEY = "lightning_forget/run_continual/peak_rss_mb"


class _HandBack(Callback):
    """Put the run's results into ``trainer.callback_metrics`` at the end of the fit.

    Under ``ddp_spawn``/``ddp_fork``/``ddp_notebook`` the whole fit runs in worker processes:
    the callback objects of the calling process never see the accuracy matrix. Lightning sends
    rank 0's ``trainer.callback_metrics`` back to the calling process after the fit (its public
    result channel), so :func:`run_continual` reads the results from there, in every strategy.
    """

    def __init__(self, metrics: ContinualMetrics, memory: _TaskMemory) -> None:
        self.metrics = metrics
        self.memory = memory

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        trainer.callback_metrics[_MATRIX_KEY] = self.metrics.matrix
        trainer.callback_metrics[_RSS_AFTER_TASK_KEY] = torch.tensor(self.memory.after_task, dtype=torch.float64)
        trainer.callback_metrics[_PEAK_RSS_KEY] = torch.tensor(_peak_rss_mb(), dtype=torch.float64)


def _handed_back(trainer: "pl.Trainer") -> tuple[torch.Tensor, list[float], float]:
    """The matrix, RSS after each task and peak RSS from :class:`_HandBack` (keys removed)."""
    results = trainer.callback_metrics
    missing = [key for key in (_MATRIX_KEY, _RSS_AFTER_TASK_KEY, _PEAK_RSS_KEY) if key not in results]
    if missing:
        raise RuntimeError(
            f"run_continual: the fit ended without handing back its results ({missing} missing from "
            f"trainer.callback_metrics; strategy {type(trainer.strategy).__name__}): it stopped before "
            "`on_fit_end`, or `make_trainer` dropped the callbacks it was given. Fix: pass `callbacks` on "
            "to the Trainer in `make_trainer`; if the strategy is the cause, use strategy='ddp' (in a "
            "script guarded by `if __name__ == '__main__':`) or a single device."
        )
    matrix = results.pop(_MATRIX_KEY).to("cpu", torch.float64)
    after_task = results.pop(_RSS_AFTER_TASK_KEY).tolist()
    peak = float(results.pop(_PEAK_RSS_KEY))
    return matrix, after_task, peak


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    """The process's resident memory now (Linux ``/proc``; the peak elsewhere), in MB."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return pages * resource.getpagesize() / 2**20
    except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
        return _peak_rss_mb()


def run_continual(
    name: str,
    datamodule: ContinualDataModule,
    model: "pl.LightningModule",
    callbacks: Sequence[Callback] = (),
    seed: int = 0,
    progress_bar: bool = True,
    report: bool = False,
    default_root_dir: Optional[str] = None,
    trainer_kwargs: Optional[dict[str, Any]] = None,
    make_trainer: Callable[..., pl.Trainer] = pl.Trainer,
) -> RunResult:
    """Train ``model`` on every task of ``datamodule`` with ``callbacks`` in one ``fit``.

    Args:
        name: a label for the result.
        datamodule: the stream (its ``max_epochs`` sets the Trainer's).
        model: a module that logs ``val/acc/task_{t}`` (e.g. ``ContinualClassifier``).
        callbacks: the method's callbacks.
        seed: passed to ``seed_everything`` before training.
        progress_bar: show Lightning's progress bar.
        report: print the rich table and write the report files at the end.
        default_root_dir: where logs go (``None``: Lightning's default).
        trainer_kwargs: any other ``Trainer`` arguments.
        make_trainer: the Trainer class (tests pass a quiet one).

    Returns:
        The accuracy matrix, its summary and the cost of the run. Every strategy works,
        including ``ddp_spawn``/``ddp_fork``, whose fit runs in worker processes: the results are
        rank 0's, handed back through ``trainer.callback_metrics``; memory figures are then rank
        0's worker's (the peak is the larger of the worker's and this process's).
    """
    pl.seed_everything(seed, verbose=False)
    metrics = ContinualMetrics(report=report)
    memory = _TaskMemory()
    kwargs: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": datamodule.max_epochs,
        "reload_dataloaders_every_n_epochs": 1,
        "enable_progress_bar": progress_bar,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "logger": report,
        "enable_checkpointing": False,
    }
    if default_root_dir is not None:
        kwargs["default_root_dir"] = default_root_dir
    kwargs.update(trainer_kwargs or {})
    trainer = make_trainer(callbacks=[*callbacks, metrics, memory, _HandBack(metrics, memory)], **kwargs)
    start = time.perf_counter()
    trainer.fit(model, datamodule)
    seconds = time.perf_counter() - start
    matrix, after_task, peak = _handed_back(trainer)
    return RunResult(
        name=name,
        matrix=matrix,
        summary=summarize(matrix),
        train_seconds=seconds,
        peak_rss_mb=max(peak, _peak_rss_mb()),
        rss_after_task_mb=after_task,
    )
