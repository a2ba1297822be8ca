"""A small grid search for an unlearning method: one command, the setting closest to retraining.

Unlearning baselines are very sensitive to the learning rate and the number of epochs (the
official maintainers answer users with "search lr in [1e-5, 1e-1]"). This runs a method's config
once per grid point through the ``lightning-forget`` CLI, reads each run's
:class:`~lightning_forget.callbacks.UnlearningEvaluation` metrics (its last row), computes the
Avg. Gap to a retrained model's metrics and prints a table, best first::

    python -m lightning_forget.unlearning.sweep --config configs/unlearning/salun_digits.yaml \\
        --retrained runs/retrain/lightning_logs/version_0/unlearning_metrics.json \\
        --grid model.init_args.optimizer.init_args.lr=0.003,0.01,0.03 \\
        --grid trainer.max_epochs+data.init_args.epochs_per_task=5,10 \\
        --out runs/salun_sweep -- --trainer.callbacks.init_args.pretrained_ckpt runs/original/.../last.ckpt

A grid key is a dotted CLI path; ``KEY1+KEY2=v1,v2`` sets several keys to the same value (epochs of
the trainer and the datamodule together). Arguments after ``--`` go to every run. Each run's
folder is ``<out>/point<i>``; ``sweep.csv``/``sweep.json`` and ``sweep_gap.png`` go to ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path
from typing import Any, Optional

from lightning_forget.metrics.unlearning import avg_gap

__all__ = ["main", "parse_grid", "sweep"]


def parse_grid(specs: list[str]) -> list[tuple[list[str], list[str]]]:
    """``["a.b=1,2", "c+d=3,4"]`` → ``[(["a.b"], ["1", "2"]), (["c", "d"], ["3", "4"])]``.

    Raises:
        ValueError: a spec without ``=`` or without values (the message shows the spec).
    """
    grid = []
    for spec in specs:
        keys, sep, values = spec.partition("=")
        if not sep or not keys or not values.strip(","):
            raise ValueError(f"--grid {spec!r}: write KEY=v1,v2 (or KEY1+KEY2=v1,v2), e.g. "
                             "model.init_args.optimizer.init_args.lr=0.01,0.1.")
        grid.append(([k.strip() for k in keys.split("+")], [v.strip() for v in values.split(",") if v.strip()]))
    return grid


def _run_point(config: str, overrides: dict[str, str], folder: Path, extra: list[str]) -> dict[str, float]:
    from lightning_forget.callbacks import UnlearningEvaluation
    from lightning_forget.cli import main as cli_main

    args = ["fit", "--config", config, "--trainer.default_root_dir", str(folder)]
    for key, value in overrides.items():
        args += [f"--{key}", value]
    cli = cli_main(args + extra)
    evaluations = [cb for cb in cli.trainer.callbacks if isinstance(cb, UnlearningEvaluation)]
    if not evaluations or not evaluations[0].rows:
        raise RuntimeError(f"The config {config} has no UnlearningEvaluation callback (or it evaluated nothing): "
                           "add one to its trainer.callbacks so the sweep can score each run.")
    row = evaluations[0].rows[-1]
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float))}


def sweep(config: str, grid: list[tuple[list[str], list[str]]], retrained: Optional[dict[str, float]], out: Path,
          extra: Optional[list[str]] = None) -> list[dict[str, Any]]:
    """Run every grid point; rows sorted by Avg. Gap (best first; without ``retrained``, in grid order)."""
    points = list(itertools.product(*[values for _, values in grid]))
    rows: list[dict[str, Any]] = []
    for i, values in enumerate(points):
        overrides = {key: value for (keys, _), value in zip(grid, values) for key in keys}
        print(f"sweep: point {i + 1}/{len(points)}: {overrides}", flush=True)
        try:
            metrics = _run_point(config, overrides, out / f"point{i}", list(extra or []))
        except FloatingPointError as error:  # a diverged run is a result, not a crash of the sweep
            print(f"sweep: point {i + 1} diverged: {error}", flush=True)
            metrics = dict(diverged=1.0)
        row: dict[str, Any] = {"point": i, **overrides, **metrics}
        if retrained is not None:
            row["avg_gap"] = avg_gap(metrics, retrained) if "ua" in metrics else math.inf
        rows.append(row)
    if retrained is not None:
        rows.sort(key=lambda r: r["avg_gap"])
    return rows


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    if argv is None:
        import sys

        argv = sys.argv[1:]
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(prog="python -m lightning_forget.unlearning.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the method's YAML config (with an UnlearningEvaluation callback)")
    parser.add_argument("--grid", action="append", required=True, help="KEY=v1,v2 or KEY1+KEY2=v1,v2 (repeatable)")
    parser.add_argument("--retrained", default=None, help="JSON of the retrained model's metrics (UnlearningEvaluation's)")
    parser.add_argument("--out", default="runs/sweep", help="folder of the runs and the sweep table")
    args = parser.parse_args(argv)
    retrained = None
    if args.retrained is not None:
        loaded = json.loads(Path(args.retrained).read_text())
        retrained = dict(loaded[-1] if isinstance(loaded, list) else loaded)
    out = Path(args.out)
    rows = sweep(args.config, parse_grid(args.grid), retrained, out, extra)
    from rich.console import Console

    from lightning_forget.unlearning.report import gap_bar_chart, render_table, write_rows

    keys = [k for keys, _ in parse_grid(args.grid) for k in keys]
    Console(width=200).print(render_table(rows, title="Sweep (best first)" if retrained else "Sweep", label_keys=["point", *keys]))
    paths = write_rows(out, rows, stem="sweep")
    if retrained is not None:
        finite = {f"point{r['point']}": 100 * r["avg_gap"] for r in rows if math.isfinite(r["avg_gap"])}
        if finite:
            paths["png"] = gap_bar_chart(finite, out / "sweep_gap.png", title="Avg. Gap to retraining per grid point")
        best = rows[0]
        print(f"sweep: best setting {({k: best[k] for k in keys})} with Avg. Gap {100 * best['avg_gap']:.2f} points", flush=True)
    print(f"sweep: results written to {out.resolve()}: {', '.join(p.name for p in paths.values())}", flush=True)
    return rows


if __name__ == "__main__":
    main()
