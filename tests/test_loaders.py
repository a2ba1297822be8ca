"""The library's loaders: exact mid-epoch resume (through Lightning's loader state) and no draws
from the global torch RNG."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_forget.datamodules import SplitDigits
from lightning_forget.datamodules.loaders import ResumableDataLoader
from tests.helpers.data import BlobStream
from tests.helpers.harness import params_vector, quiet_trainer, tiny_classifier


class BatchLog(Callback):
    """Records what every training batch held: (epoch, batch_idx, labels, sum of inputs)."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, int, tuple[int, ...], float]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.batches.append((trainer.current_epoch, batch_idx, tuple(y.tolist()), round(float(x.sum()), 4)))


def _trainer(tmp_path: Path, dm: Any, callbacks: list[Callback]) -> pl.Trainer:
    # Lightning's defaults (sanity check, default checkpointing) except output and logging.
    return quiet_trainer(tmp_path, callbacks, max_epochs=dm.max_epochs, enable_checkpointing=True)


def _run(tmp_path: Path, *, save_every: int | None = None, resume: str | None = None, seed: int = 0):
    pl.seed_everything(seed)
    dm = BlobStream(num_tasks=2, epochs_per_task=2)  # 48 samples per task, batches of 8: 6 per epoch
    model = tiny_classifier(dm)
    log = BatchLog()
    callbacks: list[Callback] = [log]
    if save_every is not None:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=save_every, save_top_k=-1, filename="{step}"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(tmp_path, dm, callbacks).fit(model, dm, ckpt_path=resume)
    return model, log


@pytest.mark.parametrize(
    "step",
    [
        pytest.param(9, id="mid-epoch"),  # batch 3 of epoch 1 (task 0's last epoch)
        pytest.param(12, id="task-boundary"),  # the last batch of task 0; task 1 follows
        pytest.param(16, id="mid-epoch-of-task-1"),  # batch 4 of epoch 2
    ],
)
def test_mid_epoch_resume_serves_exactly_the_remaining_batches(tmp_path: Path, step: int) -> None:
    full, full_log = _run(tmp_path / "full", save_every=step)
    checkpoint = tmp_path / "full" / "ckpt" / f"step={step}.ckpt"
    assert checkpoint.exists()
    # A fresh model, datamodule and callback, under another global seed.
    resumed, resumed_log = _run(tmp_path / "resumed", resume=str(checkpoint), seed=1)
    assert len(full_log.batches) == 24
    assert resumed_log.batches == full_log.batches[step:]
    assert torch.allclose(params_vector(full), params_vector(resumed), atol=1e-6)


def test_loader_state_counts_served_batches_and_skips_them() -> None:
    data = TensorDataset(torch.arange(10.0))
    loader = ResumableDataLoader(data, batch_size=3, generator=torch.Generator().manual_seed(0))
    iterator = iter(loader)
    next(iterator), next(iterator)
    state = loader.state_dict()
    assert state == {"version": 1, "batches_served": 2}
    again = ResumableDataLoader(data, batch_size=3, num_workers=2)  # workers prefetch; the count does not
    again.load_state_dict(state)
    assert [b[0].tolist() for b in again] == [[6.0, 7.0, 8.0], [9.0]]
    assert len(again) == 4 and again.state_dict()["batches_served"] == 4
    assert [b[0].tolist() for b in again][0] == [0.0, 1.0, 2.0]  # the skip applies once
    with pytest.raises(ValueError, match="state version 2"):
        again.load_state_dict({"version": 2, "batches_served": 0})


class _Plain(pl.LightningModule):
    """A user's module with its own plain, unshuffled DataLoader of 6 batches."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[int] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen.append(int(batch[0][0]))
        return self.layer(batch[0]).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.arange(12.0).view(-1, 1)), batch_size=2)


def test_a_plain_dataloader_replays_the_first_batches_on_mid_epoch_resume(tmp_path: Path) -> None:
    """What README says a user's own plain loader gets (Lightning 2.6 behaviour, not ours)."""

    def trainer(**kwargs: Any) -> pl.Trainer:
        # Lightning's own defaults (checkpointing, no loader reloading): what a plain user run gets.
        return quiet_trainer(tmp_path, kwargs.pop("callbacks", []), max_epochs=1, enable_checkpointing=True, reload_dataloaders_every_n_epochs=0, deterministic=False, **kwargs)

    first = _Plain()
    trainer(callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")]).fit(first)
    assert first.seen == [0, 2, 4, 6, 8, 10]
    again = _Plain()
    with pytest.warns(UserWarning, match="your dataloader is not resumable"):
        trainer().fit(again, ckpt_path=str(tmp_path / "step=2.ckpt"))
    assert again.seen == [0, 2, 4, 6]  # the epoch's first 4 batches again; 8 and 10 never come


def test_iterating_the_library_loaders_leaves_the_global_rng_alone() -> None:
    # The premise: a DataLoader without `generator=` draws from the global RNG at every iter().
    state = torch.get_rng_state()
    iter(DataLoader(TensorDataset(torch.zeros(4)), batch_size=2))
    assert not torch.equal(torch.get_rng_state(), state)

    dm = SplitDigits(batch_size=64, eval_batch_size=128)
    dm.setup("fit")
    loaders = [dm.train_dataloader(), *dm.val_dataloader(), *dm.test_dataloader()]
    state = torch.get_rng_state()
    for loader in loaders:
        for _ in loader:
            pass
        iter(loader)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(loader.generator is not None for loader in loaders)
