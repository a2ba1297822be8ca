"""The task protocol in both modes: one fit over a stream, and one fit per task."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_forget.tasks import ContinualCallback, current_task
from tests.helpers.data import BlobStream
from tests.helpers.harness import quiet_trainer, run_stream, tiny_classifier


class Recorder(ContinualCallback):
    """Records task events and the task seen by `current_task` at each training batch."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, int, int]] = []
        self.batch_tasks: set[tuple[int, int]] = set()

    def on_task_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: int) -> None:
        self.events.append(("start", task, trainer.current_epoch))

    def on_task_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: int) -> None:
        self.events.append(("end", task, trainer.current_epoch))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        task = current_task(trainer)
        self.batch_tasks.update((task, int(label) // 2) for label in batch[1])


def test_one_fit_over_a_stream_fires_each_boundary_once(tmp_path: Any) -> None:
    dm = BlobStream(num_tasks=3, epochs_per_task=2)
    recorder = Recorder()
    quiet_trainer(tmp_path, [recorder], max_epochs=dm.max_epochs).fit(tiny_classifier(dm), dm)
    assert recorder.events == [
        ("start", 0, 0), ("end", 0, 1), ("start", 1, 2), ("end", 1, 3), ("start", 2, 4), ("end", 2, 5),
    ]
    # current_task(trainer) agrees with the classes of the batches being trained.
    assert {task for task, _ in recorder.batch_tasks} == {0, 1, 2}
    assert all(task == cls_task for task, cls_task in recorder.batch_tasks)


def test_one_fit_per_task_with_plain_loaders(tmp_path: Any) -> None:
    stream = BlobStream(num_tasks=3)
    model = tiny_classifier(stream)
    recorder = Recorder()
    for task in range(3):
        trainer = quiet_trainer(tmp_path / str(task), [recorder], max_epochs=1, reload_dataloaders_every_n_epochs=0)
        loaders = [DataLoader(stream.val_dataset(t), batch_size=8) for t in range(task + 1)]
        trainer.fit(model, DataLoader(stream.train_dataset(task), batch_size=8), loaders)
        assert recorder.task == task
    assert [(kind, task) for kind, task, _ in recorder.events] == [
        ("start", 0), ("end", 0), ("start", 1), ("end", 1), ("start", 2), ("end", 2),
    ]
    assert all(task == cls_task for task, cls_task in recorder.batch_tasks)
    # The accuracy matrix of the module has one row per fit.
    matrix = model.val_matrix.compute()
    assert not matrix[2, :3].isnan().any() and matrix[0, 1:].isnan().all()


def test_task_counter_survives_state_round_trip() -> None:
    recorder = Recorder()
    recorder.task, recorder._started, recorder._ended = 2, 2, 1
    other = Recorder()
    other.load_state_dict(recorder.state_dict())
    assert (other.task, other._started, other._ended) == (2, 2, 1)


def test_resumed_stream_does_not_restart_a_task(tmp_path: Any) -> None:
    made: list[Recorder] = []

    def make() -> Recorder:
        made.append(Recorder())
        return made[-1]

    run_stream(tmp_path, make, resume_after_epoch=1)  # checkpoint after the last epoch of task 0
    assert [(kind, task) for kind, task, _ in made[-1].events] == [("start", 1), ("end", 1), ("start", 2), ("end", 2)]
    # A checkpoint written at validation end (before on_train_epoch_end) already holds task 0's
    # end, which fires after the task's last batch: the resumed run does not end it again.
    run_stream(tmp_path / "val_end", make, resume_after_epoch=1, save_on_train_epoch_end=False)
    assert [(kind, task) for kind, task, _ in made[-1].events] == [("start", 1), ("end", 1), ("start", 2), ("end", 2)]
    run_stream(tmp_path / "mid", make, resume_after_epoch=2)  # checkpoint in the middle of task 1
    assert [(kind, task) for kind, task, _ in made[-1].events] == [("end", 1), ("start", 2), ("end", 2)]


def test_missing_dataloader_reload_is_a_clear_error(tmp_path: Any) -> None:
    dm = BlobStream()
    trainer = quiet_trainer(tmp_path, [Recorder()], max_epochs=dm.max_epochs, reload_dataloaders_every_n_epochs=0)
    with pytest.raises(RuntimeError, match="reload_dataloaders_every_n_epochs=1"):
        trainer.fit(tiny_classifier(dm), dm)


def test_joint_mode_trains_everything_as_the_last_task(tmp_path: Any) -> None:
    dm = BlobStream(joint=True, epochs_per_task=2)
    recorder = Recorder()
    model = tiny_classifier(dm)
    quiet_trainer(tmp_path, [recorder], max_epochs=dm.max_epochs).fit(model, dm)
    assert [(kind, task) for kind, task, _ in recorder.events] == [("start", 2), ("end", 2)]
    assert {cls_task for _, cls_task in recorder.batch_tasks} == {0, 1, 2}
    assert not model.val_matrix.compute()[2].isnan().any()


class RankStamp(ContinualCallback):
    """Holds a tensor made before `fit`; every rank writes its rank into it, then reads it back."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.stamp = torch.zeros(1)
        self.nested = {"rows": [torch.zeros(2)]}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        rank = trainer.global_rank
        self.stamp.fill_(rank)
        self.nested["rows"][0].fill_(rank)
        trainer.strategy.barrier()  # both ranks have written before either reads
        seen = torch.stack([self.stamp[0], self.nested["rows"][0][0]])
        gathered = trainer.strategy.all_gather(seen)
        if trainer.is_global_zero:
            torch.save(gathered, self.path)


@pytest.mark.ddp
def test_callback_tensors_are_private_to_each_rank_under_ddp_spawn(tmp_path: Any) -> None:
    """torch.multiprocessing puts pickled CPU tensors in shared memory: without `unshare_memory`
    in `setup`, rank 0 would read rank 1's write (one storage for both)."""
    path = str(tmp_path / "stamps.pt")
    dm = BlobStream(num_tasks=2, epochs_per_task=1)
    trainer = quiet_trainer(tmp_path, [RankStamp(path)], max_epochs=1, devices=2, strategy="ddp_spawn")
    trainer.fit(tiny_classifier(dm), datamodule=dm)
    assert torch.equal(torch.load(path), torch.tensor([[0.0, 0.0], [1.0, 1.0]]))


def test_unshare_memory_copies_only_shared_tensors() -> None:
    from lightning_forget.buffers import ReservoirBuffer
    from lightning_forget.distributed import unshare_memory

    callback = Recorder()
    private = torch.ones(3)
    callback.shared = torch.arange(4.0).share_memory_()
    callback.private = private
    callback.containers = {"a": [torch.zeros(2).share_memory_()], "b": (torch.ones(1).share_memory_(), 5)}
    callback.buffer = ReservoirBuffer(capacity=4)
    callback.buffer.probe = torch.full((2,), 7.0).share_memory_()
    unshare_memory(callback)
    assert not callback.shared.is_shared() and torch.equal(callback.shared, torch.arange(4.0))
    assert callback.private is private  # untouched
    assert not callback.containers["a"][0].is_shared()
    assert not callback.containers["b"][0].is_shared() and callback.containers["b"][1] == 5
    assert not callback.buffer.probe.is_shared() and torch.equal(callback.buffer.probe, torch.full((2,), 7.0))


def test_one_fit_per_task_under_ddp_spawn_warns_that_state_stays_in_workers(tmp_path: Any) -> None:
    """ddp_spawn returns only weights and metrics to the main process: a second fit per task
    would restart at task 0 with empty state (seen: task counter 0 and an empty buffer after a
    ddp_spawn fit). The hook runs in the worker; here it is called directly."""
    trainer = quiet_trainer(tmp_path, [], devices=2, strategy="ddp_spawn", max_epochs=1)
    callback = Recorder()
    with pytest.warns(UserWarning, match='strategy="ddp"'):
        callback.setup(trainer, tiny_classifier(BlobStream()), "fit")
    single = quiet_trainer(tmp_path, [], max_epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        callback.setup(single, tiny_classifier(BlobStream()), "fit")


@pytest.mark.ddp
def test_replay_and_metrics_start_under_ddp_spawn_with_default_sharing(tmp_path: Any) -> None:
    """A user's process keeps torch's default (file-descriptor) sharing, which cannot carry a
    torch.Generator into a spawn worker; the test process uses file_system, so run a script."""
    script = tmp_path / "run.py"
    script.write_text(
        "import torch\n"
        "from torch.utils.data import DataLoader, TensorDataset\n"
        "import lightning.pytorch as pl\n"
        "from lightning_forget.callbacks import ContinualMetrics, ExperienceReplay\n"
        "from lightning_forget.modules import ContinualClassifier\n"
        "if __name__ == '__main__':\n"
        "    assert torch.multiprocessing.get_sharing_strategy() == 'file_descriptor'\n"
        "    x, y = torch.randn(32, 4), torch.randint(0, 4, (32,))\n"
        "    model = ContinualClassifier(num_classes=4, num_tasks=2, input_shape=[4], hidden_sizes=[8], report=False)\n"
        "    trainer = pl.Trainer(accelerator='cpu', devices=2, strategy='ddp_spawn', max_epochs=1, logger=False,\n"
        "                         enable_checkpointing=False, enable_progress_bar=False,\n"
        "                         callbacks=[ExperienceReplay(buffer_size=8), ContinualMetrics(report=False)])\n"
        "    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=8))\n"
        "    print('FIT-DONE')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 0 and "FIT-DONE" in out.stdout, out.stderr[-3000:]


def test_max_steps_short_of_the_stream_warns_and_ends_the_last_task(tmp_path: Any) -> None:
    # 3 tasks x 2 epochs x 6 batches = 36 steps; stopping at 27 is inside task 2 (issue 8 A7).
    dm = BlobStream(num_tasks=3, epochs_per_task=2)
    recorder = Recorder()
    trainer = quiet_trainer(tmp_path, [recorder], max_steps=27)
    with pytest.warns(UserWarning, match="max_steps=27") as caught:
        trainer.fit(tiny_classifier(dm), dm)
    assert any("middle of task 2" in str(w.message) for w in caught)
    assert [(kind, task) for kind, task, _ in recorder.events][-2:] == [("start", 2), ("end", 2)]


def test_max_epochs_past_the_stream_warns(tmp_path: Any) -> None:
    dm = BlobStream(num_tasks=2, epochs_per_task=1)
    recorder = Recorder()
    trainer = quiet_trainer(tmp_path, [recorder], max_epochs=3)
    with pytest.warns(UserWarning, match="max_epochs=3") as caught:
        trainer.fit(tiny_classifier(dm), dm)
    assert any("past the end of the stream" in str(w.message) for w in caught)
    assert [(kind, task) for kind, task, _ in recorder.events] == [("start", 0), ("end", 0), ("start", 1), ("end", 1)]


def test_matching_stream_length_does_not_warn(tmp_path: Any) -> None:
    dm = BlobStream(num_tasks=2, epochs_per_task=1)
    trainer = quiet_trainer(tmp_path, [Recorder()], max_epochs=dm.max_epochs)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(stream|middle of task).*")
        trainer.fit(tiny_classifier(dm), dm)


def test_one_fit_per_task_with_default_sanity_check(tmp_path: Any) -> None:
    # Lightning's default num_sanity_val_steps=2 runs before on_train_start (issue 8 A4).
    stream = BlobStream(num_tasks=3)
    model = tiny_classifier(stream)
    recorder = Recorder()
    for task in range(3):
        trainer = quiet_trainer(tmp_path / str(task), [recorder], max_epochs=1, reload_dataloaders_every_n_epochs=0)
        assert trainer.num_sanity_val_steps == 2
        loaders = [DataLoader(stream.val_dataset(t), batch_size=4) for t in range(task + 1)]
        trainer.fit(model, DataLoader(stream.train_dataset(task), batch_size=8), loaders)
    assert model.val_matrix.total.tolist() == [[24, 0, 0], [24, 24, 0], [24, 24, 24]]
