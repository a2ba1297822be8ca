"""End-of-run reporting (rich table, JSON/CSV/PNG) and the ContinualMetrics callback."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_forget.callbacks.continual_metrics import ContinualMetrics
from lightning_forget.datamodules import ContinualDataModule
from lightning_forget.metrics import AccuracyMatrix, backward_transfer, forgetting
from lightning_forget.reporting import print_report, render_accuracy_table, summarize, write_report
from lightning_forget.tasks import current_task
from tests.helpers.harness import quiet_trainer

NAN = float("nan")
R3 = [[0.90, 0.10, 0.20], [0.60, 0.80, 0.30], [0.50, 0.70, 0.95]]
R_PARTIAL = [[0.90, None, None], [0.60, 0.80, None], [None, None, None]]


# ---------------------------------------------------------------------- reporting functions
def test_summarize_hand_computed() -> None:
    summary = summarize(R3)
    # ACC = (0.5 + 0.7 + 0.95) / 3; forgetting = ((0.9 - 0.5) + (0.8 - 0.7)) / 2 = 0.25;
    # BWT = ((0.5 - 0.9) + (0.7 - 0.8)) / 2 = -0.25; LA = (0.9 + 0.8 + 0.95) / 3
    assert math.isclose(summary["average_accuracy"], 2.15 / 3)
    assert math.isclose(summary["forgetting"], 0.25)
    assert math.isclose(summary["bwt"], -0.25)
    assert math.isclose(summary["learning_accuracy"], 2.65 / 3)
    assert summary["num_tasks"] == 3 and summary["tasks_trained"] == 3
    one = summarize([[0.8, None], [None, None]])
    assert one["forgetting"] is None and one["bwt"] is None and one["tasks_trained"] == 1
    json.dumps(one)  # JSON-ready


def test_render_and_print_table() -> None:
    console = Console(record=True, width=140)
    console.print(render_accuracy_table(R_PARTIAL, title="My run"))
    text = console.export_text()
    assert "My run" in text and "after training" in text and "task 2" in text
    assert "0.6000" in text and "0.8000" in text
    assert "Forgetting=0.3000" in text and "BWT=-0.3000" in text
    # unmeasured row 2 is not printed
    assert text.count("│ task ") == 2
    console = Console(record=True, width=140)
    print_report(R3, console=console)
    assert "0.9500" in console.export_text()


def test_write_report_files(tmp_path: Path) -> None:
    paths = write_report(tmp_path / "run", R_PARTIAL, extra={"method": "er", "loss": NAN})
    assert {path.name for path in paths.values()} == {"metrics.json", "accuracy_matrix.csv", "accuracy_matrix.png"}
    payload = json.loads(paths["json"].read_text())
    assert payload["accuracy_matrix"] == [[0.9, None, None], [0.6, 0.8, None], [None, None, None]]
    assert math.isclose(payload["summary"]["forgetting"], 0.3)
    assert payload["extra"] == {"method": "er", "loss": None}
    rows = list(csv.reader(paths["csv"].open()))
    assert rows[0] == ["", "task 0", "task 1", "task 2"]
    assert rows[1] == ["after task 0", "0.9", "", ""]
    assert rows[2][0] == "after task 1" and float(rows[2][2]) == 0.8
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    prefixed = write_report(tmp_path / "run", R3, summarize(R3), prefix="er_")
    assert prefixed["csv"].name == "er_accuracy_matrix.csv" and paths["csv"].exists()


# ---------------------------------------------------------------------- a tiny continual setup
class ThreeTasks(ContinualDataModule):
    """3 tasks × 2 classes of Gaussian blobs in 4-D."""

    def __init__(self, epochs_per_task: int = 1) -> None:
        super().__init__(num_tasks=3, epochs_per_task=epochs_per_task, batch_size=16)
        gen = torch.Generator().manual_seed(0)
        centres = 2.5 * torch.randn(6, 4, generator=gen)
        self.data = {}
        for split, n in (("train", 24), ("val", 12)):
            xs = torch.cat([centres[c] + torch.randn(n, 4, generator=gen) for c in range(6)])
            ys = torch.arange(6).repeat_interleave(n)
            self.data[split] = (xs, ys)

    def _task(self, split: str, task: int) -> TensorDataset:
        x, y = self.data[split]
        keep = (y // 2) == task
        return TensorDataset(x[keep], y[keep])

    def train_dataset(self, task: int) -> TensorDataset:
        return self._task("train", task)

    def val_dataset(self, task: int) -> TensorDataset:
        return self._task("val", task)


class TaskAccModule(pl.LightningModule):
    """Linear classifier logging its accuracy per validation dataloader (= task).

    ``style="template"`` logs ``val/acc/task_{j}`` from ``on_validation_epoch_end`` (values from
    an :class:`AccuracyMatrix`); ``style="suffix"`` logs ``val_acc`` from ``validation_step`` and
    lets Lightning add ``/dataloader_idx_{j}``. ``history[task]`` keeps the last row logged.
    """

    def __init__(self, style: str = "template", lr: float = 0.3) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 6)
        self.style = style
        self.lr = lr
        self.acc = AccuracyMatrix(num_tasks=3)
        self.history: dict[int, torch.Tensor] = {}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.layer(x), y)

    def on_validation_epoch_start(self) -> None:
        self.acc.reset_row(current_task(self.trainer))

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        logits = self.layer(x)
        self.acc.update(logits, y, train_task=current_task(self.trainer), eval_task=dataloader_idx)
        if self.style == "suffix":
            correct = (logits.argmax(1) == y).float().mean()
            self.log("val_acc", correct, batch_size=len(y), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        task = current_task(self.trainer)
        row = self.acc.compute()[task]
        self.history[task] = row.clone()
        if self.style == "template":
            for j in torch.isfinite(row).nonzero().flatten().tolist():
                self.log(f"val/acc/task_{j}", row[j], add_dataloader_idx=False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def make_trainer(tmp_path: Path, callbacks: list[Callback], max_epochs: int, **kwargs: Any) -> pl.Trainer:
    # The shared harness with a CSV logger (these tests read what the loggers received).
    kwargs.setdefault("logger", CSVLogger(str(tmp_path), name="logs"))
    kwargs.setdefault("num_sanity_val_steps", 0)
    return quiet_trainer(tmp_path, callbacks, max_epochs=max_epochs, **kwargs)


def expected_matrix(history: dict[int, torch.Tensor], size: int) -> torch.Tensor:
    expected = torch.full((size, size), NAN, dtype=torch.float64)
    for task, row in history.items():
        expected[task] = row[:size].double()
    return expected


def test_continual_metrics_one_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pl.seed_everything(0)
    dm, model, callback = ThreeTasks(epochs_per_task=2), TaskAccModule(), ContinualMetrics()
    trainer = make_trainer(tmp_path, [callback], dm.max_epochs)
    trainer.fit(model, datamodule=dm)

    # rows are the values logged at each task's last validation (template key, no suffix)
    assert sorted(model.history) == [0, 1, 2]
    torch.testing.assert_close(callback.matrix, expected_matrix(model.history, 3), equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(callback.matrix.float(), model.acc.compute(), equal_nan=True)
    assert torch.isfinite(callback.matrix).all()  # every task evaluated after every task
    summary = callback.summary
    assert math.isclose(summary["forgetting"], forgetting(callback.matrix))
    # the last logged summary is the final one
    assert math.isclose(float(trainer.callback_metrics["cl/forgetting"]), summary["forgetting"], rel_tol=1e-6)
    assert math.isclose(float(trainer.callback_metrics["cl/bwt"]), backward_transfer(callback.matrix), rel_tol=1e-6)
    assert math.isclose(float(trainer.callback_metrics["cl/acc_avg"]), summary["average_accuracy"], rel_tol=1e-6)

    # the report: printed once, files in the logger's directory
    out = capsys.readouterr().out
    assert out.count("Accuracy matrix after task 2") == 1 and "Accuracy matrix after task 1" not in out
    log_dir = Path(trainer.log_dir)
    payload = json.loads((log_dir / "metrics.json").read_text())
    assert payload["summary"]["tasks_trained"] == 3 and payload["extra"]["key"] == "val/acc/task_{task}"
    assert torch.allclose(torch.tensor(payload["accuracy_matrix"], dtype=torch.float64), callback.matrix)
    assert (log_dir / "accuracy_matrix.csv").exists() and (log_dir / "accuracy_matrix.png").exists()
    logged = list(csv.DictReader((log_dir / "metrics.csv").open()))
    assert any(row.get("cl/bwt") for row in logged)  # went through the logger


def test_continual_metrics_dataloader_suffix_key(tmp_path: Path) -> None:
    pl.seed_everything(0)
    dm, model = ThreeTasks(), TaskAccModule(style="suffix")
    callback = ContinualMetrics(key="val_acc", report=False)
    trainer = make_trainer(tmp_path, [callback], dm.max_epochs, logger=False)
    trainer.fit(model, datamodule=dm)
    # Lightning's batch-size-weighted mean of per-batch accuracies = the counted accuracy
    torch.testing.assert_close(callback.matrix, expected_matrix(model.history, 3), equal_nan=True)
    assert not list(tmp_path.rglob("metrics.json"))  # report=False writes nothing


def fit_task(tmp_path: Path, callback: ContinualMetrics, model: TaskAccModule, dm: ThreeTasks, task: int) -> pl.Trainer:
    """One fit per task: train on ``task``, validate on every task seen so far."""
    trainer = make_trainer(tmp_path, [callback], max_epochs=1)
    trainer.fit(
        model,
        train_dataloaders=DataLoader(dm.train_dataset(task), batch_size=16, shuffle=True),
        val_dataloaders=[DataLoader(dm.val_dataset(t), batch_size=16) for t in range(task + 1)],
    )
    return trainer


def test_continual_metrics_one_fit_per_task(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pl.seed_everything(0)
    dm, model, callback = ThreeTasks(), TaskAccModule(), ContinualMetrics(filename_prefix="seq_")
    for task in range(3):
        trainer = fit_task(tmp_path, callback, model, dm, task)
        # the matrix grows: the number of tasks is not known in this mode
        assert callback.matrix.shape == (task + 1, task + 1)
        expected = expected_matrix(model.history, task + 1)
        torch.testing.assert_close(callback.matrix, expected, equal_nan=True, rtol=0, atol=0)
        # every fit may be the last: report at each task end
        payload = json.loads((Path(trainer.log_dir) / "seq_metrics.json").read_text())
        assert payload["summary"]["tasks_trained"] == task + 1
        assert f"Accuracy matrix after task {task}" in capsys.readouterr().out
    assert callback.task == 2
    assert torch.isfinite(callback.matrix.tril()).all() and torch.isnan(callback.matrix[0, 1:]).all()
    # on_train_end forbids self.log: the values reach the logger and callback_metrics directly
    assert math.isclose(float(trainer.callback_metrics["cl/forgetting"]), forgetting(callback.matrix), rel_tol=1e-6)
    logged = list(csv.DictReader((Path(trainer.log_dir) / "metrics.csv").open()))
    assert any(row.get("cl/bwt") for row in logged)


def test_continual_metrics_state_dict_resume(tmp_path: Path) -> None:
    pl.seed_everything(0)
    dm, model, first = ThreeTasks(), TaskAccModule(), ContinualMetrics(report=False)
    for task in range(2):
        fit_task(tmp_path, first, model, dm, task)
    state = first.state_dict()
    assert state["version"] == 1 and state["method"]["matrix"].shape == (2, 2) and state["method"]["matrix"].device.type == "cpu"
    assert first.state_key == "ContinualMetrics{'key': 'val/acc/task_{task}'}"
    resumed = ContinualMetrics(report=False)
    resumed.load_state_dict(state)
    torch.testing.assert_close(resumed.matrix, first.matrix, equal_nan=True)
    fit_task(tmp_path, resumed, model, dm, 2)  # the third task, after a "restart"
    assert resumed.task == 2
    torch.testing.assert_close(resumed.matrix[:2, :2], first.matrix, equal_nan=True)
    torch.testing.assert_close(resumed.matrix[2], model.history[2].double(), equal_nan=True)


def test_continual_metrics_checkpoint_resume_matches_uninterrupted(tmp_path: Path) -> None:
    pl.seed_everything(0)
    dm, model, full = ThreeTasks(), TaskAccModule(), ContinualMetrics(report=False)
    checkpoints = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), filename="{epoch}", save_top_k=-1)
    trainer = make_trainer(tmp_path, [full, checkpoints], dm.max_epochs, enable_checkpointing=True, logger=False)
    trainer.fit(model, datamodule=dm)

    saved = torch.load(tmp_path / "ckpt" / "epoch=1.ckpt", weights_only=False)
    assert saved["callbacks"][full.state_key]["method"]["matrix"].shape == (3, 3)  # rows 0-1 in the checkpoint
    resumed = ContinualMetrics(report=False)
    trainer = make_trainer(tmp_path, [resumed], dm.max_epochs, logger=False)
    trainer.fit(TaskAccModule(), datamodule=ThreeTasks(), ckpt_path=str(tmp_path / "ckpt" / "epoch=1.ckpt"))
    torch.testing.assert_close(resumed.matrix, full.matrix, equal_nan=True)


def test_continual_metrics_warns_without_matching_key(tmp_path: Path) -> None:
    pl.seed_everything(0)
    dm, model = ThreeTasks(), TaskAccModule()
    callback = ContinualMetrics(key="val/accuracy/{task}")
    trainer = make_trainer(tmp_path, [callback], dm.max_epochs, logger=False)
    with pytest.warns(UserWarning, match="no logged metric matches key='val/accuracy/{task}'"):
        trainer.fit(model, datamodule=dm)
    assert callback.matrix.numel() == 0 and not list(tmp_path.rglob("metrics.json"))


def test_continual_metrics_constructor_errors() -> None:
    with pytest.raises(ValueError, match=r"key.*exactly one '\{task\}'"):
        ContinualMetrics(key="val/acc/{t}")
    with pytest.raises(ValueError, match="key"):
        ContinualMetrics(key="val/acc/{task}/{task}")
    with pytest.raises(ValueError, match="not a valid format template"):
        ContinualMetrics(key="val/acc/{")
    with pytest.raises(TypeError, match="key"):
        ContinualMetrics(key="")
    with pytest.raises(TypeError, match="report"):
        ContinualMetrics(report="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="filename_prefix"):
        ContinualMetrics(filename_prefix=None)  # type: ignore[arg-type]


class GatherMatrix(Callback):
    """Collect every rank's ContinualMetrics matrix at the end of the fit (rank 0 saves them)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = next(cb for cb in trainer.callbacks if isinstance(cb, ContinualMetrics))
        gathered = trainer.strategy.all_gather(metrics.matrix)
        # The rows the module logged at each task's last validation (synced AccuracyMatrix values).
        logged = torch.stack([pl_module.history[t] for t in sorted(pl_module.history)])
        # Each rank's own counts: their sum over ranks is what the synced matrix divides by.
        totals = trainer.strategy.all_gather(pl_module.acc.total)
        if trainer.is_global_zero:
            torch.save({"gathered": gathered, "module": logged, "totals": totals}, self.path)


