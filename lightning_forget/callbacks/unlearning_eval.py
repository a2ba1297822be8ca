"""``UnlearningEvaluation``: UA, RA, TA, MIA-efficacy, MIA AUC and Avg. Gap while an unlearning run trains."""

from __future__ import annotations

import json
import math
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_forget import reporting
from lightning_forget.batch import BatchFields, logits_of
from lightning_forget.metrics.unlearning import avg_gap, mia_auc, mia_efficacy, mia_efficacy_svc
from lightning_forget.precision import forward_context
from lightning_forget.sharding import batches_per_rank, is_sharded
from lightning_forget.tasks import DDP_STRATEGIES, SHARDED_STRATEGIES, ContinualCallback
from lightning_forget.forward import ModelForward
from lightning_forget.unlearning.report import render_table, write_rows

#: The files UnlearningEvaluation writes (versioned beside another run's, see reporting.output_paths).
_FILES = {"csv": "unlearning_metrics.csv", "json": "unlearning_metrics.json"}
from lightning_forget.validation import check_bool, check_choice, check_int, check_str, message

__all__ = ["UnlearningEvaluation", "per_sample_records"]

#: Logged keys (at each evaluated epoch's end).
LOGGED_KEYS = ("mu/ua", "mu/ra", "mu/ta", "mu/mia_efficacy", "mu/mia_auc", "mu/avg_gap")
_SETS = ("forget", "retain", "test", "heldout")


@torch.no_grad()
def per_sample_records(trainer: "pl.Trainer", pl_module: "pl.LightningModule", datasets: dict[str, Dataset],
                       batch_size: int = 256, fields: Optional[BatchFields] = None,
                       model_forward: Optional[ModelForward] = None) -> dict[str, torch.Tensor]:
    """``{set: (n, 3) float64 [correct, true-class confidence, loss]}`` of every sample, in dataset order.

    Under DDP each rank evaluates every ``world_size``-th sample of each set; the records of all
    sets are gathered **once** (one ``all_gather`` of a padded tensor) and put back in dataset
    order by index, so every rank gets exactly the single-process values.
    """
    fields = fields or BatchFields(owner="UnlearningEvaluation")
    rank, world = trainer.global_rank, trainer.world_size
    rows: list[torch.Tensor] = []
    sizes = {name: len(ds) for name, ds in datasets.items()}  # type: ignore[arg-type]
    for set_id, (name, dataset) in enumerate(datasets.items()):
        indices = list(range(rank, sizes[name], world))
        loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, generator=torch.Generator())
        start = 0
        for batch in loader:
            split = fields.split(batch)
            x, y = split.input.to(pl_module.device), split.target.to(pl_module.device).long()  # type: ignore[union-attr]
            with forward_context(trainer):
                logits = (model_forward(pl_module, x) if model_forward is not None else logits_of(pl_module(x))).float()
            probs = torch.softmax(logits, -1)
            confidence = probs.gather(1, y.view(-1, 1)).squeeze(1)
            loss = torch.nn.functional.cross_entropy(logits, y, reduction="none")
            correct = (logits.argmax(-1) == y).float()
            index = torch.tensor(indices[start : start + len(y)], dtype=torch.float64, device=pl_module.device)
            start += len(y)
            rows.append(torch.stack([torch.full_like(index, set_id), index, correct.double(), confidence.double(),
                                     loss.double()], 1))
        if is_sharded(pl_module) and sizes[name]:
            # A sharded forward is collective: run the busiest rank's count (the padding's results dropped).
            padding = fields.split(next(iter(DataLoader(Subset(dataset, [0]), batch_size=1)))).input.to(pl_module.device)
            for _ in range(batches_per_rank(sizes[name], world, batch_size) - len(loader)):
                with forward_context(trainer):
                    model_forward(pl_module, padding) if model_forward is not None else pl_module(padding)
    local = torch.cat(rows) if rows else torch.zeros(0, 5, dtype=torch.float64, device=pl_module.device)
    if world > 1:
        per_rank = sum(math.ceil(n / world) for n in sizes.values())
        padded = torch.full((per_rank, 5), -1.0, dtype=torch.float64, device=pl_module.device)
        padded[: len(local)] = local
        gathered = trainer.strategy.all_gather(padded).reshape(-1, 5)
        local = gathered[gathered[:, 0] >= 0]
    out: dict[str, torch.Tensor] = {}
    for set_id, name in enumerate(datasets):
        part = local[local[:, 0] == set_id]
        part = part[torch.argsort(part[:, 1])]
        out[name] = part[:, 2:].cpu()
    return out


