"""``ContinualEvaluation``: evaluate every seen task every few training steps (the stability gap).

Paper: Matthias De Lange, Gido van de Ven, Tinne Tuytelaars, "Continual evaluation for lifelong
learning: Identifying the stability gap", ICLR 2023.
"""

from __future__ import annotations

import math
import os
import random
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate

from lightning_forget.sharding import is_sharded
from lightning_forget.tasks import DDP_STRATEGIES, SHARDED_STRATEGIES
from lightning_forget import reporting
from lightning_forget.metrics.stability import (
    EvalCurves,
    _check_scope,
    _check_window,
    as_curves,
    min_acc,
    min_acc_from_minima,
    update_task_minima,
    wc_acc,
    wc_acc_from,
    windowed_forgetting,
    windowed_plasticity,
)
from lightning_forget.forward import ModelForward
from lightning_forget.precision import forward_context
from lightning_forget.tasks import ContinualCallback, task_schedule

try:  # Python 3.12+
    from typing import override
except ImportError:  # pragma: no cover
    from typing_extensions import override

__all__ = ["ContinualEvaluation"]

_SEED_STRIDE = 1_000_003


def _positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        extra = " (or None)" if allow_none else ""
        raise ValueError(f"`{name}` must be a positive int{extra}, got {value!r}.")