@pytest.mark.ddp
def test_continual_metrics_ddp_identical_on_ranks(tmp_path: Path) -> None:
    pl.seed_everything(0)
    dm, model = ThreeTasks(), TaskAccModule()
    callbacks = [ContinualMetrics(), GatherMatrix(str(tmp_path / "gathered.pt"))]
    trainer = make_trainer(tmp_path, callbacks, dm.max_epochs, devices=2, strategy="ddp_spawn", logger=False)
    trainer.fit(model, datamodule=dm)
    result = torch.load(tmp_path / "gathered.pt")
    gathered = result["gathered"]
    assert gathered.shape == (2, 3, 3)
    torch.testing.assert_close(gathered[0], gathered[1], equal_nan=True, rtol=0, atol=0)
    # the callback holds exactly the global accuracies the module logged at each task end
    torch.testing.assert_close(gathered[0].float(), result["module"], equal_nan=True)
    # every cell counted each validation sample of its task exactly once across the two ranks
    # (ddp_spawn once shared the counters' memory between ranks, doubling a row)
    assert torch.equal(result["totals"].sum(dim=0), torch.full((3, 3), 24))
    assert (tmp_path / "metrics.json").exists()  # no logger: default_root_dir (reporting.results_dir)


def test_continual_metrics_skips_task_without_validation(tmp_path: Path) -> None:
    pl.seed_everything(0)
    dm, model, callback = ThreeTasks(), TaskAccModule(), ContinualMetrics(report=False)
    # validation only at epoch 2: tasks 0 and 1 end without a fresh evaluation
    trainer = make_trainer(tmp_path, [callback], dm.max_epochs, logger=False, check_val_every_n_epoch=3)
    with pytest.warns(UserWarning, match="no validation ran during task 0"):
        trainer.fit(model, datamodule=dm)
    assert torch.isnan(callback.matrix[:2]).all()
    torch.testing.assert_close(callback.matrix[2], model.history[2].double(), equal_nan=True)


