"""Continual pre-training of a tiny GPT-2, prose then code: re-warming, re-decaying and replay.

Ibrahim et al., "Simple and Scalable Strategies to Continually Pre-train Large Language
Models" (TMLR 2024) claim that re-warming and re-decaying the LR for each new dataset, together
with a small share of replayed old tokens (compute-equivalent: replayed blocks replace new
ones), matches re-training on the union of the data. Runs, all from the same initial weights and
with the same number of optimizer steps and tokens:

  (a) no re-warming, no replay: warm-up + cosine decay to min_lr over the prose task, then the
      code task continues at the constant min_lr (`InfiniteLRSchedule` with a
      cool-down of the first task's length and `constant_lr=min_lr`);
  (b) re-warm + re-decay: `LRRewarming` restarts warm-up + cosine at each task;
  (c) (b) + token replay of 5% and of 25% of each code-task block budget (`replay_fraction`);
  (d) re-training on the union (`joint=True`, same total blocks), one warm-up + cosine.

Printed: final validation loss on prose and on code and their mean; the fraction of the gap
between (a) and (d) that each run closes, (loss_a − loss_x) / (loss_a − loss_d); wall time of
each run relative to (a), measured in this run.

    python benchmarks/continual_pretraining.py            # full (a few minutes on 2 cores)
    python benchmarks/continual_pretraining.py --quick    # seconds, used by the tests

Every run uses ``torch.set_num_threads(--threads)`` (default 2, the machine's core count) so the
wall-time ratios compare like with like. Each result also holds ``lr_trace``, the learning rate of
every optimizer step (read in ``on_before_optimizer_step``), so the schedules can be checked.
"""

from __future__ import annotations

import argparse
import math
import time
from functools import partial
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from rich.console import Console
from rich.table import Table

from lightning_forget.callbacks import InfiniteLRSchedule, LRRewarming
from lightning_forget.callbacks.lr_schedule import BaseLRSchedule
from lightning_forget.datamodules import TextStreamDataModule
from lightning_forget.modules import CausalLMModule

