"""Experience Replay under DDP with 2 processes (CPU/gloo here; set accelerator="gpu" on GPUs).

The buffer receives the stream samples of both ranks, so it is identical on each; each rank
draws its replay samples with its own seeded generator. The script checks at the end that both
ranks hold the same parameters and buffer. Without `--fast` the accuracy report goes to the
logger's folder (`lightning_logs/version_N`), and the run's last lines say where.

    python examples/ddp.py [--fast] [--devices 2]
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from lightning_forget.callbacks import ExperienceReplay
from lightning_forget.datamodules import SplitMNIST
from lightning_forget.modules import ContinualClassifier


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fast", action="store_true", help="a few batches per task (for tests)")
    parser.add_argument("--devices", type=int, default=2)
    args = parser.parse_args()
    pl.seed_everything(0)
    data = SplitMNIST(epochs_per_task=1, batch_size=10)
    model = ContinualClassifier(hidden_sizes=[256, 256], num_tasks=data.num_tasks)  # adds ContinualMetrics
    replay = ExperienceReplay(buffer_size=500)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp",
        max_epochs=data.max_epochs,
        reload_dataloaders_every_n_epochs=1,
        callbacks=[replay],
        limit_train_batches=3 if args.fast else 1.0,
        limit_val_batches=2 if args.fast else 1.0,
        enable_progress_bar=not args.fast,
        enable_checkpointing=False,
    )
    trainer.fit(model, data)
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    buffer = replay.buffer.contents()["x"].flatten()
    mine = torch.stack([params.sum(), buffer.sum(), torch.tensor(float(len(replay.buffer)))])
    gathered = trainer.strategy.all_gather(mine)
    if trainer.is_global_zero:
        same = bool((gathered == gathered[0]).all())
        print(f"ranks={trainer.world_size} buffer={len(replay.buffer)} identical_across_ranks={same}")
    if dist.is_initialized():
        dist.destroy_process_group()  # avoids a rare abort at interpreter exit with plain ddp


if __name__ == "__main__":
    main()
