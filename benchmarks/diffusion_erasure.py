"""Concept erasure on a small class-conditional diffusion model of scikit-learn's digits (CPU).

One run: train a ``DiffusionModule`` on the digits (timed), train the judge classifier, then for
each method of :data:`METHODS` erase one digit from a copy of the trained model (timed) and judge
``--samples-per-class`` samples per class before and after (``evaluate_erasure``): the erased
digit's generation rate and average probability, the kept digits' accuracy and the Fréchet
distance on the judge's features. Repeated over ``--seeds`` (a new model per seed). Prints a table
of means ± std with the erasure time relative to the model's training time, measured in the same run.

    PYTHONPATH=$PWD python benchmarks/diffusion_erasure.py --quick          # seconds (the tests run it)
    PYTHONPATH=$PWD nice python benchmarks/diffusion_erasure.py --seeds 0 1 2 --out runs/diffusion_erasure

:data:`METHODS` maps a name to a factory ``(erase, seed) -> callback``; other method files add their
entries to it (``METHODS["doco"] = ...``) before calling :func:`main`.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_forget.callbacks import ESD, UCE, ConceptAblation
from lightning_forget.callbacks.erasure import erase_with_uce
from lightning_forget.callbacks.erasure_eval import evaluate_erasure
from lightning_forget.modules import DiffusionModule
from lightning_forget.modules.diffusion import digits_data
from lightning_forget.unlearning.erasure_eval import train_judge

#: name -> factory(erase: list[int], seed: int) -> an erasure callback (None: a closed-form edit, see CLOSED_FORM).
METHODS: dict[str, Callable[[list[int], int], Any]] = {
    "esd-x": lambda erase, seed: ESD(erase=erase, parameters="x", batch_size=8, ddim_steps=25, seed=seed),
    "esd-u": lambda erase, seed: ESD(erase=erase, parameters="u", batch_size=8, ddim_steps=25, seed=seed),
    "esd-x-lora": lambda erase, seed: ESD(erase=erase, parameters="x", lora_rank=4, batch_size=8, ddim_steps=25, seed=seed),
    "ca": lambda erase, seed: ConceptAblation(erase=erase, anchor=None, batch_size=8, sample_steps=25,
                                              num_anchor_samples=64, seed=seed),
    "uce": lambda erase, seed: UCE(erase=erase),
}
#: Methods applied without training (the callback's edit is run directly, timed the same way).
CLOSED_FORM = {"uce": lambda module, erase: erase_with_uce(module, erase, None, [c for c in range(10) if c not in erase])}
#: Learning rate of each method's erasure fit (the module's AdamW; the official lrs are for Stable Diffusion).
ERASE_LR = {"esd-x": 1e-3, "esd-u": 1e-4, "esd-x-lora": 3e-3, "ca": 1e-3}


def _trainer(steps: int, root: str, callbacks: Optional[list] = None) -> pl.Trainer:
    return pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=root,
                      callbacks=callbacks or [])


def train_model(x: torch.Tensor, y: torch.Tensor, steps: int, seed: int, widths: tuple[int, ...], root: str) -> tuple[DiffusionModule, float]:
    pl.seed_everything(seed, verbose=False)
    module = DiffusionModule(block_out_channels=widths, lr=2e-3, ema_decay=0.995, sample_steps=25, seed=seed)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    _trainer(steps, root).fit(module, loader)
    elapsed = time.perf_counter() - start
    module.apply_ema()
    return module, elapsed


def erase(method: str, trained: DiffusionModule, x: torch.Tensor, y: torch.Tensor, target: list[int], steps: int, seed: int,
          root: str) -> tuple[DiffusionModule, float]:
    module = copy.deepcopy(trained)
    start = time.perf_counter()
    if method in CLOSED_FORM:
        CLOSED_FORM[method](module, target)
    else:
        module.lr = ERASE_LR.get(method, 1e-3)
        keep = ~torch.isin(y, torch.tensor(target))
        loader = DataLoader(TensorDataset(x[keep], y[keep]), batch_size=8, shuffle=True,
                            generator=torch.Generator().manual_seed(seed))
        _trainer(steps, root, [METHODS[method](target, seed)]).fit(module, loader)
    return module, time.perf_counter() - start


def _fmt(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "nan"
    if len(finite) == 1:
        return f"{finite[0]:.3f}"
    return f"{statistics.mean(finite):.3f}±{statistics.stdev(finite):.3f}"


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model, a few steps: seconds")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", default=None, help=f"subset of {sorted(METHODS)}")
    parser.add_argument("--erase", type=int, default=3, help="the digit to erase")
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--erase-steps", type=int, default=100)
    parser.add_argument("--samples-per-class", type=int, default=50)
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--out", default=None, help="folder for results.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        args.train_steps, args.erase_steps, args.samples_per_class, args.widths = 3, 2, 2, [8]
        args.methods = args.methods or ["esd-x", "uce"]
    methods = args.methods or sorted(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; known: {sorted(METHODS)}")
    root = args.out or "runs/diffusion_erasure"
    x, y = digits_data()
    target = [args.erase]
    kept = [c for c in range(10) if c not in target]
    rows: dict[str, dict[str, list[float]]] = {}
    for seed in args.seeds:
        trained, train_time = train_model(x, y, args.train_steps, seed, tuple(args.widths), root)
        judge, judge_acc = train_judge(x, y, 10, epochs=2 if args.quick else 30, seed=seed)
        common = dict(samples_per_class=args.samples_per_class, seed=seed, num_steps=25 if not args.quick else 2)
        before, _, _ = evaluate_erasure(trained, judge, target, kept, x, y, **common)
        rows.setdefault("original", {}).setdefault("train_s", []).append(train_time)
        for key, value in before.items():
            rows["original"].setdefault(key, []).append(value)
        rows["original"].setdefault("judge_acc", []).append(judge_acc)
        for method in methods:
            module, seconds = erase(method, trained, x, y, target, args.erase_steps, seed, root)
            after, _, _ = evaluate_erasure(module, judge, target, kept, x, y, **common)
            row = rows.setdefault(method, {})
            for key, value in after.items():
                row.setdefault(key, []).append(value)
            row.setdefault("erase_s", []).append(seconds)
            base = dict(trained.named_parameters())
            changed = [n for n, p in module.named_parameters() if n in base and not torch.equal(p, base[n])]
            row.setdefault("changed_tensors", []).append(len(changed))
            row.setdefault("changed_cross_attention_only", []).append(float(all(".attn2." in n for n in changed)))
            row.setdefault("time_ratio", []).append(seconds / train_time)
            print(f"seed {seed} {method}: " + ", ".join(f"{k} {v:.3f}" for k, v in after.items())
                  + f", erasure {seconds:.1f}s ({seconds / train_time:.2f}x training)", flush=True)
    header = ["method", "erased_rate", "erased_prob", "false_erased_rate", "retained_acc", "fd", "time/training"]
    print(" | ".join(header))
    for method, row in rows.items():
        ratio = _fmt(row["time_ratio"]) if "time_ratio" in row else f"train {_fmt(row['train_s'])}s"
        print(" | ".join([method] + [_fmt(row[k]) for k in header[1:6]] + [ratio]))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
