"""One `fit` per task: plain DataLoaders for each task, the same callback objects throughout.

This is how many training scripts already work: a loop over datasets, one `trainer.fit` each.
The callbacks count tasks themselves (their counter is in their checkpointed state), so ER
keeps its buffer and `ContinualMetrics` grows the accuracy matrix fit by fit. One logger object
is given to every Trainer, so all the fits share one results folder (`lightning_logs/version_N`:
its metrics.csv and the report, rewritten after each task) instead of one version per fit.

    python examples/one_fit_per_task.py [--fast]
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_forget.callbacks import ContinualMetrics, ExperienceReplay
from lightning_forget.datamodules import SplitDigits
from lightning_forget.modules import ContinualClassifier


def main(argv: list[str] | None = None) -> ContinualMetrics:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fast", action="store_true", help="a few batches per task (for tests)")
    args = parser.parse_args(argv)
    pl.seed_everything(0)
    stream = SplitDigits()  # used here only as a source of per-task datasets
    stream.setup("fit")
    model = ContinualClassifier(hidden_sizes=[128], num_classes=10, input_shape=(1, 8, 8), num_tasks=5, report=False)
    replay, metrics = ExperienceReplay(buffer_size=200), ContinualMetrics()
    logger = CSVLogger(save_dir=".", name="lightning_logs")  # one folder for the whole sequence
    for task in range(stream.num_tasks):
        train = DataLoader(stream.train_dataset(task), batch_size=16, shuffle=True)
        # Validate on every task seen so far: dataloader t is task t.
        val = [DataLoader(stream.val_dataset(t), batch_size=64) for t in range(task + 1)]
        trainer = pl.Trainer(
            max_epochs=3,
            callbacks=[replay, metrics],
            accelerator="cpu",
            limit_train_batches=3 if args.fast else 1.0,
            enable_progress_bar=not args.fast,
            logger=logger,
            enable_checkpointing=False,
        )
        trainer.fit(model, train, val)
    return metrics


if __name__ == "__main__":
    main()