def test_row_survives_a_checkpoint_written_at_validation_end(tmp_path) -> None:
    """ModelCheckpoint(save_on_train_epoch_end=False) saves before the task's end fires; the
    resumed run must still fill that task's row (from the checkpointed state)."""
    from lightning_forget.callbacks import ContinualMetrics
    from tests.helpers.harness import run_stream

    make = lambda: ContinualMetrics(report=False)  # noqa: E731
    _, full = run_stream(tmp_path / "full", make)
    _, resumed = run_stream(tmp_path / "resumed", make, resume_after_epoch=1, save_on_train_epoch_end=False)
    assert not torch.isnan(full.matrix).any()
    assert torch.equal(full.matrix, resumed.matrix)


def test_an_unwritable_report_folder_fails_in_setup_before_training(tmp_path: Any) -> None:
    # A file where the folder should be: creating the folder fails (os.access alone would not
    # notice read-only mounts when running as root).
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    from lightning_forget.callbacks import ContinualMetrics
    from tests.helpers.data import BlobStream
    from tests.helpers.harness import tiny_classifier

    dm = BlobStream(num_tasks=2)
    model = tiny_classifier(dm)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = quiet_trainer(tmp_path, [ContinualMetrics(log_dir=str(blocker / "report"))], max_epochs=dm.max_epochs)
    with pytest.raises(RuntimeError, match="log_dir"):
        trainer.fit(model, dm)
    assert trainer.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_ensure_writable_dir_creates_the_folder(tmp_path: Any) -> None:
    from lightning_forget.reporting import ensure_writable_dir

    target = tmp_path / "a" / "b"
    ensure_writable_dir(target, "X", "files", "fix")
    assert target.is_dir() and not any(target.iterdir())


