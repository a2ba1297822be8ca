"""Add continual-learning callbacks to an existing LightningModule and Trainer, unchanged.

`PlainClassifier` below is an ordinary LightningModule that knows nothing about tasks: it logs
the validation accuracy of each dataloader under `val_acc` (Lightning suffixes
`/dataloader_idx_{t}`, which `ContinualMetrics` finds by default). Experience Replay and the
accuracy matrix come from callbacks only; the report goes to the logger's folder
(`lightning_logs/version_N`), and the run's last line says where.

    python examples/existing_trainer.py [--fast]
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_forget.callbacks import ContinualMetrics, ExperienceReplay
from lightning_forget.datamodules import SplitDigits


class PlainClassifier(pl.LightningModule):
    """A user's module: an MLP on 8x8 digits, cross-entropy, SGD."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def main(argv: list[str] | None = None) -> ContinualMetrics:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fast", action="store_true", help="a few batches per task (for tests)")
    args = parser.parse_args(argv)
    pl.seed_everything(0)
    data = SplitDigits(epochs_per_task=3, batch_size=16)  # 5 tasks x 2 digit classes
    metrics = ContinualMetrics()  # finds val_acc/dataloader_idx_{t}
    trainer = pl.Trainer(
        max_epochs=data.max_epochs,
        reload_dataloaders_every_n_epochs=1,  # the datamodule serves a new task every 3 epochs
        callbacks=[ExperienceReplay(buffer_size=200), metrics],
        accelerator="cpu",
        limit_train_batches=3 if args.fast else 1.0,
        enable_progress_bar=not args.fast,
        enable_checkpointing=False,
    )
    trainer.fit(PlainClassifier(), data)
    return metrics


if __name__ == "__main__":
    main()
