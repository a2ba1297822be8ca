"""``ContinualClassifier``: a LightningModule for class- and task-incremental classification."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_forget.metrics.accuracy_matrix import AccuracyMatrix
from lightning_forget.nn.backbones import build_backbone
from lightning_forget.tasks import current_task
from lightning_forget.validation import check_int, check_int_sequence, message

__all__ = ["ContinualClassifier", "default_optimizer", "split_xy"]


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    """SGD with lr 0.1 (the default of :class:`ContinualClassifier`; Mammoth's Seq-MNIST setting)."""
    return torch.optim.SGD(params, lr=0.1)


def split_xy(batch: Any) -> tuple[Tensor, Tensor]:
    """``(x, y)`` from a batch that is a ``(x, y)`` pair or a dict with ``"x"`` and ``"y"``."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, dict) and "x" in batch and "y" in batch:
        return batch["x"], batch["y"]
    raise TypeError(
        "ContinualClassifier expects batches `(x, y)` or dicts with keys 'x' and 'y', got "
        f"{type(batch).__name__}; override `ContinualClassifier.split_batch` for other layouts."
    )


class ContinualClassifier(pl.LightningModule):
    """A classifier for continual streams: a backbone, one linear head over all classes.

    The head is shared by all tasks (class-incremental). With ``task_incremental=True`` the
    evaluation of task ``t`` masks the logits to ``t``'s classes (task-incremental evaluation,
    training unchanged), using ``classes_per_task`` or the datamodule's ``classes_of_task``.

    Validation on a :class:`~lightning_forget.datamodules.ContinualDataModule` sees one loader
    per task; ``dataloader_idx`` is the evaluated task. Counts go into an
    :class:`~lightning_forget.metrics.AccuracyMatrix` (row: the task being trained; column: the
    evaluated task), synced across ranks and kept in checkpoints.

    Args:
        backbone: ``"mlp"``, ``"resnet"`` or any ``nn.Module`` mapping inputs to feature vectors
            (in YAML a ``class_path``/``init_args`` block). Its output size is read from
            ``out_features`` or found with one forward pass on a zero input.
        num_classes: size of the head (linked from the datamodule by the CLI).
        input_shape: shape of one input, without batch dimension (linked by the CLI).
        num_tasks: number of tasks, the size of the accuracy matrix (linked by the CLI).
        hidden_sizes: widths of the built-in MLP.
        resnet_width: first-stage width of the built-in ResNet.
        task_incremental: mask logits to the evaluated task's classes in validation/test.
        classes_per_task: the classes of each task, for ``task_incremental`` without a
            datamodule that provides ``classes_of_task``.
        optimizer: optimizer factory (LightningCLI style); default SGD(lr=0.1).
        lr_scheduler: optional scheduler factory (stepped every epoch).
        report: add a :class:`~lightning_forget.callbacks.ContinualMetrics` callback (accuracy
            table and files at the end of the stream) unless the Trainer already has one or the
            datamodule is a forget/retain stream (`loader_roles`; ForgetRetainEvaluation reports those).

    Note:
        Logged keys: ``train/loss``, ``val/loss``, ``val/acc/task_{t}`` (for every evaluated
        task), ``val/acc_avg`` (mean over the tasks seen so far), and the same under ``test/``.
    """

    def __init__(
        self,
        backbone: Union[nn.Module, str] = "mlp",
        num_classes: int = 10,
        input_shape: Sequence[int] = (1, 28, 28),
        num_tasks: int = 1,
        hidden_sizes: Sequence[int] = (256, 256),
        resnet_width: int = 20,
        task_incremental: bool = False,
        classes_per_task: Optional[list[list[int]]] = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        report: bool = True,
    ) -> None:
        super().__init__()
        check_int("num_classes", num_classes, min=2, fix="pass the number of classes of the whole stream")
        check_int("num_tasks", num_tasks, min=1)
        input_shape = check_int_sequence(
            "input_shape", input_shape, min=1, fix="pass the shape of one sample without the batch dimension, e.g. [1, 28, 28]"
        )
        if isinstance(backbone, str) and backbone == "mlp":
            check_int_sequence("hidden_sizes", hidden_sizes, min=1, allow_empty=True,
                               fix="pass positive layer widths, e.g. [256, 256] ([] for a linear model)")
        if isinstance(backbone, str) and backbone != "mlp":
            check_int("resnet_width", resnet_width, min=1, fix="pass the width of the first stage, e.g. 20")
        if isinstance(optimizer, str):
            raise TypeError(
                message(
                    "optimizer", "a callable that builds an optimizer from the parameters", optimizer,
                    "pass e.g. `functools.partial(torch.optim.Adam, lr=1e-3)` in Python, or in YAML "
                    "`optimizer: {class_path: torch.optim.Adam, init_args: {lr: 0.001}}`",
                )
            )
        if classes_per_task is not None and len(classes_per_task) != num_tasks:
            raise ValueError(
                f"`classes_per_task` lists {len(classes_per_task)} tasks but `num_tasks={num_tasks}`; "
                "give one list of classes per task."
            )
        # Factories and module instances are not plain values: checkpoints load with
        # `weights_only=True`, so only plain hyperparameters are saved (the CLI saves the config).
        ignored = ["optimizer", "lr_scheduler"] + (["backbone"] if isinstance(backbone, nn.Module) else [])
        self.save_hyperparameters(ignore=ignored)
        self.input_shape = tuple(int(d) for d in input_shape)
        # The input shape is only known to matter for the backbones built here.
        self._builtin_backbone = isinstance(backbone, str)
        if isinstance(backbone, str):
            kwargs: dict[str, Any] = {"hidden_sizes": hidden_sizes} if backbone == "mlp" else {"width": resnet_width}
            backbone = build_backbone(backbone, self.input_shape, **kwargs)
        self.backbone = backbone
        self.head = nn.Linear(self._feature_size(backbone), num_classes)
        self.num_classes = num_classes
        self.num_tasks = num_tasks
        self.task_incremental = task_incremental
        self.classes_per_task = classes_per_task
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.report = report
        self._report_callback: Optional[pl.Callback] = None
        self._checked_first_batch = False
        self.val_matrix = AccuracyMatrix(num_tasks)
        self.test_matrix = AccuracyMatrix(num_tasks)

    def _feature_size(self, backbone: nn.Module) -> int:
        size = getattr(backbone, "out_features", None)
        if isinstance(size, int):
            return size
        was_training = backbone.training
        backbone.eval()
        with torch.no_grad():
            out = backbone(torch.zeros(2, *self.input_shape))
        backbone.train(was_training)
        if out.dim() != 2:
            raise ValueError(
                f"The backbone must return flat features (batch, features); it returned shape "
                f"{tuple(out.shape)} for `input_shape={self.input_shape}`. Add a flatten/pooling layer."
            )
        return int(out.shape[1])

    # ------------------------------------------------------------------ forward and steps
    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

    def split_batch(self, batch: Any) -> tuple[Tensor, Tensor]:
        """``(inputs, targets)`` of a batch; override for other batch layouts."""
        return split_xy(batch)

    def on_train_epoch_start(self) -> None:
        # Each epoch (a new task's data, in a continual run) gets its first batch checked.
        self._checked_first_batch = False

    def _reset_eval_checks(self) -> None:
        # The sanity check, every validation and every test see their loaders' first batches checked
        # too: a bad `input_shape`/`num_classes` must fail with our message, not a raw torch error.
        self._checked_eval_loaders = set()

    def _check_first_batch(self, x: Tensor, y: Tensor, loader: Optional[int] = None) -> None:
        """A clear error, naming the argument, when the data contradict ``input_shape``/``num_classes``.

        Checked on the first training batch of every epoch and on the first batch of each
        evaluation loader (one host sync per epoch and loader, not per step).
        """
        if loader is None:
            if self._checked_first_batch:
                return
            self._checked_first_batch = True
        else:
            checked = self.__dict__.setdefault("_checked_eval_loaders", set())
            if loader in checked:
                return
            checked.add(loader)
        if self._builtin_backbone and tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"`input_shape` is {list(self.input_shape)}, but the data's samples have shape "
                f"{list(x.shape[1:])}. Fix: pass input_shape={list(x.shape[1:])} (the CLI links it from the datamodule)."
            )
        if y.numel() and not y.dtype.is_floating_point:
            low, high = int(y.min()), int(y.max())
            if low < 0 or high >= self.num_classes:
                raise ValueError(
                    f"`num_classes` is {self.num_classes}, but the data has label {high if high >= self.num_classes else low}. "
                    f"Fix: pass num_classes={max(high + 1, self.num_classes)} (labels must lie in [0, num_classes))."
                )

    def _cross_entropy(self, logits: Tensor, y: Tensor) -> Tensor:
        """Cross-entropy, with torch's bare out-of-range error turned into one naming ``num_classes``.

        The first batch of each epoch is checked explicitly; a label beyond ``num_classes`` in a
        later batch is caught here at no cost (no host sync per step).
        """
        try:
            return nn.functional.cross_entropy(logits, y)
        except IndexError as error:
            raise ValueError(
                f"`num_classes` is {self.num_classes}, but a batch has a label outside [0, {self.num_classes}) "
                f"(torch: {error}). Fix: pass num_classes equal to the number of classes of the whole stream."
            ) from error

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = self.split_batch(batch)
        self._check_first_batch(x, y)
        loss = self._cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True, batch_size=y.shape[0])
        return loss

    def _task_classes(self, task: int) -> Optional[list[int]]:
        if self.classes_per_task is not None:
            return list(self.classes_per_task[task])
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        classes_of_task = getattr(datamodule, "classes_of_task", None)
        return list(classes_of_task(task)) if callable(classes_of_task) else None

    def _masked(self, logits: Tensor, task: int) -> Tensor:
        if not self.task_incremental:
            return logits
        classes = self._task_classes(task)
        if classes is None:
            raise RuntimeError(
                "`task_incremental=True` needs each task's classes: pass `classes_per_task` or use a "
                "datamodule with `classes_of_task(task)` (e.g. SplitMNIST)."
            )
        mask = torch.full_like(logits, float("-inf"))
        mask[:, classes] = 0.0
        return logits + mask

    def setup(self, stage: str) -> None:
        """Size the accuracy matrices for a datamodule that evaluates more sets than it has tasks
        (``num_eval_sets``: a forget/retain stream evaluates each forget set and the retained classes)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        needed = getattr(datamodule, "num_eval_sets", None)
        if isinstance(needed, int) and needed > self.num_tasks:
            self.num_tasks = needed
            self.val_matrix = AccuracyMatrix(needed)
            self.test_matrix = AccuracyMatrix(needed)

    def _eval_step(self, batch: Any, dataloader_idx: int, matrix: AccuracyMatrix, stage: str) -> None:
        x, y = self.split_batch(batch)
        self._check_first_batch(x, y, loader=dataloader_idx)
        task = current_task(self.trainer) if self._trainer is not None else 0
        if dataloader_idx >= self.num_tasks or task >= self.num_tasks:
            raise RuntimeError(
                f"Evaluating task {dataloader_idx} while training task {task}, but the module was built "
                f"with `num_tasks={self.num_tasks}`. Pass the stream's number of tasks as `num_tasks`."
            )
        logits = self._masked(self(x), dataloader_idx)
        loss = self._cross_entropy(logits, y)
        if not self._sanity_checking():
            matrix.update(logits, y, train_task=task, eval_task=dataloader_idx)
        self.log(f"{stage}/loss", loss, batch_size=y.shape[0], add_dataloader_idx=True, sync_dist=True)

    def _sanity_checking(self) -> bool:
        return self._trainer is not None and bool(self._trainer.sanity_checking)

    def _log_row(self, matrix: AccuracyMatrix, stage: str) -> None:
        if self._sanity_checking():
            # A few batches before training: they must not overwrite a row of the matrix.
            return
        task = current_task(self.trainer)
        row = matrix.compute()[task]
        measured = ~torch.isnan(row)
        for j in torch.nonzero(measured).flatten().tolist():
            # Values come from the synced matrix (equal on all ranks); sync_dist only keeps
            # Lightning from warning about epoch-level logging under DDP.
            self.log(f"{stage}/acc/task_{j}", row[j], add_dataloader_idx=False, sync_dist=True)
        seen = row[: task + 1]
        seen = seen[~torch.isnan(seen)]
        datamodule = getattr(self.trainer, "datamodule", None)
        if callable(getattr(datamodule, "loader_roles", None)):
            # A forget/retain stream: the sets are forgotten ones (0 is the goal) and retained ones;
            # their average reads as a continual-learning accuracy and means nothing. Per-set
            # accuracies stay logged; ForgetRetainEvaluation reports Acc_f/Acc_r/H-mean.
            return
        if seen.numel():
            self.log(f"{stage}/acc_avg", seen.mean(), prog_bar=stage == "val", add_dataloader_idx=False, sync_dist=True)

    def on_validation_epoch_start(self) -> None:
        self._reset_eval_checks()
        if not self._sanity_checking():
            self.val_matrix.reset_row(current_task(self.trainer))

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, self.val_matrix, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_row(self.val_matrix, "val")

    def on_test_epoch_start(self) -> None:
        self._reset_eval_checks()
        self.test_matrix.reset_row(current_task(self.trainer))

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, self.test_matrix, "test")

    def on_test_epoch_end(self) -> None:
        self._log_row(self.test_matrix, "test")

    # ------------------------------------------------------------------ optimisation and callbacks
    def configure_model(self) -> None:
        """Shard the backbone and the head with FSDP2 when the strategy gives a device mesh.

        Under ``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)`` each of the two
        becomes a ``fully_shard`` unit of the ``"data_parallel"`` mesh (see docs/sharding.md); under
        every other strategy (no mesh), and when an earlier fit sharded them already, nothing happens.
        """
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.head, FSDPModule):
            return
        # Both are FSDP roots (the LightningModule itself is not wrapped): ask them to free the
        # gathered weights after each forward, as non-root units do, so the parameters between
        # steps (and after an evaluation forward) are the shards.
        fully_shard(self.backbone, mesh=mesh["data_parallel"], reshard_after_forward=True)
        fully_shard(self.head, mesh=mesh["data_parallel"], reshard_after_forward=True)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer)}}

    def configure_callbacks(self) -> list[pl.Callback]:
        if not self.report:
            return []
        from lightning_forget.callbacks.continual_metrics import ContinualMetrics

        trainer = self._trainer
        if trainer is not None and any(
            isinstance(cb, ContinualMetrics) and cb is not self._report_callback for cb in trainer.callbacks
        ):
            return []
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        if callable(getattr(datamodule, "loader_roles", None)):
            # A forget/retain stream (unlearning): the continual-learning accuracy matrix would
            # report forgotten sets (where 0 is the goal) as forgetting. ForgetRetainEvaluation
            # reports such runs; the per-set accuracies are still logged (`val/acc/task_{j}`).
            return []
        # One instance for the module's lifetime: with one fit per task (a new Trainer each time)
        # the same callback, with its task counter and matrix, sees every fit.
        if self._report_callback is None:
            self._report_callback = ContinualMetrics()
        return [self._report_callback]
