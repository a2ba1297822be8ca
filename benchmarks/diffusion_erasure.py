"""Concept erasure on a small class-conditional diffusion model of scikit-learn's digits (CPU): every method of issue 27.

One run, one registry (:data:`METHODS`), one report. Per seed:

1. a ``DiffusionModule`` (cross-attention on per-digit tokens) is trained on the 1,797 digits
   (timed) or loaded from ``--cache`` (the training time recorded when it was trained), and the
   judge (the library's ``ContinualClassifier`` MLP) is trained on the real digits;
2. the original model is judged once: ``--samples-per-class`` samples per digit (DDIM, the module's
   guidance 2) → the erased digit's generation rate and mean probability, the kept digits'
   accuracy, the Fréchet distance on the judge's features (``evaluate_erasure``);
3. each method erases digit ``--erase`` from a copy of that model (fine-tuning on the retained
   digits for its number of steps, or UCE's closed form), timed, and is judged the same way (SFD:
   its one-step generator's samples).

Methods: ESD-x and ESD-u (full), ESD-x with LoRA r=4, concept ablation, UCE (closed form), SalUn
(generative), SFD, DoCo with and without the concept-preserving gradient surgery. Every run checks
that each method changed parameters and only those of its set (``changed_tensors``,
``changed_only_allowed``; ``--quick`` asserts it).

    PYTHONPATH=$PWD python benchmarks/diffusion_erasure.py --quick          # seconds (the tests run it)
    PYTHONPATH=$PWD nice python benchmarks/diffusion_erasure.py --seeds 0 1 2 --out runs/diffusion_erasure

Prints and writes (``results.json``, ``results.md``) a table of means ± std over seeds with the
erasure time relative to the model's training time, measured in the same run.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import re
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_forget.callbacks import ESD, SFD, ConceptAblation, DoCo, SalUnDiffusion
from lightning_forget.callbacks.erasure import erase_with_uce
from lightning_forget.callbacks.erasure_eval import evaluate_erasure
from lightning_forget.modules import DiffusionModule
from lightning_forget.modules.diffusion import digits_data
from lightning_forget.unlearning.erasure_eval import train_judge


def _cross_kv(name: str) -> bool:
    return bool(re.search(r"\.attn2\.(to_k|to_v)\.", name))


def _cross(name: str) -> bool:
    return ".attn2." in name


def _not_cross(name: str) -> bool:
    return name.startswith("unet.") and ".attn2." not in name


def _unet_layer(name: str) -> bool:  # "all": every Linear/Conv of the UNet (not the concept table, not norms)
    return name.startswith("unet.") and "norm" not in name


class Method:
    """One row of the comparison.

    ``make(erase, seed, quick)`` builds the callback (``None`` with ``closed_form``); ``lr`` is the
    module's AdamW learning rate for the erasure fit (the official ones are for Stable Diffusion);
    ``steps`` its default number of steps; ``allowed(name)`` says which module parameters the
    method may change; ``trainer`` extra ``Trainer`` arguments.
    """

    def __init__(self, make: Callable[[list[int], int, bool], Optional[pl.Callback]], allowed: Callable[[str], bool],
                 lr: float = 1e-3, steps: int = 100, closed_form: Optional[Callable[[DiffusionModule, list[int]], Any]] = None,
                 trainer: Optional[dict[str, Any]] = None) -> None:
        self.make, self.allowed, self.lr, self.steps, self.closed_form = make, allowed, lr, steps, closed_form
        self.trainer = trainer or {}


def _uce(module: DiffusionModule, erase: list[int], lamb: float) -> list[str]:
    return erase_with_uce(module, erase, None, [c for c in range(module.num_classes) if c not in erase], lamb=lamb)


def _doco(surgery: Optional[str]) -> Callable[[list[int], int, bool], pl.Callback]:
    return lambda erase, seed, q: DoCo(erase=erase, gradient_surgery=surgery, parameters="all", discriminator_lr=1e-3,
                                       discriminator_warmup=0 if q else 40, discriminator_width=32,
                                       num_anchor_samples=8 if q else 64, sample_steps=2 if q else 10, seed=seed)


#: name -> Method. The order is the report's.
METHODS: dict[str, Method] = {
    "esd-x": Method(lambda erase, seed, q: ESD(erase=erase, parameters="x", batch_size=8, ddim_steps=2 if q else 10, seed=seed),
                    _cross, lr=1e-3, steps=50),
    "esd-u": Method(lambda erase, seed, q: ESD(erase=erase, parameters="u", batch_size=8, ddim_steps=2 if q else 10, seed=seed),
                    _not_cross, lr=1e-4, steps=50),
    "esd-x-lora": Method(lambda erase, seed, q: ESD(erase=erase, parameters="x", lora_rank=4, batch_size=8,
                                                    ddim_steps=2 if q else 10, seed=seed), _cross, lr=3e-3, steps=50),
    "ca": Method(lambda erase, seed, q: ConceptAblation(erase=erase, anchor=None, batch_size=8, sample_steps=2 if q else 10,
                                                        num_anchor_samples=8 if q else 64, seed=seed), _cross_kv, lr=1e-3),
    "uce": Method(lambda erase, seed, q: None, _cross_kv, steps=0, closed_form=lambda module, erase: _uce(module, erase, 0.5)),
    # λ = 0.5 (the default) weighs W − W₀ against ‖c‖²; this model's tokens have ‖c‖² ≈ 0.1-0.3, so the default edit moves
    # the erased token's keys/values only ‖c‖²/(λ + ‖c‖²) of the way (docs/results.md); λ = 0.005 is the same edit at ≈ 97 %
    "uce-lamb0.005": Method(lambda erase, seed, q: None, _cross_kv, steps=0,
                            closed_form=lambda module, erase: _uce(module, erase, 0.005)),
    "salun": Method(lambda erase, seed, q: SalUnDiffusion(erase=erase, num_forget_samples=16 if q else 64,
                                                          sample_steps=2 if q else 10, batch_size=16 if q else 32,
                                                          mask_batch_size=64, seed=seed), lambda n: True, lr=1e-4, steps=100),
    "sfd": Method(lambda erase, seed, q: SFD(erase=erase, batch_size=8 if q else 16, seed=seed), lambda n: True, lr=1e-5,
                  steps=100, trainer={"gradient_clip_val": 1.0, "gradient_clip_algorithm": "value"}),
    "doco": Method(_doco("doco"), _unet_layer, lr=1e-4, steps=120),
    "doco-no-surgery": Method(_doco(None), _unet_layer, lr=1e-4, steps=120),
}

#: --quick: a tiny UNet (a smoke run of every piece, not a measurement).
QUICK_SIZE = {"block_out_channels": (8,), "norm_num_groups": 4, "cross_attention_dim": 8, "attention_head_dim": 4,
              "num_train_timesteps": 50}


def _trainer(root: str, callbacks: list[Any], steps: int, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=root,
                      num_sanity_val_steps=0, callbacks=callbacks, **kwargs)


def _model(size: dict[str, Any], lr: float, seed: int, path: Optional[str] = None) -> DiffusionModule:
    return DiffusionModule(lr=lr, ema_decay=None if path else 0.995, sample_steps=25, seed=seed, pretrained_path=path, **size)


def train_model(x: Tensor, y: Tensor, steps: int, seed: int, size: dict[str, Any], root: str,
                cache: Optional[Path]) -> tuple[DiffusionModule, float, bool]:
    """The seed's trained model (EMA weights) and its training time; from ``cache`` when it holds one (third value True)."""
    if cache is not None and (cache / "train.json").is_file():
        return _model(size, 2e-3, seed, str(cache)), steps * training_step_seconds(x, y, seed, size, root), True
    pl.seed_everything(seed, verbose=False)
    module = _model(size, 2e-3, seed)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    _trainer(root, [], steps).fit(module, loader)
    elapsed = time.perf_counter() - start
    module.apply_ema()
    if cache is not None:
        module.save_pretrained(str(cache))
        (cache / "train.json").write_text(json.dumps({"train_s": elapsed, "steps": steps, "seed": seed, "size": size}))
    return module, elapsed, False