# ---------------------------------------------------------------------- continual-evaluation writers
from lightning_forget.metrics.stability import as_curves  # noqa: E402
from lightning_forget.reporting import (  # noqa: E402
    accuracy_heatmap,
    log_figure,
    stability_gap_figure,
    write_stability_csv,
    write_stability_plot,
)
from tests.helpers.loggers import ImageLogger, RecordingMLFlow, RecordingTensorBoard  # noqa: E402

# task 0 ends at step 4, task 1 at step 8; NaN = not evaluated (not seen yet)
CURVES = as_curves(
    [2, 4, 6, 8, 10],
    [[0.5, NAN, NAN], [0.9, NAN, NAN], [0.6, 0.4, NAN], [0.3, 0.8, NAN], [0.7, 0.5, 0.6]],
    [4, 8],
)


def test_write_stability_csv_rows(tmp_path: Path) -> None:
    path = write_stability_csv(tmp_path / "continual_eval.csv", CURVES)
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["step", "train_task", "task", "acc"]
    # one row per evaluated (step, task); the task-end evaluation still belongs to the ending task
    assert rows[1:] == [
        ["2", "0", "0", "0.500000"], ["4", "0", "0", "0.900000"],
        ["6", "1", "0", "0.600000"], ["6", "1", "1", "0.400000"],
        ["8", "1", "0", "0.300000"], ["8", "1", "1", "0.800000"],
        ["10", "2", "0", "0.700000"], ["10", "2", "1", "0.500000"], ["10", "2", "2", "0.600000"],
    ]


