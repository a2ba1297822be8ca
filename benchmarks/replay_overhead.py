"""Step time of Experience Replay and DER++ relative to fine-tuning, measured in the same run.

Each method trains the same SplitDigits stream (5 tasks x 2 classes, 1 epoch per task, batch 10,
MLP 100-100, SGD lr 0.1); a pair of callbacks (the first and the last in the callback list)
times every training batch from ``on_train_batch_start`` to ``on_train_batch_end``, so the
replay draw, the joined forward/backward, the buffer's gather and insert are all inside. The
first task is left out of the median (no replay there), and the first batches of each fit
(warm-up). Methods are interleaved over repeats so that machine load hits each alike; printed:
median step time per method and its ratio to fine-tuning.

With ``--devices 2`` (the default) the fits run under ``ddp_spawn`` on 2 CPU processes (gloo),
where the replay callbacks gather every stream batch across ranks; ``--devices 1`` measures the
single-process overhead (no collective). Only public API that older releases share is used, so
the same script runs against an older checkout:

    python benchmarks/replay_overhead.py                       # full (about 2-4 min on 2 busy cores)
    python benchmarks/replay_overhead.py --quick               # smoke run, seconds
    git worktree add /tmp/before 43b3352^ && PYTHONPATH=/tmp/before python benchmarks/replay_overhead.py
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import tempfile
import time
from functools import partial
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

import lightning_forget
from lightning_forget.callbacks import DarkExperienceReplay, ExperienceReplay
from lightning_forget.datamodules import SplitDigits
from lightning_forget.modules import ContinualClassifier

METHODS = ["finetune", "er", "derpp"]
BATCH = 10
WARMUP = 5


class _Clock:
    """Shared by the start and end callbacks: per batch, seconds from start to end."""

    def __init__(self) -> None:
        self.started = 0.0
        self.times: list[tuple[int, float]] = []  # (epoch, seconds)


class StartTimer(Callback):
    def __init__(self, clock: _Clock) -> None:
        self.clock = clock

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.clock.started = time.perf_counter()


class EndTimer(Callback):
    def __init__(self, clock: _Clock, out: str) -> None:
        self.clock, self.out = clock, out

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.clock.times.append((trainer.current_epoch, time.perf_counter() - self.clock.started))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank == 0:
            with open(self.out, "w") as handle:
                json.dump(self.clock.times, handle)


def run(method: str, devices: int, quick: bool, seed: int) -> list[float]:
    pl.seed_everything(seed, verbose=False)
    data = SplitDigits(epochs_per_task=1, batch_size=BATCH, seed=seed)
    model = ContinualClassifier(
        backbone="mlp", hidden_sizes=[100, 100], num_classes=data.num_classes, input_shape=data.input_shape,
        num_tasks=data.num_tasks, optimizer=partial(torch.optim.SGD, lr=0.1), report=False,
    )
    callbacks: list[Callback] = []
    if method == "er":
        # The reservoir policy, the only one older checkouts have (`update` did not exist there).
        policy = {"update": "reservoir", "draw": "step"} if "update" in inspect.signature(ExperienceReplay).parameters else {}
        callbacks.append(ExperienceReplay(buffer_size=200, seed=seed, **policy))
    elif method == "derpp":
        callbacks.append(DarkExperienceReplay(buffer_size=200, alpha=0.1, beta=0.5, seed=seed))
    clock = _Clock()
    handle, out = tempfile.mkstemp(suffix=".json")
    os.close(handle)
    extra: dict[str, Any] = {"limit_train_batches": 12, "limit_val_batches": 1} if quick else {"limit_val_batches": 2}
    if devices > 1:
        extra.update(strategy="ddp_spawn")
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, max_epochs=data.max_epochs, reload_dataloaders_every_n_epochs=1,
        callbacks=[StartTimer(clock), *callbacks, EndTimer(clock, out)], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **extra,
    )
    trainer.fit(model, data)
    with open(out) as handle_in:
        times = json.load(handle_in)
    os.remove(out)
    # Leave out task 0 (nothing to replay yet) and each epoch's first batches (warm-up).
    per_epoch: dict[int, list[float]] = {}
    for epoch, seconds in times:
        per_epoch.setdefault(int(epoch), []).append(float(seconds))
    return [s for epoch, values in per_epoch.items() if epoch > 0 for s in values[WARMUP:]]


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 repeat, 12 batches per epoch")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    repeats = 1 if args.quick else args.repeats
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for repeat in range(repeats):
        for method in METHODS:  # interleaved
            times[method] += run(method, args.devices, args.quick, seed=repeat)
    base = statistics.median(times["finetune"])
    source = os.path.dirname(os.path.dirname(os.path.abspath(lightning_forget.__file__)))
    print(f"lightning_forget from {source}; devices={args.devices}; repeats={repeats}")
    print("| method | median step time (ms) | vs fine-tune | batches timed |")
    print("|---|---|---|---|")
    summary: dict[str, Any] = {}
    for method in METHODS:
        median = statistics.median(times[method])
        summary[method] = {"median_s": median, "ratio": median / base, "n": len(times[method])}
        print(f"| {method} | {1000 * median:.2f} | {median / base:.2f}x | {len(times[method])} |")
    return summary


if __name__ == "__main__":
    main()