class _LRTrace(pl.Callback):
    """Record the learning rate (first param group) used by every optimizer step."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.lrs.append(float(optimizer.param_groups[0]["lr"]))


RUNS = ("a_no_rewarm", "b_rewarm", "c_rewarm_replay5", "c_rewarm_replay25", "d_union")


def _data(args: argparse.Namespace, run: str) -> TextStreamDataModule:
    replay = {"c_rewarm_replay5": 0.05, "c_rewarm_replay25": 0.25}.get(run, 0.0)
    return TextStreamDataModule(
        corpora=["python_docs", "python_code"],
        block_size=args.block_size,
        max_chars_per_corpus=args.max_chars,
        blocks_per_task=args.steps_per_task * args.batch_size,
        replay_fraction=replay,
        batch_size=args.batch_size,
        joint=run == "d_union",
        seed=args.seed,
    )


def _schedule(args: argparse.Namespace, run: str) -> BaseLRSchedule:
    warmup = max(1, math.ceil(0.01 * args.steps_per_task))
    if run == "a_no_rewarm":
        return InfiniteLRSchedule(
            max_lr=args.max_lr,
            min_lr=args.min_lr,
            warmup=warmup,
            cooldown_steps=args.steps_per_task - warmup,
            constant_lr=args.min_lr,
        )
    # (d) is one task of twice the steps: one warm-up + cosine over the whole union.
    return LRRewarming(max_lr=args.max_lr, min_lr=args.min_lr, warmup=0.01, decay="cosine")


def _run(args: argparse.Namespace, run: str) -> dict[str, Any]:
    """Train one run from the shared initial weights; return its final per-corpus val losses."""
    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, verbose=False)
    data = _data(args, run)
    model = CausalLMModule(
        model="gpt2",
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        n_head=4,
        vocab_size=257,
        block_size=args.block_size,
        optimizer=partial(torch.optim.AdamW, lr=args.max_lr, weight_decay=0.1),
    )
    trace = _LRTrace()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=data.max_epochs,
        reload_dataloaders_every_n_epochs=1,
        callbacks=[_schedule(args, run), trace],
        check_val_every_n_epoch=data.max_epochs,  # validate once, at the end
        limit_val_batches=args.val_batches,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    metrics = trainer.callback_metrics
    prose, code = float(metrics["val/loss/task_0"]), float(metrics["val/loss/task_1"])
    replayed = data.replay_counts(1)[1] if not data.joint else 0
    return {
        "run": run,
        "prose": prose,
        "code": code,
        "mean": (prose + code) / 2,
        "seconds": seconds,
        "steps": trainer.global_step,
        "replayed_blocks_task1": replayed,
        "lr_trace": trace.lrs,
    }


def main(argv: Optional[list[str]] = None) -> dict[str, dict[str, Any]]:
    """Run (a)-(d), print the table, and return ``{run: {prose, code, mean, gap_closed_*, ...}}``.

    Args:
        argv: command-line arguments (``None``: ``sys.argv[1:]``); ``["--quick"]`` for a smoke run.

    Raises:
        SystemExit: on invalid arguments (argparse), e.g. a non-positive step count.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model and data, a few steps (seconds)")
    parser.add_argument("--steps-per-task", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--max-lr", type=float, default=1e-3)
    parser.add_argument("--min-lr", type=float, default=1e-4)
    parser.add_argument("--max-chars", type=int, default=250_000, help="characters read from each corpus")
    parser.add_argument("--val-batches", type=int, default=20, help="validation batches per corpus")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for every run")
    args = parser.parse_args(argv)
    for name in ("steps_per_task", "batch_size", "block_size", "n_layer", "n_embd", "max_chars", "val_batches", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive int, got {getattr(args, name)}.")
    if not 0.0 <= args.min_lr <= args.max_lr:
        parser.error(f"need 0 <= --min-lr <= --max-lr, got min_lr={args.min_lr}, max_lr={args.max_lr}.")
    if args.quick:
        args.steps_per_task, args.block_size, args.n_embd = 6, 32, 32
        args.max_chars, args.val_batches = 20_000, 2

    _run(argparse.Namespace(**{**vars(args), "steps_per_task": 2, "val_batches": 1}), "b_rewarm")  # warm-up, untimed
    results = {run: _run(args, run) for run in RUNS}
    a, d = results["a_no_rewarm"], results["d_union"]
    for row in results.values():
        for key in ("prose", "code", "mean"):
            gap = a[key] - d[key]
            row[f"gap_closed_{key}"] = (a[key] - row[key]) / gap if abs(gap) > 1e-12 else float("nan")
        row["time_vs_a"] = row["seconds"] / a["seconds"]

    table = Table(
        title=(
            f"Tiny GPT-2 ({args.n_layer} layers, {args.n_embd} wide, byte tokens), prose -> code, "
            f"{args.steps_per_task} steps x {args.batch_size} x {args.block_size} tokens per task, "
            f"AdamW max_lr {args.max_lr:g}, min_lr {args.min_lr:g}, seed {args.seed}, {args.threads} threads"
        )
    )
    for column in ("run", "val loss prose", "val loss code", "mean", "gap a→d closed (prose/code/mean)", "replayed blocks", "time vs (a)"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for row in results.values():
        table.add_row(
            row["run"],
            f"{row['prose']:.4f}",
            f"{row['code']:.4f}",
            f"{row['mean']:.4f}",
            " / ".join(f"{row[f'gap_closed_{k}']:.0%}" for k in ("prose", "code", "mean")),
            str(row["replayed_blocks_task1"]),
            f"{row['time_vs_a']:.2f}x",
        )
    Console(width=150).print(table)
    return results


if __name__ == "__main__":
    main()