def test_stability_plot_written_and_returned(tmp_path: Path) -> None:
    figure = write_stability_plot(tmp_path / "stability_gap.png", CURVES, title="gap")
    png = (tmp_path / "stability_gap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    axes = figure.axes[0]
    assert axes.get_title() == "gap" and len(axes.get_lines()) == 3 + 2  # one curve per task, one line per switch
    assert [line.get_xdata()[0] for line in axes.get_lines()[3:]] == [4, 8]
    assert stability_gap_figure(CURVES).axes[0].get_title() == "Continual evaluation"


def test_accuracy_heatmap_is_the_reports_png(tmp_path: Path) -> None:
    figure = accuracy_heatmap(R3, title="after task 2")
    assert figure.axes[0].get_title().startswith("after task 2\nACC ")
    assert figure.axes[0].images[0].get_array().shape == (3, 3)


# ---------------------------------------------------------------------- figures to the loggers
def _figure_trainer(tmp_path: Path, loggers: list[Any]) -> pl.Trainer:
    return quiet_trainer(tmp_path, [], logger=loggers, enable_checkpointing=True, reload_dataloaders_every_n_epochs=0, deterministic=False)


def test_log_figure_reaches_tensorboard_mlflow_and_log_image_loggers(tmp_path: Path, caplog: Any) -> None:
    csv_logger, image, board, mlflow = CSVLogger(str(tmp_path)), ImageLogger(), RecordingTensorBoard(str(tmp_path)), RecordingMLFlow()
    trainer = _figure_trainer(tmp_path, [csv_logger, image, board, mlflow])
    figure = stability_gap_figure(CURVES)
    with caplog.at_level("DEBUG", logger="lightning_forget.reporting"):
        received = log_figure(trainer, figure, "eval/stability_gap", step=7)
    assert received == [image, board, mlflow]
    assert board.writer.calls == [("eval/stability_gap", figure, 7)]
    assert mlflow.client.calls == [("run-1", figure, "eval/stability_gap_step7.png")]
    [(key, images, step)] = image.images
    assert (key, step, len(images)) == ("eval/stability_gap", 7, 1)
    width, height = figure.canvas.get_width_height()
    assert images[0].shape == (height, width, 3) and images[0].dtype.name == "uint8" and images[0].std() > 0
    # the CSV logger cannot hold images: one debug line, no warning
    assert [r.levelname for r in caplog.records if "CSVLogger" in r.getMessage()] == ["DEBUG"]


def test_log_figure_builds_lazily_and_only_on_rank_zero(tmp_path: Path, recwarn: Any) -> None:
    built: list[int] = []

    def build() -> Any:
        built.append(1)
        return accuracy_heatmap(R3)

    assert log_figure(_figure_trainer(tmp_path, [CSVLogger(str(tmp_path))]), build, "cl/accuracy_matrix") == []
    assert built == [] and not [w for w in recwarn if "image" in str(w.message)]
    other_rank = type("T", (), {"is_global_zero": False, "global_step": 3, "loggers": [ImageLogger()]})()
    assert log_figure(other_rank, build, "cl/accuracy_matrix") == [] and built == []
    board = RecordingTensorBoard(str(tmp_path))
    trainer = _figure_trainer(tmp_path, [board])
    assert log_figure(trainer, build, "cl/accuracy_matrix") == [board] and built == [1]
    assert board.writer.calls[0][0] == "cl/accuracy_matrix" and board.writer.calls[0][2] == 0  # global_step


def test_continual_metrics_sends_the_heatmap_to_the_loggers(tmp_path: Path) -> None:
    pl.seed_everything(0)
    dm, model, callback = ThreeTasks(), TaskAccModule(), ContinualMetrics()
    image, board = ImageLogger(), RecordingTensorBoard(str(tmp_path / "tb"))
    loggers = [CSVLogger(str(tmp_path), name="logs"), image, board]
    trainer = make_trainer(tmp_path, [callback], dm.max_epochs, logger=loggers)
    trainer.fit(model, datamodule=dm)
    assert [(key, step) for key, _, step in image.images] == [("cl/accuracy_matrix", trainer.global_step)]
    [(tag, figure, step)] = board.writer.calls
    assert (tag, step) == ("cl/accuracy_matrix", trainer.global_step)
    assert figure.axes[0].get_title().startswith("Accuracy matrix after task 2")
    assert (Path(trainer.log_dir) / "accuracy_matrix.png").exists()  # besides the PNG file


# ---------------------------------------------------------------------- NaN accuracies (e16)
class NanAccModule(TaskAccModule):
    """Logs NaN for every task's accuracy (an empty or diverged evaluation)."""

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            for j in range(current_task(self.trainer) + 1):
                self.log(f"val/acc/task_{j}", float("nan"), add_dataloader_idx=False)


def test_all_nan_accuracies_warn_and_still_write_the_report(tmp_path: Path) -> None:
    pl.seed_everything(0)
    dm, callback = ThreeTasks(), ContinualMetrics()
    trainer = make_trainer(tmp_path, [callback], dm.max_epochs)
    with pytest.warns(UserWarning, match="every accuracy .* is NaN"):
        trainer.fit(NanAccModule(), datamodule=dm)  # used to raise in max() of an empty tensor
    assert callback.matrix.shape == (3, 3) and torch.isnan(callback.matrix).all()
    payload = json.loads((Path(trainer.log_dir) / "metrics.json").read_text())
    assert payload["accuracy_matrix"] == [[None] * 3] * 3 and payload["summary"]["average_accuracy"] is None
    assert (Path(trainer.log_dir) / "accuracy_matrix.png").exists()


def test_on_fit_end_with_an_all_nan_matrix_writes_nothing_and_does_not_crash() -> None:
    callback = ContinualMetrics(report=False)
    callback._matrix = torch.full((2, 2), NAN, dtype=torch.float64)
    callback.on_fit_end(None, None)  # type: ignore[arg-type]  # used to raise RuntimeError from max()
    assert callback._reported == -1
