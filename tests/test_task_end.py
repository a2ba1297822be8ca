"""Task ends as users meet them: in the checkpoint, before the reports, atomic, logged, resumed once.

Shared mechanism of :class:`~lightning_forget.tasks.ContinualCallback` (every method's task-end
work goes through it); the per-method rows are in ``tests/test_callback_contract_users.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_forget.callbacks import ContinualMetrics
from lightning_forget.tasks import ContinualCallback
from tests.helpers.data import BlobStream
from tests.helpers.harness import quiet_trainer, tiny_classifier


class ZeroHead(ContinualCallback):
    """At each task end: sets the classifier head to zero (every prediction becomes class 0) and logs."""

    def __init__(self, fail: bool = False, direct_log: bool = False) -> None:
        super().__init__()
        self.fail = fail
        self.direct_log = direct_log
        self.ends: list[int] = []

    def on_task_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: int) -> None:
        with torch.no_grad():
            pl_module.head.weight.zero_()
            pl_module.head.bias.zero_()
        self.log_task_metrics(trainer, pl_module, {"zero_head/task": task})
        if self.direct_log:  # Lightning refuses this in on_train_end, where task ends used to run
            pl_module.log("zero_head/direct", float(task))
        if self.fail:
            raise ValueError("edit failed")
        self.ends.append(task)

    def method_state(self) -> dict[str, Any]:
        return {"ends": list(self.ends)}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.ends = list(state["ends"])


def test_reports_measure_the_model_after_the_task_end_edit(tmp_path: Path) -> None:
    # The edit makes every prediction class 0: a task whose classes exclude 0 scores exactly 0.
    dm = BlobStream(num_tasks=2)
    model = tiny_classifier(dm)
    metrics = ContinualMetrics(report=False)
    trainer = quiet_trainer(tmp_path, [ZeroHead(), metrics], max_epochs=dm.max_epochs)
    trainer.fit(model, dm)
    assert metrics.matrix[1, 1].item() == 0.0  # task 1 = classes 2, 3: measured after the edit
    assert trainer.callback_metrics["val/acc/task_1"].item() == 0.0
    assert trainer.callback_metrics["zero_head/task"].item() == 1.0


def test_one_fit_per_task_checkpoint_holds_the_edit_and_logging_is_allowed(tmp_path: Path) -> None:
    dm = BlobStream(num_tasks=2)
    model = tiny_classifier(dm)
    callback = ZeroHead(direct_log=True)
    for task in range(2):
        trainer = quiet_trainer(tmp_path / str(task), [callback], enable_checkpointing=True, max_epochs=1)
        trainer.fit(model, dm.train_dataloader(), dm.val_dataloader())  # task 0's data twice: fine here
        checkpoint = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=False)
        assert torch.count_nonzero(checkpoint["state_dict"]["head.weight"]) == 0
        assert checkpoint["callbacks"][callback.state_key]["method"]["ends"] == list(range(task + 1))
        assert trainer.callback_metrics["zero_head/direct"].item() == float(task)


def test_a_failing_task_end_leaves_the_model_as_before(tmp_path: Path) -> None:
    dm = BlobStream(num_tasks=2)
    model = tiny_classifier(dm)
    callback = ZeroHead(fail=True)
    before: dict[str, torch.Tensor] = {}

    class Snapshot(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            before.update({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    trainer = quiet_trainer(tmp_path, [Snapshot(), callback], max_epochs=1)
    with pytest.raises(ValueError, match="edit failed"):
        trainer.fit(model, dm.train_dataloader())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert callback._ended == -1  # not ended: a retry runs the end again


def test_a_resume_runs_a_pending_task_end_once(tmp_path: Path) -> None:
    # A checkpoint whose task had not ended (written by an older release, or a fit stopped early)
    # and a resumed fit with nothing left to train: the end runs once, at fit end.
    dm = BlobStream(num_tasks=2)
    model = tiny_classifier(dm)
    callback = ZeroHead()
    trainer = quiet_trainer(tmp_path, [callback], enable_checkpointing=True, max_epochs=1)
    trainer.fit(model, dm.train_dataloader())
    path = trainer.checkpoint_callback.best_model_path
    checkpoint = torch.load(path, weights_only=False)
    state = checkpoint["callbacks"][callback.state_key]
    state["protocol"]["ended"] = state["protocol"]["reported"] = -1
    state["method"]["ends"] = []
    torch.save(checkpoint, path)
    resumed = ZeroHead()
    quiet_trainer(tmp_path, [resumed], max_epochs=1).fit(tiny_classifier(dm), dm.train_dataloader(), ckpt_path=path)
    assert resumed.ends == [0] and resumed._ended == 0
    quiet_trainer(tmp_path, [resumed], max_epochs=1).fit(tiny_classifier(dm), dm.train_dataloader(), ckpt_path=path)
    assert resumed.ends == [0]  # restored again from the same checkpoint: pending once more, run once


def test_validate_from_the_final_checkpoint_reports_the_average_over_every_task(tmp_path: Path) -> None:
    dm = BlobStream(num_tasks=3)
    model = tiny_classifier(dm)
    trainer = quiet_trainer(tmp_path, [ContinualMetrics(report=False)], max_epochs=dm.max_epochs, enable_checkpointing=True)
    trainer.fit(model, dm)
    path = trainer.checkpoint_callback.best_model_path
    fresh = quiet_trainer(tmp_path / "v", [ContinualMetrics(report=False)])
    results = fresh.validate(tiny_classifier(dm), dm, ckpt_path=path)[0]
    per_task = [results[f"val/acc/task_{t}"] for t in range(3)]
    assert results["val/acc_avg"] == pytest.approx(sum(per_task) / 3)


def test_classifier_adds_no_accuracy_matrix_on_a_forget_retain_stream(tmp_path: Path) -> None:
    from lightning_forget.datamodules import ForgetRetainDataModule
    from tests.test_callback_contract import _FORGET_DATA

    dm = ForgetRetainDataModule(**_FORGET_DATA, retain_only=True)
    dm.prepare_data()
    dm.setup("fit")
    model = tiny_classifier(dm, hidden_sizes=[8], report=True)
    trainer = quiet_trainer(tmp_path, [], max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(model, dm)
    assert not any(isinstance(cb, ContinualMetrics) for cb in trainer.callbacks)
    assert "val/acc_avg" not in trainer.callback_metrics and "val/acc/task_0" in trainer.callback_metrics


class _Phases(ContinualCallback):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, int]] = []

    def on_task_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: int) -> None:
        self.seen.append(("start", task))

    def on_task_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: int) -> None:
        self.seen.append(("end", task))

    def on_task_report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: int) -> None:
        self.seen.append(("report", task))


@pytest.mark.parametrize("stream", [{"joint": True}, {"task": 2}], ids=["joint", "fixed-task"])
def test_tasks_a_stream_skips_get_no_phase_and_no_row(tmp_path: Path, stream: dict[str, Any]) -> None:
    """A joint run trains every task at once (as the last), a fixed-task run one task: the tasks it
    skips are never started, ended or reported, so the matrix has one measured row and the printed
    table no empty or repeated rows."""
    from rich.console import Console

    from lightning_forget.reporting import render_accuracy_table

    dm = BlobStream(num_tasks=3, **stream)
    phases, metrics = _Phases(), ContinualMetrics(report=False)
    quiet_trainer(tmp_path, [phases, metrics], max_epochs=dm.max_epochs).fit(tiny_classifier(dm), dm)
    assert phases.seen == [("start", 2), ("end", 2), ("report", 2)]
    matrix = metrics.matrix
    assert torch.isnan(matrix[:2]).all() and torch.isfinite(matrix[2]).all()
    assert metrics.summary["forgetting"] is None and metrics.summary["average_accuracy"] == pytest.approx(matrix[2].mean().item())
    console = Console(width=200, record=True)
    console.print(render_accuracy_table(matrix, metrics.summary))
    text = console.export_text()
    rows = [line for line in text.splitlines() if line.strip().startswith("│ task")]
    assert [row.split("│")[1].strip() for row in rows] == ["task 2"]
    assert "no row for tasks 0, 1" in text