class UnlearningEvaluation(ContinualCallback):
    """The field's unlearning metrics during training: UA, RA, TA, MIA-efficacy, MIA AUC, Avg. Gap.

    Definitions (SalUn / Unlearn-Sparse, ``UNLEARNING.md`` §2.3), on the datamodule's sets of the
    current task (:class:`~lightning_forget.datamodules.ForgetRetainDataModule`: ``mia_datasets(t)``
    and the test set of the kept classes, ``test_dataset(num_tasks)``):

    - ``ua`` = 1 − accuracy on the forget training samples ``D_f``; ``ra`` = accuracy on the
      retained training samples ``D_r``; ``ta`` = test accuracy (kept classes in class mode).
    - ``mia_efficacy``: with ``mia="svc"`` (default, the official ``SVC_MIA``) an SVC on the
      true-class confidence is trained on the first ``|test|`` retained samples (members) against
      the test set (non-members) and applied to ``D_f``: the fraction predicted non-member. With
      ``mia="threshold"``, the one-feature threshold attack
      (:func:`~lightning_forget.metrics.mia_efficacy`) on the same confidences.
    - ``mia_auc``: the loss-threshold attack's ROC AUC, ``D_f`` (members) against held-out samples
      never trained on (0.5: indistinguishable).
    - ``avg_gap``: the mean ``|·|`` gap to a retrained model over UA, RA, TA and MIA-efficacy,
      when ``retrained`` gives that model's values.

    Values are fractions (× 100 for the papers' points). Evaluation runs in eval mode under
    ``no_grad`` on every rank, each rank a share of the samples, gathered once (exact under DDP:
    every rank logs the single-process value). It does not draw from the global RNG.

    Args:
        every_n_epochs: evaluate at the end of every n-th epoch (and always at a task's last epoch).
        before: also evaluate at each task's start (the original model: "MIA before").
        mia: ``"svc"`` (default) or ``"threshold"``.
        retrained: the retrained model's metrics: a dict with ``ua``, ``ra``, ``ta``,
            ``mia_efficacy``, or the path of a JSON written by this callback in a retraining run
            (its last row is used).
        batch_size: evaluation batch size.
        report: at fit end print the table (rank 0) and write ``unlearning_metrics.csv``/``.json``.
        log_dir: folder of the report (default: the run's results folder).
        input_key: input field of the evaluation batches (see :class:`~lightning_forget.batch.BatchFields`).
        target_key: target field.
        forward_fn: the module's logits function: ``None`` for its ``forward``, or a submodule or
            method name (``"net"``) for a module without one (see :class:`~lightning_forget.forward.ModelForward`).

    Logged metrics: ``mu/ua``, ``mu/ra``, ``mu/ta``, ``mu/mia_efficacy``,
    ``mu/mia_auc`` and, with ``retrained``, ``mu/avg_gap`` (on epoch end, same on every rank).

    Raises:
        ValueError, TypeError: bad arguments. RuntimeError: a datamodule without
            ``mia_datasets``/``test_dataset`` (at setup).

    Note:
        Saved state: ``rows`` (one dict per evaluation). Supported strategies: single device, DDP and
        ``ModelParallelStrategy`` (equal forwards per rank).
        List it before an unlearning callback whose guard or ``restore_best`` reads its keys.
    """

    supported_strategies = DDP_STRATEGIES + SHARDED_STRATEGIES

    def __init__(
        self,
        every_n_epochs: int = 1,
        before: bool = True,
        mia: Literal["svc", "threshold"] = "svc",
        retrained: Optional[Union[str, dict[str, float]]] = None,
        batch_size: int = 256,
        report: bool = True,
        log_dir: Optional[str] = None,
        input_key: Optional[Union[str, int]] = None,
        target_key: Optional[Union[str, int]] = None,
        forward_fn: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.model_forward = ModelForward(forward_fn, owner="UnlearningEvaluation")
        self.forward_fn = forward_fn
        self.every_n_epochs = check_int("every_n_epochs", every_n_epochs, min=1)
        self.before = check_bool("before", before)
        self.mia = check_choice("mia", mia, ("svc", "threshold"))
        if retrained is not None and not isinstance(retrained, (str, dict)):
            raise TypeError(message("retrained", "None, a dict of metrics or the path of a JSON file", retrained))
        if isinstance(retrained, dict):
            missing = [k for k in ("ua", "ra", "ta", "mia_efficacy") if k not in retrained]
            if missing:
                raise ValueError(message("retrained", "a dict with ua, ra, ta and mia_efficacy", retrained, f"add {missing}"))
        self.retrained = retrained
        self.batch_size = check_int("batch_size", batch_size, min=1)
        self.report = check_bool("report", report)
        self.log_dir = check_str("log_dir", log_dir, allow_none=True)
        self.fields = BatchFields(input_key, target_key, owner="UnlearningEvaluation")
        self.rows: list[dict[str, Any]] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(mia=self.mia)

    def retrained_metrics(self) -> Optional[dict[str, float]]:
        """The retrained model's metrics (read from the JSON file when ``retrained`` is a path)."""
        if self.retrained is None or isinstance(self.retrained, dict):
            return self.retrained
        with open(self.retrained) as handle:
            rows = json.load(handle)
        return dict(rows[-1] if isinstance(rows, list) else rows)

    # ------------------------------------------------------------------ evaluation
    def _datamodule(self, trainer: "pl.Trainer") -> Any:
        dm = getattr(trainer, "datamodule", None)
        if dm is None or not all(callable(getattr(dm, n, None)) for n in ("mia_datasets", "test_dataset")):
            raise RuntimeError(
                "UnlearningEvaluation needs a datamodule with `mia_datasets(task)` and `test_dataset(i)` (got "
                f"{type(dm).__name__}). Fix: use lightning_forget.datamodules.ForgetRetainDataModule."
            )
        return dm

    #: The task end edits nothing (rows are measured, not weights changed).
    task_end_edits_weights = False

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._datamodule(trainer)
            self.model_forward.check(pl_module)
            if isinstance(self.retrained, str):
                self.retrained_metrics()  # a missing or malformed file fails before training
            directory = reporting.results_dir(trainer, self.log_dir)  # every rank: trainer.log_dir broadcasts
            if self.report and trainer.is_global_zero:
                reporting.ensure_writable_dir(directory, "UnlearningEvaluation", "unlearning_metrics.csv/.json",
                                              "pass a writable `log_dir`, or `report=False`")
                reporting.output_paths(self, directory, _FILES)  # chosen now: never over another run's

    def evaluate(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> dict[str, float]:
        """The metrics of the model as it is now, for ``task``."""
        dm = self._datamodule(trainer)
        sets = dm.mia_datasets(task)
        datasets = {"forget": sets["forget"], "retain": sets["retain"], "test": dm.test_dataset(dm.num_tasks),
                    "heldout": sets["heldout"]}
        was_training = pl_module.training
        pl_module.eval()
        try:
            records = per_sample_records(trainer, pl_module, datasets, self.batch_size, self.fields, self.model_forward)
        finally:
            pl_module.train(was_training)
        return self.metrics_of(records)

    def metrics_of(self, records: dict[str, torch.Tensor]) -> dict[str, float]:
        """UA/RA/TA/MIA-efficacy/MIA AUC (and Avg. Gap) from :func:`per_sample_records`' output."""
        accuracy = {k: float(v[:, 0].mean()) if len(v) else math.nan for k, v in records.items()}
        forget, retain, test = records["forget"], records["retain"], records["test"]
        row = {"ua": 1.0 - accuracy["forget"], "ra": accuracy["retain"], "ta": accuracy["test"]}
        members = retain[: len(test), 1]
        if self.mia == "svc":
            row["mia_efficacy"] = mia_efficacy_svc(forget[:, 1], members, test[:, 1])
        else:
            row["mia_efficacy"] = mia_efficacy(forget[:, 1], members, test[:, 1])
        heldout = records["heldout"]
        row["mia_auc"] = mia_auc(-forget[:, 2], -heldout[:, 2]) if len(heldout) else math.nan
        retrained = self.retrained_metrics()
        if retrained is not None:
            row["avg_gap"] = avg_gap(row, retrained)
        return row

    # ------------------------------------------------------------------ hooks
    def on_task_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        if self.before:
            self.rows.append({"task": task, "epoch": "before", **self.evaluate(trainer, pl_module, task)})

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        from lightning_forget.tasks import task_schedule

        schedule = task_schedule(trainer)
        last = (schedule.is_last_epoch_of_task(trainer.current_epoch) if schedule is not None
                else trainer.current_epoch + 1 >= (trainer.max_epochs or 1))
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0 or last:
            task = self.current_task(trainer)
            row = self.evaluate(trainer, pl_module, task)
            self.rows.append({"task": task, "epoch": trainer.current_epoch, **row})
            for key, value in row.items():
                pl_module.log(f"mu/{key}", value, on_step=False, on_epoch=True)
        super().on_train_epoch_end(trainer, pl_module)

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_fit_end(trainer, pl_module)
        if not self.report or not self.rows:
            return
        directory = reporting.results_dir(trainer, self.log_dir)  # every rank: log_dir broadcasts
        if not trainer.is_global_zero:
            return
        from rich.console import Console

        Console().print(render_table(self.rows, title="Unlearning metrics (%)"))
        paths = write_rows(directory, self.rows, paths=reporting.output_paths(self, directory, _FILES))
        reporting.announce_results(trainer, "UnlearningEvaluation", paths)

    # ------------------------------------------------------------------ state
    def method_state(self) -> dict[str, Any]:
        return {"rows": [dict(r) for r in self.rows]}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.rows = [dict(r) for r in state["rows"]]
