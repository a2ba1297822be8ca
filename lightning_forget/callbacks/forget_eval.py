"""``ForgetRetainEvaluation``: Acc_f, Acc_r, Acc_o, H-mean and membership inference after every forgetting task."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_forget import reporting
from lightning_forget.forward import ModelForward
from lightning_forget.metrics.unlearning import ForgetRetainAccuracy, MembershipInference
from lightning_forget.precision import forward_context
from lightning_forget.sharding import batches_per_rank, is_sharded
from lightning_forget.tasks import DDP_STRATEGIES, SHARDED_STRATEGIES, ContinualCallback
from lightning_forget.validation import check_bool, check_choice, check_int, check_str

__all__ = ["ForgetRetainEvaluation"]

#: Logged keys (one value per forgetting task, at its end).
LOGGED_KEYS = ("unlearn/acc_f", "unlearn/acc_r", "unlearn/acc_o", "unlearn/h_mean", "unlearn/mia_auc")


class ForgetRetainEvaluation(ContinualCallback):
    """Measure a forgetting stream task by task: Acc_f, Acc_r, Acc_o, H-mean, MIA AUC; a table and a plot at the end.

    Mechanism: the datamodule (e.g. :class:`~lightning_forget.datamodules.ForgetRetainDataModule`)
    names its evaluation sets and their role in each task (``loader_roles(task)``: the set
    forgotten now, the sets forgotten before, the retained ones). At the start of each task the
    accuracy on the set about to be forgotten is measured (``Acc_f`` before, for the H-mean); at
    its end Acc_f, Acc_r (all retained sets pooled), Acc_o (all earlier forget sets pooled) and
    ``H = 2·(Acc_f,before − Acc_f)·Acc_r / ((Acc_f,before − Acc_f) + Acc_r)``. Counts go into a
    :class:`~lightning_forget.metrics.ForgetRetainAccuracy` (one "class" per evaluation set) that
    sums them across processes: under DDP each rank evaluates every ``world_size``-th sample and
    all ranks get the global values. With ``mia=True`` the loss-threshold membership-inference AUC
    between the task's forget *training* samples and held-out samples of the same classes
    (``mia_datasets(task)``; 0.5: the attack cannot tell them apart) goes through a
    :class:`~lightning_forget.metrics.MembershipInference`. The evaluation runs in eval mode under
    ``no_grad`` and does not touch the global RNG, so it changes nothing in the training run.

    Args:
        split: evaluate on the datamodule's ``"val"`` (default) or ``"test"`` datasets.
        mia: also compute the MIA AUC (default True; needs ``mia_datasets``).
        batch_size: evaluation batch size (default 256).
        report: at fit end, print the table (rank 0) and write ``unlearning.csv`` and
            ``unlearning.png`` into the run's results folder.
        log_dir: folder of the report (default: the logger's directory, see
            :func:`~lightning_forget.reporting.results_dir`).
        forward_fn: the module's logits function: ``None`` for its ``forward``, or a submodule or
            method name (``"net"``) for a module without one (see
            :class:`~lightning_forget.forward.ModelForward`).

    Logged metrics (at each task end, same value on every rank): ``unlearn/acc_f``,
    ``unlearn/acc_r``, ``unlearn/acc_o`` (NaN in the first task), ``unlearn/h_mean``,
    ``unlearn/mia_auc`` (with ``mia``).

    Raises:
        ValueError, TypeError: bad arguments. RuntimeError: the datamodule has no
            ``loader_roles``/``val_dataset`` (at fit start); the module has no ``forward`` and no
            ``forward_fn`` (``setup``).

    Note:
        Saved state: ``rows`` (one dict per finished task) and ``before`` (Acc_f before each
        task). Supported strategies: single device, DDP and ``ModelParallelStrategy`` (equal forwards per rank).
    """

    supported_strategies = DDP_STRATEGIES + SHARDED_STRATEGIES
    #: Constructor arguments whose change a resume refuses (see ContinualCallback.state_arguments).
    state_arguments: tuple[str, ...] = ()
    #: Whether the task end edits weights (then it runs inside tasks.atomic_edit).
    task_end_edits_weights = False

    def __init__(
        self,
        split: str = "val",
        mia: bool = True,
        batch_size: int = 256,
        report: bool = True,
        log_dir: Optional[str] = None,
        forward_fn: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.split = check_choice("split", split, ("val", "test"))
        self.mia = check_bool("mia", mia)
        self.batch_size = check_int("batch_size", batch_size, min=1)
        self.report = check_bool("report", report)
        self.log_dir = check_str("log_dir", log_dir, allow_none=True)
        self.model_forward = ModelForward(forward_fn, owner="ForgetRetainEvaluation")
        self.forward_fn = forward_fn
        self.rows: list[dict[str, float]] = []
        self.before: dict[int, float] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(split=self.split, mia=self.mia)

    # ------------------------------------------------------------------ evaluation
    @staticmethod
    def _datamodule(trainer: "pl.Trainer") -> Any:
        dm = getattr(trainer, "datamodule", None)
        if dm is None or not all(hasattr(dm, name) for name in ("loader_roles", "val_dataset", "test_dataset")):
            raise RuntimeError(
                "ForgetRetainEvaluation needs a datamodule with `loader_roles(task)` and `val_dataset`/`test_dataset` "
                f"(got {type(dm).__name__}). Fix: use lightning_forget.datamodules.ForgetRetainDataModule."
            )
        return dm

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._datamodule(trainer)
            self.model_forward.check(pl_module)
            directory = reporting.results_dir(trainer, self.log_dir)  # every rank: trainer.log_dir broadcasts
            if self.report and trainer.is_global_zero:
                reporting.ensure_writable_dir(directory, "ForgetRetainEvaluation",
                                              "unlearning.csv and unlearning.png", "pass a writable `log_dir`, or `report=False`")
                reporting.output_paths(self, directory, reporting.UNLEARNING_FILES)  # chosen now: never over another run's

    def _loader(self, trainer: "pl.Trainer", dataset: Dataset) -> DataLoader:
        rank, world = trainer.global_rank, trainer.world_size
        shard = Subset(dataset, list(range(rank, len(dataset), world))) if world > 1 else dataset  # type: ignore[arg-type]
        # A private generator: iterating the loader must not draw from the global RNG.
        return DataLoader(shard, batch_size=self.batch_size, shuffle=False, generator=torch.Generator())

    def _batches(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", dataset: Dataset) -> Iterator[Any]:
        """This rank's batches of ``dataset``; under FSDP2 then padding forwards until every rank has
        run as many as the busiest (a sharded forward is collective; their results are dropped)."""
        count = 0
        for batch in self._loader(trainer, dataset):
            count += 1
            yield batch
        if is_sharded(pl_module) and len(dataset):  # type: ignore[arg-type]
            padding = dataset[0]
            for _ in range(batches_per_rank(len(dataset), trainer.world_size, self.batch_size) - count):  # type: ignore[arg-type]
                self._forward(trainer, pl_module, (padding[0][None], torch.as_tensor(padding[1])[None]))

    @torch.no_grad()
    def _forward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch[0], batch[1]
        with forward_context(trainer):
            logits = self.model_forward(pl_module, x.to(pl_module.device)).float()
        return logits, y.to(pl_module.device).long()

    def evaluate(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int, before: Optional[float] = None,
                 with_mia: bool = False) -> dict[str, float]:
        """Acc_f / Acc_r / Acc_o / H-mean of ``task`` for the model as it is (and the MIA AUC with ``with_mia``)."""
        dm = self._datamodule(trainer)
        roles = dm.loader_roles(task)
        sets = sorted({*roles["forget"], *roles["old"], *roles["retain"]})
        get = dm.val_dataset if self.split == "val" else dm.test_dataset
        was_training = pl_module.training
        pl_module.eval()
        try:
            accuracy = ForgetRetainAccuracy(num_classes=max(sets) + 1).to(pl_module.device)
            for index in sets:
                for batch in self._batches(trainer, pl_module, get(index)):
                    logits, y = self._forward(trainer, pl_module, batch)
                    label = torch.full_like(y, index)
                    # One "class" per evaluation set: a correct prediction counts for its set.
                    accuracy.update(torch.where(logits.argmax(-1) == y, label, torch.full_like(y, -1)), label)
            accuracy.forget_classes, accuracy.old_classes, accuracy.retain_classes = roles["forget"], roles["old"], roles["retain"]
            accuracy.acc_f_before = before
            row = {k: float(v) for k, v in accuracy.compute().items()}
            if with_mia:
                mia = MembershipInference().to(pl_module.device)
                for split, dataset in dm.mia_datasets(task).items():
                    if split == "retain":
                        continue
                    for batch in self._batches(trainer, pl_module, dataset):
                        mia.update(*self._forward(trainer, pl_module, batch), split=split)
                row["mia_auc"] = float(mia.compute()["auc"])
        finally:
            pl_module.train(was_training)
        return row

    # ------------------------------------------------------------------ hooks
    def on_task_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        if task not in self.before:
            self.before[task] = self.evaluate(trainer, pl_module, task)["acc_f"]

    def on_task_report(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        # The report phase runs after every callback's task end (a GS-LoRA merge, a scaling): the
        # row measures the model the task leaves behind, whatever the callbacks' order.
        row = self.evaluate(trainer, pl_module, task, before=self.before.get(task), with_mia=self.mia)
        row = {"task": int(task), "acc_f_before": self.before.get(task, math.nan), **row}
        self.rows.append(row)
        logged = {f"unlearn/{name}": row[name] for name in ("acc_f", "acc_r", "acc_o", "h_mean", "mia_auc") if name in row}
        self.log_task_metrics(trainer, pl_module, logged, sync_dist=False)

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_fit_end(trainer, pl_module)
        if not self.report or not self.rows:
            return
        directory = reporting.results_dir(trainer, self.log_dir)
        if not trainer.is_global_zero:
            return
        from rich.console import Console

        Console().print(reporting.render_unlearning_table(self.rows))
        paths = reporting.write_unlearning_report(
            directory, self.rows, paths=reporting.output_paths(self, directory, reporting.UNLEARNING_FILES)
        )
        reporting.announce_results(trainer, "ForgetRetainEvaluation", paths)

    # ------------------------------------------------------------------ state
    def method_state(self) -> dict[str, Any]:
        return {"rows": [dict(r) for r in self.rows], "before": {int(k): float(v) for k, v in self.before.items()}}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.rows = [dict(r) for r in state["rows"]]
        self.before = {int(k): float(v) for k, v in state["before"].items()}