class ContinualEvaluation(ContinualCallback):
    """Evaluate every task seen so far every ``every_n_steps`` training steps.

    Paper: De Lange, van de Ven, Tuytelaars, "Continual evaluation for lifelong learning:
    Identifying the stability gap", ICLR 2023.

    Mechanism: end-of-task evaluation hides the *stability gap*, the sharp, transient drop of
    earlier tasks' accuracy in the first iterations on a new task. This callback evaluates, after
    every ``every_n_steps``-th optimizer step (``on_train_batch_end``) and once more at the end of
    each task, the accuracy (``pl_module(x).argmax(-1)``, see :meth:`predict`) on a fixed seeded
    subsample of ``samples_per_task`` validation examples of each task seen so far. From the
    curves it computes min-ACC, WC-ACC, windowed forgetting WF^w and windowed plasticity WP^w
    (:mod:`lightning_forget.metrics.stability`; min-ACC from running per-task minima, so each
    evaluation costs ``O(tasks)``), and at the end of the fit writes ``continual_eval.csv`` and
    ``stability_gap.png`` and logs the figure.

    Where the evaluation data comes from:

    - **One fit over a** :class:`~lightning_forget.datamodules.ContinualDataModule`: task ``t``'s
      data is ``trainer.datamodule.val_dataset(t)``; only the subsample indices are kept.
    - **One fit per task**: the current task's data is the fit's validation set
      (``trainer.val_dataloaders``, set up by the sanity check that Lightning runs before
      training by default; else the datamodule's or module's ``val_dataloader()``; with several
      loaders, the one at the task's index). Loaders passed to ``trainer.fit`` are only reachable
      once validation has set them up, so with ``num_sanity_val_steps=0`` (or no
      ``validation_step``) define ``val_dataloader()`` instead; the callback says so if needed. Its
      subsample is collated once and **kept in the callback** (and in its checkpoint state, as CPU
      tensors), so later fits keep evaluating earlier tasks whose data they no longer serve. Keep
      ``samples_per_task`` small enough for that.

    The evaluation does not disturb training: every submodule's train/eval flag is saved, the
    module is put in eval mode (BatchNorm statistics are not updated, dropout is off) and the
    flags restored afterwards; it runs under ``torch.no_grad()``; the global CPU and CUDA RNG
    states and Python's and NumPy's RNG states are restored, and no ``DataLoader`` is used (so
    no loader RNG is touched). The same seeded run with and without this callback ends with equal
    parameters.

    Under DDP each rank evaluates its shard ``r::world_size`` of each subsample and the correct/total
    counts are summed with ``trainer.strategy.reduce``, so the curves equal a one-process run's on
    the same weights and are identical on every rank. Since BatchNorm running statistics differ
    between DDP ranks between forwards, every rank evaluates with rank 0's floating-point buffers
    (swapped in for the evaluation, then each rank's own put back).

    Cost control: with ``max_eval_fraction`` set, the time spent evaluating and training
    (``time.perf_counter``, per rank) is measured; whenever evaluation takes more than that fraction
    of (evaluation + training) time since the interval last changed, the interval doubles. Rank 0
    decides and broadcasts the decision, so all ranks evaluate at the same steps.

    Args:
        every_n_steps: evaluate when ``trainer.global_step`` is a multiple of this interval
            (ρ_eval; the paper recommends 1).
        samples_per_task: size of each task's fixed evaluation subsample; ``None`` for the whole
            validation set.
        seed: seed of the subsample draw (task ``t`` uses ``seed * 1_000_003 + t``).
        batch_size: evaluation mini-batch size.
        window: ``w`` of WF^w and WP^w, in evaluations (>= 2).
        window_scope: which measurements WF^w and WP^w use: ``"seen"`` (every seen task over
            its whole history, the selection behind the paper's numbers) or ``"phase"``
            (forgetting after a task ended, plasticity while it is trained); see
            :func:`lightning_forget.metrics.windowed_forgetting`.
        max_eval_fraction: if set, in ``(0, 1)``: widen the interval when evaluation exceeds this
            fraction of evaluation + training time.
        eval_at_task_end: also evaluate at the last step of every task (so each task's final
            accuracy is on the curves).
        input_key: the input's key when batches are dicts (tuples use position 0).
        target_key: the label's key when batches are dicts (tuples use position 1).
        log_dir: directory for the CSV and PNG; defaults to the run's results folder
            (:func:`lightning_forget.reporting.results_dir`: the logger's directory, else
            ``trainer.default_root_dir``).
        save_csv: write ``continual_eval.csv`` (columns ``step, train_task, task, acc``;
            :func:`lightning_forget.reporting.write_stability_csv`).
        save_plot: write ``stability_gap.png`` (accuracy per task vs step, dashed lines at task
            switches; :func:`lightning_forget.reporting.write_stability_plot`) and send the same
            figure, tagged ``eval/stability_gap``, to every logger that takes images
            (:func:`lightning_forget.reporting.log_figure`).
        forward_fn: the module's logits function used by :meth:`predict`: ``None`` for its
            ``forward``, or a submodule or method name (``"net"``) for a module without one (see
            :class:`~lightning_forget.forward.ModelForward`).

    Raises:
        ValueError: if an argument is out of range (the message names it).
        TypeError: if ``input_key``/``target_key``/``log_dir`` are not strings.

    Note:
        Logged keys (to ``trainer.loggers`` at ``trainer.global_step``, and put into
        ``trainer.callback_metrics``): ``eval/acc/task_{t}`` for each seen task, ``eval/acc_avg``,
        ``eval/min_acc`` and ``eval/wc_acc`` (from the second task on), ``eval/interval``.

        Saved state (``state_dict``; plain values and CPU tensors): the task counters of
        :class:`~lightning_forget.tasks.ContinualCallback`, ``steps``, ``acc`` (one list of
        per-task accuracies per evaluation), ``task_end_steps``, ``interval`` (the effective
        interval), ``step_offset`` (one-fit-per-task mode: steps of earlier fits, so the curves'
        steps keep increasing across fits), ``indices`` (each task's subsample indices), ``data``
        (one-fit-per-task mode only: each task's collated subsample) and ``version``.
    """

    #: Tested single-process and under DDP; sharded strategies are refused in ``setup``.
    supported_strategies: tuple[str, ...] = DDP_STRATEGIES + SHARDED_STRATEGIES
    #: Constructor arguments whose change a resume refuses (see ContinualCallback.state_arguments).
    state_arguments: tuple[str, ...] = ('samples_per_task',)
    #: Whether the task end edits weights (then it runs inside tasks.atomic_edit).
    task_end_edits_weights = False


    def __init__(
        self,
        every_n_steps: int = 10,
        samples_per_task: Optional[int] = 256,
        seed: int = 0,
        batch_size: int = 256,
        window: int = 10,
        window_scope: str = "seen",
        max_eval_fraction: Optional[float] = None,
        eval_at_task_end: bool = True,
        input_key: str = "x",
        target_key: str = "y",
        log_dir: Optional[str] = None,
        save_csv: bool = True,
        save_plot: bool = True,
        forward_fn: Optional[str] = None,
    ) -> None:
        super().__init__()
        _positive_int("every_n_steps", every_n_steps)
        _positive_int("samples_per_task", samples_per_task, allow_none=True)
        _positive_int("batch_size", batch_size)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"`seed` must be an int, got {seed!r}.")
        _check_window(window)
        _check_scope(window_scope, "window_scope")
        if max_eval_fraction is not None:
            if isinstance(max_eval_fraction, bool) or not isinstance(max_eval_fraction, (int, float)):
                raise ValueError(f"`max_eval_fraction` must be a float in (0, 1) or None, got {max_eval_fraction!r}.")
            if not 0.0 < float(max_eval_fraction) < 1.0:
                raise ValueError(
                    f"`max_eval_fraction` must be in (0, 1) (e.g. 0.3 = at most 30% of the time "
                    f"evaluating), or None to never widen the interval; got {max_eval_fraction!r}."
                )
        for name, value in (("input_key", input_key), ("target_key", target_key)):
            if not isinstance(value, str):
                raise TypeError(f"`{name}` must be a str (the dict key of batches), got {type(value).__name__}.")
        if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(f"`log_dir` must be a path string or None, got {type(log_dir).__name__}.")
        self.every_n_steps = every_n_steps
        self.samples_per_task = samples_per_task
        self.seed = seed
        self.batch_size = batch_size
        self.window = window
        self.window_scope = window_scope
        self.max_eval_fraction = None if max_eval_fraction is None else float(max_eval_fraction)
        self.eval_at_task_end = eval_at_task_end
        self.input_key = input_key
        self.target_key = target_key
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.save_csv = save_csv
        self.save_plot = save_plot
        self.model_forward = ModelForward(forward_fn, owner="ContinualEvaluation")
        self.forward_fn = forward_fn

        self._interval = every_n_steps
        self._steps: list[int] = []
        self._acc: list[list[float]] = []
        self._task_end_steps: list[int] = []
        self._indices: dict[int, list[int]] = {}
        self._data: dict[int, Any] = {}  # task -> collated CPU subsample
        self._stores_data = False  # one-fit-per-task mode: data is part of the state
        self._running_min: dict[int, float] = {}
        self._step_offset = 0  # one fit per task: steps continue across fits
        # timing (per rank, not saved); `_clock` can be replaced in tests
        self._clock: Callable[[], float] = time.perf_counter
        self._batch_start: Optional[float] = None
        self._eval_time = 0.0
        self._train_time = 0.0
        self._window_eval_time = 0.0
        self._window_train_time = 0.0

    # ------------------------------------------------------------------ public read-outs
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_steps=self.every_n_steps, samples_per_task=self.samples_per_task, seed=self.seed
        )

    @property
    def interval(self) -> int:
        """The effective evaluation interval (``every_n_steps``, doubled by cost control)."""
        return self._interval

    @property
    def curves(self) -> EvalCurves:
        """The recorded curves: steps, ``(num_evals, num_tasks)`` accuracies (NaN = not evaluated), task ends."""
        width = max([len(row) for row in self._acc] + [len(self._task_end_steps)], default=0)
        acc = [row + [math.nan] * (width - len(row)) for row in self._acc]
        return as_curves(self._steps, torch.tensor(acc, dtype=torch.float64).reshape(len(acc), width), self._task_end_steps)

    @property
    def min_acc(self) -> float:
        """min-ACC at the last evaluation (NaN in the first task)."""
        return min_acc(self.curves)

    @property
    def wc_acc(self) -> float:
        """WC-ACC at the last evaluation."""
        return wc_acc(self.curves)

    @property
    def wf(self) -> float:
        """Windowed forgetting WF^w (w = ``window``) at the last evaluation."""
        return windowed_forgetting(self.curves, self.window, self.window_scope)

    @property
    def wp(self) -> float:
        """Windowed plasticity WP^w (w = ``window``) at the last evaluation."""
        return windowed_plasticity(self.curves, self.window, self.window_scope)

    @property
    def final_accuracies(self) -> list[float]:
        """Each task's accuracy at the last evaluation (NaN for tasks not evaluated)."""
        curves = self.curves
        return curves.acc[-1].tolist() if curves.num_evals else []

    @property
    def eval_time_s(self) -> float:
        """Seconds this rank spent in continual evaluation during this session's fits."""
        return self._eval_time

    @property
    def train_time_s(self) -> float:
        """Seconds this rank spent between ``on_train_batch_start`` and ``on_train_batch_end``."""
        return self._train_time

    # ------------------------------------------------------------------ overridable pieces
    def predict(self, pl_module: "pl.LightningModule", x: Any) -> Tensor:
        """Predicted labels for the inputs ``x`` (already on the module's device).

        Default: the logits of ``pl_module(x)`` (or of the function ``forward_fn`` names, see
        :class:`~lightning_forget.forward.ModelForward`), then ``argmax(-1)``. Override for models
        whose forward takes other arguments or returns something else.
        """
        return self.model_forward(pl_module, x).argmax(-1)

    def split_batch(self, batch: Any) -> tuple[Any, Tensor]:
        """``(inputs, labels)`` of a collated batch: a ``(x, y, ...)`` sequence or a dict."""
        if isinstance(batch, Mapping):
            return batch[self.input_key], batch[self.target_key]
        if isinstance(batch, (list, tuple)) and len(batch) >= 2:
            return batch[0], batch[1]
        raise TypeError(
            f"ContinualEvaluation cannot split a {type(batch).__name__} batch into inputs and labels: "
            "datasets must yield (x, y) tuples or dicts (set `input_key`/`target_key`), or override "
            "`split_batch`."
        )

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if type(self).predict is ContinualEvaluation.predict:
            self.model_forward.check(pl_module)
        if self.save_csv or self.save_plot:
            directory = reporting.results_dir(trainer, self.log_dir)  # every rank: trainer.log_dir broadcasts
            if trainer.is_global_zero:
                self._check_writable(directory)
                self._output_paths(directory)  # chosen now: never over another run's files
        name = type(trainer.strategy).__name__
        if any(sharded in name for sharded in ("FSDP", "DeepSpeed")):
            raise NotImplementedError(
                f"ContinualEvaluation calls the LightningModule's forward outside the training step, "
                f"which a sharded strategy ({name}) does not support. Use strategy='ddp' (or a single "
                "device), or evaluate with Trainer.validate between tasks."
            )

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._stores_data = task_schedule(trainer) is None
        self._window_eval_time = self._window_train_time = 0.0
        super().on_train_start(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        self._batch_start = self._clock()

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._batch_start is not None:
            elapsed = self._clock() - self._batch_start
            self._train_time += elapsed
            self._window_train_time += elapsed
            self._batch_start = None
        step = self._step(trainer)
        if trainer.global_step > 0 and step % self._interval == 0 and not self._evaluated_at(step):
            steer_time = self._run_evaluation(trainer, pl_module)
            self._steer_interval(trainer, steer_time)

    @override
    def on_task_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        if task_schedule(trainer) is None and self._task_end_steps:
            # A new fit (usually a new Trainer, whose global_step restarts at 0) continues the curves.
            self._step_offset = self._task_end_steps[-1] - trainer.global_step

    @override
    def on_task_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        step = self._step(trainer)
        if self.eval_at_task_end and trainer.global_step > 0 and not self._evaluated_at(step):
            self._run_evaluation(trainer, pl_module)
        if not self._task_end_steps or step > self._task_end_steps[-1]:
            self._task_end_steps.append(step)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_train_end(trainer, pl_module)  # one fit per task: fires on_task_end (may evaluate)
        if not self._steps or not (self.save_csv or self.save_plot):
            return
        directory = reporting.results_dir(trainer, self.log_dir)  # every rank: trainer.log_dir broadcasts
        if not trainer.is_global_zero:
            return
        os.makedirs(directory, exist_ok=True)
        curves = self.curves
        paths = []
        files = self._output_paths(directory)
        if self.save_csv:
            paths.append(reporting.write_stability_csv(files["csv"], curves))
        if self.save_plot:
            path = files["png"]
            figure = reporting.write_stability_plot(path, curves, self._plot_title())
            reporting.log_figure(trainer, figure, "eval/stability_gap", step=self._step(trainer))
            paths.append(path)
        rank_zero_info(
            f"ContinualEvaluation: {len(self._steps)} evaluations, min-ACC={self.min_acc:.4f}, "
            f"WC-ACC={self.wc_acc:.4f}, WF{self.window}={self.wf:.4f}, WP{self.window}={self.wp:.4f}"
        )
        reporting.announce_results(trainer, "ContinualEvaluation", paths)

    def _plot_title(self) -> str:
        return (
            f"Continual evaluation every {self.every_n_steps} steps — min-ACC {self.min_acc:.3f}, "
            f"WC-ACC {self.wc_acc:.3f}, WF{self.window} {self.wf:.3f}"
        )

    def _output_paths(self, directory: str) -> dict[str, Any]:
        return reporting.output_paths(self, directory, reporting.STABILITY_FILES)

    def _check_writable(self, directory: str) -> None:
        """Fail before training, not after it, when the CSV/PNG could not be written."""
        reporting.ensure_writable_dir(
            directory, "ContinualEvaluation", "continual_eval.csv and stability_gap.png",
            "pass a writable `log_dir`, or `save_csv=False, save_plot=False`",
        )

    # ------------------------------------------------------------------ evaluation
    def _step(self, trainer: "pl.Trainer") -> int:
        """The step on the curves: ``global_step``, plus earlier fits' steps in one-fit-per-task mode."""
        return trainer.global_step + self._step_offset

    def _evaluated_at(self, step: int) -> bool:
        return bool(self._steps) and self._steps[-1] == step

    def _seen_tasks(self, trainer: "pl.Trainer") -> int:
        return self.current_task(trainer) + 1

    def _run_evaluation(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> float:
        """Evaluate all seen tasks, record and log the result; returns the time to steer on."""
        start = self._clock()
        num_seen = self._seen_tasks(trainer)
        with self._isolated(pl_module), self._rank_zero_buffers(trainer, pl_module):
            built_start = self._clock()
            for task in range(num_seen):
                if task not in self._data:
                    self._data[task] = self._build_subsample(trainer, task)
            build_time = self._clock() - built_start
            counts = self._count_correct(trainer, pl_module, num_seen)
        counts = trainer.strategy.reduce(counts, reduce_op="sum").to("cpu", torch.float64)
        accuracies = [
            float(c / n) if n > 0 else math.nan for c, n in zip(counts[:, 0].tolist(), counts[:, 1].tolist())
        ]
        self._record(trainer, self._step(trainer), accuracies)
        elapsed = self._clock() - start
        self._eval_time += elapsed
        return elapsed - build_time

    @contextmanager
    def _isolated(self, pl_module: "pl.LightningModule") -> Iterator[None]:
        """Eval mode, no grad, and every RNG state restored afterwards."""
        flags = [(module, module.training) for module in pl_module.modules()]
        device = pl_module.device
        rng_devices = [device.index if device.index is not None else 0] if device.type == "cuda" else []
        py_state = random.getstate()
        np_state = np.random.get_state()
        try:
            with torch.random.fork_rng(devices=rng_devices, device_type="cuda"), torch.no_grad():
                pl_module.eval()
                yield
        finally:
            for module, training in flags:
                module.training = training
            random.setstate(py_state)
            np.random.set_state(np_state)

    @contextmanager
    def _rank_zero_buffers(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> Iterator[None]:
        """Every rank evaluates with rank 0's floating-point buffers; each rank's own are put back.

        Under DDP, BatchNorm running statistics drift apart between ranks after each forward
        (DDP broadcasts rank 0's at the start of the next one). Evaluating every shard with the
        same buffers makes the summed counts those of one model. Every rank calls the reduce.
        """
        buffers = [b for b in pl_module.buffers() if b.is_floating_point()]
        if trainer.world_size <= 1 or not buffers:
            yield
            return
        originals = [b.detach().clone() for b in buffers]
        rank_zero = trainer.global_rank == 0
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for buffer in buffers:
            by_dtype.setdefault(buffer.dtype, []).append(buffer)
        with torch.no_grad():
            for group in by_dtype.values():
                flat = torch.cat([b.reshape(-1) for b in group])
                if not rank_zero:
                    flat.zero_()  # x + 0 == x exactly: the sum is rank 0's values
                flat = trainer.strategy.reduce(flat, reduce_op="sum")
                offset = 0
                for buffer in group:
                    buffer.copy_(flat[offset : offset + buffer.numel()].view_as(buffer))
                    offset += buffer.numel()
        try:
            yield
        finally:
            with torch.no_grad():
                for buffer, original in zip(buffers, originals):
                    buffer.copy_(original)

    def _subsample_indices(self, size: int, task: int) -> list[int]:
        if self.samples_per_task is None or self.samples_per_task >= size:
            return list(range(size))
        generator = torch.Generator().manual_seed(self.seed * _SEED_STRIDE + task)
        chosen = torch.randperm(size, generator=generator)[: self.samples_per_task]
        return sorted(chosen.tolist())

    def _build_subsample(self, trainer: "pl.Trainer", task: int) -> Any:
        dataset = self._task_dataset(trainer, task)
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError(
                f"ContinualEvaluation draws a fixed subsample by index, but task {task}'s validation set is a "
                f"{type(dataset).__name__} without __len__/__getitem__ (an IterableDataset?). Use a map-style "
                "Dataset for validation."
            )
        if task not in self._indices:
            self._indices[task] = self._subsample_indices(len(dataset), task)  # type: ignore[arg-type]
        items = [dataset[i] for i in self._indices[task]]
        if not items:
            raise RuntimeError(f"ContinualEvaluation: the validation set of task {task} is empty.")
        return apply_to_collection(default_collate(items), Tensor, lambda t: t.detach().cpu())

    def _task_dataset(self, trainer: "pl.Trainer", task: int) -> Dataset:
        datamodule = task_schedule(trainer)
        if datamodule is not None:
            return datamodule.val_dataset(task)
        if task != self.task:
            raise RuntimeError(
                f"ContinualEvaluation has no evaluation data for earlier task {task}: in one-fit-per-task "
                "mode each task's subsample is taken during its own fit. Attach the same callback object "
                "(or restore its checkpoint state) from the first task on."
            )
        loaders = self._fit_val_dataloaders(trainer)
        if isinstance(loaders, Mapping):
            loaders = list(loaders.values())
        if isinstance(loaders, Sequence):
            if len(loaders) == 1:
                loaders = loaders[0]
            elif task < len(loaders):
                loaders = loaders[task]
            else:
                raise RuntimeError(
                    f"ContinualEvaluation: the fit of task {task} has {len(loaders)} validation loaders; "
                    "give one loader (the task's) or one per task in task order."
                )
        return loaders.dataset

    @staticmethod
    def _fit_val_dataloaders(trainer: "pl.Trainer") -> Any:
        """The fit's validation loaders, through public API only.

        In order: ``trainer.val_dataloaders`` (set once validation has set up its loaders: at the
        sanity check, which Lightning runs before training by default, or at the first
        validation); else the datamodule's ``val_dataloader()``; else the module's.

        Raises:
            RuntimeError: none of them is available; the message lists the fixes.
        """
        loaders = trainer.val_dataloaders
        if loaders is not None:
            return loaders
        for owner, parent in ((trainer.datamodule, pl.LightningDataModule), (trainer.lightning_module, pl.LightningModule)):
            if owner is not None and is_overridden("val_dataloader", owner, parent=parent):
                return owner.val_dataloader()
        raise RuntimeError(
            "ContinualEvaluation needs the current task's validation data in one-fit-per-task mode, but "
            "`trainer.val_dataloaders` is not set up yet (validation has not run in this fit) and neither "
            "the datamodule nor the module defines `val_dataloader()`. Fix: define `val_dataloader()` on "
            "the datamodule or module; or pass `val_dataloaders` to `trainer.fit` with a `validation_step` "
            "and the sanity check on (`num_sanity_val_steps` > 0, Lightning's default) so the loaders are "
            "set up before training; or use a ContinualDataModule."
        )

    def _count_correct(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", num_seen: int) -> Tensor:
        """``(num_seen, 2)`` int64 [correct, total] of this rank's shard of each task's subsample."""
        rank, world = trainer.global_rank, trainer.world_size
        device = pl_module.device
        counts = torch.zeros(num_seen, 2, dtype=torch.int64, device=device)
        sharded = is_sharded(pl_module)
        with forward_context(trainer):
            for task in range(num_seen):
                whole, every_label = self.split_batch(self._data[task])
                inputs = apply_to_collection(whole, Tensor, lambda t: t[rank::world])
                labels = every_label[rank::world]
                for start in range(0, labels.shape[0], self.batch_size):
                    chunk = apply_to_collection(
                        inputs, Tensor, lambda t: t[start : start + self.batch_size].to(device, non_blocking=True)
                    )
                    target = labels[start : start + self.batch_size].to(device)
                    predicted = self.predict(pl_module, chunk).reshape(target.shape)
                    counts[task, 0] += (predicted == target).sum()
                    counts[task, 1] += target.numel()
                if sharded:  # a sharded forward is collective: every rank runs as many as rank 0 (discarded)
                    most = -(-every_label.shape[0] // world)
                    for _ in range(-(-most // self.batch_size) - -(-labels.shape[0] // self.batch_size)):
                        self.predict(pl_module, apply_to_collection(whole, Tensor, lambda t: t[:1].to(device)))
        return counts

    def _record(self, trainer: "pl.Trainer", step: int, accuracies: list[float]) -> None:
        schedule = task_schedule(trainer)
        width = max(len(accuracies), int(schedule.num_tasks) if schedule is not None else 0)
        row = accuracies + [math.nan] * (width - len(accuracies))
        self._steps.append(step)
        self._acc.append(row)
        metrics = {f"eval/acc/task_{t}": a for t, a in enumerate(accuracies)}
        metrics["eval/acc_avg"] = sum(accuracies) / len(accuracies)
        current = self._current_task_at(step)
        update_task_minima(self._running_min, accuracies, current)
        worst = min_acc_from_minima(self._running_min, current)
        if not math.isnan(worst):
            metrics["eval/min_acc"] = worst
        if current < len(accuracies):
            metrics["eval/wc_acc"] = wc_acc_from(accuracies[current], current, worst)
        metrics["eval/interval"] = float(self._interval)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        callback_metrics = trainer.callback_metrics
        for key, value in metrics.items():
            callback_metrics[key] = torch.tensor(value)

    def _steer_interval(self, trainer: "pl.Trainer", eval_time: float) -> None:
        if self.max_eval_fraction is None:
            return
        self._window_eval_time += eval_time
        total = self._window_eval_time + self._window_train_time
        widen = total > 0 and self._window_eval_time / total > self.max_eval_fraction
        widen = bool(trainer.strategy.broadcast(widen, src=0))
        if widen:
            self._interval *= 2
            self._window_eval_time = self._window_train_time = 0.0
            rank_zero_info(
                f"ContinualEvaluation: evaluation took more than {self.max_eval_fraction:.0%} of the time; "
                f"evaluating every {self._interval} steps from now on."
            )

    # ------------------------------------------------------------------ state
    @override
    def method_state(self) -> dict[str, Any]:
        return {
            "steps": list(self._steps),
            "acc": [list(row) for row in self._acc],
            "task_end_steps": list(self._task_end_steps),
            "interval": self._interval,
            "step_offset": self._step_offset,
            "indices": {int(t): list(idx) for t, idx in self._indices.items()},
            "data": dict(self._data) if self._stores_data else {},
        }

    @override
    def load_method_state(self, state: dict[str, Any]) -> None:
        self._steps = [int(s) for s in state["steps"]]
        self._acc = [[float(a) for a in row] for row in state["acc"]]
        self._task_end_steps = [int(s) for s in state["task_end_steps"]]
        self._interval = int(state["interval"])
        self._step_offset = int(state["step_offset"])
        self._indices = {int(t): [int(i) for i in idx] for t, idx in state["indices"].items()}
        self._data = {int(t): data for t, data in state["data"].items()}
        self._stores_data = bool(self._data)
        self._rebuild_running_min()

    def _current_task_at(self, step: int) -> int:
        """The current task of an evaluation at ``step``: the number of tasks ended before it."""
        return sum(1 for end in self._task_end_steps if end < step)

    def _rebuild_running_min(self) -> None:
        self._running_min = {}
        for step, row in zip(self._steps, self._acc):
            update_task_minima(self._running_min, row, self._current_task_at(step))