def training_step_seconds(x: Tensor, y: Tensor, seed: int, size: dict[str, Any], root: str, steps: int = 20) -> float:
    """Seconds per training step of a fresh model of ``size`` (steps 6 to ``steps``; the first five warm up), measured now.

    A cached model's training time is this times its steps: measured in the same run, under the same load as the
    erasures it is compared with (the machine is shared; a time measured in another run is not comparable)."""
    times = []

    class _Clock(pl.Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            times.append(time.perf_counter())

    pl.seed_everything(seed, verbose=False)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    _trainer(root, [_Clock()], steps).fit(_model(size, 2e-3, seed), loader)
    return (times[-1] - times[4]) / (len(times) - 5)


def _base_name(name: str) -> str:
    return name.replace(".base_layer.", ".")  # a PEFT-wrapped layer's weight is its base layer's


def changed_parameters(before: DiffusionModule, after: DiffusionModule) -> tuple[list[str], float]:
    """Names of the parameters that differ (LoRA adapters merged into their base layer count as that layer), and the
    share of all the module's weights (entries) that differ (SalUn's mask bounds it)."""
    base = {n: p for n, p in before.named_parameters()}
    out, entries, total = [], 0, 0
    for name, p in after.named_parameters():
        if ".lora_" in name:
            continue
        key = _base_name(name)
        total += p.numel()
        if key in base and not torch.equal(p.detach(), base[key].detach()):
            out.append(key)
            entries += int((p.detach() != base[key].detach()).sum())
    return out, entries / max(total, 1)


class _OneStep:
    """``evaluate_erasure``'s view of an SFD generator: ``sample`` is the one-step generator."""

    def __init__(self, module: DiffusionModule, callback: SFD) -> None:
        self.module, self.callback = module, callback
        self.num_classes = module.num_classes

    def initial_noise(self, n: int, seed: int, indices: Optional[list[int]] = None) -> Tensor:
        return self.module.initial_noise(n, seed, indices=indices)

    @torch.no_grad()
    def sample(self, labels: Tensor, noise: Tensor, **_: Any) -> Tensor:
        self.module.eval()
        return self.callback._generate(self.module, labels.long(), noise).clamp(-1, 1)


def erase(name: str, trained: DiffusionModule, x: Tensor, y: Tensor, target: list[int], steps: int, seed: int, quick: bool,
          root: str) -> tuple[Any, float]:
    """Erase ``target`` from a copy of ``trained`` with method ``name``; returns what to judge and the wall time."""
    method = METHODS[name]
    module = copy.deepcopy(trained)
    start = time.perf_counter()
    if method.closed_form is not None:
        method.closed_form(module, target)
        return module, time.perf_counter() - start
    module.lr = method.lr
    callback = method.make(target, seed, quick)
    keep = ~torch.isin(y, torch.tensor(target))
    loader = DataLoader(TensorDataset(x[keep], y[keep]), batch_size=16, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    pl.seed_everything(seed, verbose=False)
    _trainer(root, [callback], steps, **method.trainer).fit(module, loader)
    seconds = time.perf_counter() - start
    return (_OneStep(module, callback) if isinstance(callback, SFD) else module), seconds


def _fmt(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "nan"
    if len(finite) == 1:
        return f"{finite[0]:.3f}"
    return f"{statistics.mean(finite):.3f} ± {statistics.stdev(finite):.3f}"


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model, 1-2 steps per method: seconds (checks only)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", default=None, help=f"subset of {list(METHODS)}")
    parser.add_argument("--erase", type=int, default=3, help="the digit to erase")
    parser.add_argument("--train-steps", type=int, default=1000)
    parser.add_argument("--erase-steps", type=int, default=None, help="steps of every trained method (default: each method's)")
    parser.add_argument("--samples-per-class", type=int, default=20)
    parser.add_argument("--ddim-steps", type=int, default=10)
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--shared-model", action="store_true",
                        help="train one model (the first seed's) and erase it under every seed (the seeds vary the erasure, the "
                             "judge and the samples, not the model)")
    parser.add_argument("--model-seed", type=int, default=None,
                        help="with --shared-model: the seed of the shared model (default: the first of --seeds), so a "
                             "later run can add seeds erasing the same cached model")
    parser.add_argument("--cache", default=None, help="folder of trained models (one per seed and size; reused)")
    parser.add_argument("--out", default=None, help="folder for results.json and results.md")
    parser.add_argument("--combine", nargs="+", default=None, metavar="FOLDER",
                        help="no run: join the complete seeds of earlier runs' results.json (a run cut mid-seed keeps only the "
                             "seeds every method finished) and write the table to --out")
    args = parser.parse_args(argv)
    if args.combine:
        rows = combine([Path(folder) / "results.json" for folder in args.combine])
        print(_write(args, rows))
        return rows
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    x, y = digits_data()
    size: dict[str, Any] = {"block_out_channels": tuple(args.widths)}
    if args.quick:
        args.train_steps, args.erase_steps, args.samples_per_class, args.ddim_steps = 3, 2, 2, 2
        size = dict(QUICK_SIZE)
        x, y = x[:200], y[:200]
    methods = args.methods or list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; known: {list(METHODS)}")
    root = args.out or "runs/diffusion_erasure"
    target = [args.erase]
    kept = [c for c in range(10) if c not in target]
    rows: dict[str, dict[str, list[float]]] = {}
    models: dict[int, tuple[DiffusionModule, float, bool]] = {}
    for seed in args.seeds:
        model_seed = (args.seeds[0] if args.model_seed is None else args.model_seed) if args.shared_model else seed
        if model_seed not in models:
            cache = None
            if args.cache and not args.quick:
                cache = Path(args.cache) / f"digits_w{'-'.join(map(str, args.widths))}_steps{args.train_steps}_seed{model_seed}"
            models[model_seed] = train_model(x, y, args.train_steps, model_seed, size, root, cache)
        trained, train_time, cached = models[model_seed]
        if cached and seed != model_seed:  # the load changes during a run: time the training step again beside this seed
            train_time = args.train_steps * training_step_seconds(x, y, seed, size, root)
        judge, judge_acc = train_judge(x, y, 10, epochs=2 if args.quick else 30, seed=seed)
        common = dict(samples_per_class=args.samples_per_class, seed=seed, num_steps=args.ddim_steps)
        before, _, _ = evaluate_erasure(trained, judge, target, kept, x, y, **common)
        original = rows.setdefault("original", {})
        for key, value in {**before, "train_s": train_time, "judge_acc": judge_acc}.items():
            original.setdefault(key, []).append(value)
        print(f"seed {seed} original ({'cached' if cached else 'trained'}, {train_time:.0f}s): "
              + ", ".join(f"{k} {v:.3f}" for k, v in before.items()), flush=True)
        for name in methods:
            steps = METHODS[name].steps if args.erase_steps is None or METHODS[name].closed_form else args.erase_steps
            result, seconds = erase(name, trained, x, y, target, steps, seed, args.quick, root)
            after, _, _ = evaluate_erasure(result, judge, target, kept, x, y, **common)
            module = result.module if isinstance(result, _OneStep) else result
            changed, share = changed_parameters(trained, module)
            row = rows.setdefault(name, {})
            extra = {"erase_s": seconds, "time_ratio": seconds / train_time, "steps": float(steps),
                     "changed_tensors": float(len(changed)), "changed_share": share,
                     "changed_only_allowed": float(all(METHODS[name].allowed(n) for n in changed))}
            for key, value in {**after, **extra}.items():
                row.setdefault(key, []).append(value)
            _write(args, rows)
            print(f"seed {seed} {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in after.items())
                  + f", {len(changed)} tensors changed, erasure {seconds:.1f}s ({seconds / train_time:.3f}x training)",
                  flush=True)
    table = _write(args, rows)
    print(table)
    return rows


def combine(paths: list[Path]) -> dict[str, dict[str, list[float]]]:
    """The rows of several runs' ``results.json`` joined seed by seed; of each run only the seeds that every method
    finished (a run stopped mid-seed has longer lists for the methods it reached)."""
    joined: dict[str, dict[str, list[float]]] = {}
    for path in paths:
        rows = json.loads(path.read_text())["rows"]
        complete = min(len(row["erased_rate"]) for row in rows.values())
        for name, row in rows.items():
            for key, values in row.items():
                joined.setdefault(name, {}).setdefault(key, []).extend(values[:complete])
    return joined


def _write(args: argparse.Namespace, rows: dict[str, dict[str, list[float]]]) -> str:
    """The report's table; written with the rows to ``args.out`` (after every method, so a cut run keeps what it measured)."""
    header = ["erased_rate", "erased_prob", "false_erased_rate", "retained_acc", "fd"]
    lines = ["| method | steps | seeds | " + " | ".join(header) + " | time/training |", "|---" * (len(header) + 4) + "|"]
    for name, row in rows.items():
        steps = str(int(row["steps"][0])) if row.get("steps", [0])[0] else "—"
        ratio = _fmt(row["time_ratio"]) if "time_ratio" in row else f"train {_fmt(row['train_s'])} s"
        lines.append(f"| {name} | {steps} | {len(row['erased_rate'])} | " + " | ".join(_fmt(row[k]) for k in header)
                     + f" | {ratio} |")
    table = "\n".join(lines)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
        (Path(args.out) / "results.md").write_text(table + "\n")
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
