"""Experience Replay under DDP with 2 processes (CPU/gloo here; set accelerator="gpu" on GPUs).

The buffer receives the stream samples of both ranks, so it is identical on each; each rank
draws its replay samples with its own seeded generator. The script checks at the end that both
ranks hold the same full state: every parameter and buffer of the model and the callback's whole
checkpointed state (buffer samples, task ids, generator). Without `--fast` the accuracy report goes to the
logger's folder (`lightning_logs/version_N`), and the run's last lines say where.

    python examples/ddp.py [--fast] [--devices 2]
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from lightning_forget.callbacks import ExperienceReplay
from lightning_forget.datamodules import SplitMNIST
from lightning_forget.modules import ContinualClassifier


def flatten(state: Any) -> torch.Tensor:
    """Every tensor and number of a nested state, in a fixed order, as one float64 vector."""
    if isinstance(state, torch.Tensor):
        return state.detach().to(torch.float64).flatten().cpu()
    if isinstance(state, dict):
        parts = [flatten(state[key]) for key in sorted(state, key=str)]
    elif isinstance(state, (list, tuple)):
        parts = [flatten(item) for item in state]
    elif isinstance(state, (int, float)) and not isinstance(state, bool):
        parts = [torch.tensor([float(state)], dtype=torch.float64)]
    else:
        parts = []
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


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
    # Everything a checkpoint would hold for the model and the callback: every parameter and
    # buffer, and ExperienceReplay's state (its buffer's samples, task ids, generator state).
    mine = flatten({"model": model.state_dict(), "replay": replay.state_dict()})
    lengths = trainer.strategy.all_gather(torch.tensor([mine.numel()]))
    same = bool((lengths == lengths.flatten()[0]).all())
    max_diff = float("nan")
    if same:
        gathered = trainer.strategy.all_gather(mine)  # (ranks, n)
        max_diff = float((gathered - gathered[0]).abs().max())
        same = max_diff == 0.0
    if trainer.is_global_zero:
        print(
            f"ranks={trainer.world_size} buffer={len(replay.buffer)} state_values={mine.numel()} "
            f"max_diff={max_diff} identical_across_ranks={same}"
        )
    if dist.is_initialized():
        dist.destroy_process_group()  # avoids a rare abort at interpreter exit with plain ddp


if __name__ == "__main__":
    main()
