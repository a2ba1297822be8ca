"""DoCo (with and without the concept-preserving gradient), SalUn (generative) and SFD on a digits diffusion model.

Per run (one command, the same machine):

1. a class-conditional :class:`~lightning_forget.modules.DiffusionModule` (``preset="digits"``,
   cross-attention on per-class tokens) is trained on scikit-learn's 8×8 digits, and a small CNN
   classifier on the same images (the judge);
2. for each seed and method the trained model erases digit ``--erase`` with the library's callback,
   fine-tuning on the retained digits for ``--steps`` steps;
3. ``--samples`` images per class are generated (DDIM with the module's guidance; SFD's one-step
   generator for SFD) and classified: the **erased-class rate** (share of the erased class's
   samples the judge calls that class), its mean probability, and the **retained accuracy** (share
   of the other classes' samples judged as their class); erasure time over the model's training time.

Prints a table (mean ± std over seeds) with the original model beside the methods.

    PYTHONPATH=$PWD python benchmarks/diffusion_erasure_b.py --seeds 3 --out runs/erasure_b
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_forget.callbacks import SFD, DoCo, SalUnDiffusion
from lightning_forget.modules.diffusion import DiffusionModule, digits_data

#: The methods of this comparison: name → callback factory (erased id, quick) → callback.
METHODS: dict[str, Callable[[int, bool], pl.Callback]] = {
    "doco": lambda c, q: DoCo(erase=[c], parameters="all", discriminator_warmup=5 if q else 50, discriminator_lr=1e-3,
                              discriminator_width=32, num_anchor_samples=16 if q else 64, sample_steps=5 if q else 20),
    "doco_no_surgery": lambda c, q: DoCo(erase=[c], gradient_surgery=None, parameters="all", discriminator_warmup=5 if q else 50,
                                         discriminator_lr=1e-3, discriminator_width=32, num_anchor_samples=16 if q else 64,
                                         sample_steps=5 if q else 20),
    "salun": lambda c, q: SalUnDiffusion(erase=[c], num_forget_samples=16 if q else 128, sample_steps=5 if q else 20,
                                         batch_size=16 if q else 64, mask_batch_size=64),
    "sfd": lambda c, q: SFD(erase=[c], batch_size=8 if q else 32),
}
#: Learning rates of the module's AdamW during erasure, per method.
ERASE_LR = {"doco": 1e-4, "doco_no_surgery": 1e-4, "salun": 1e-4, "sfd": 1e-5}


def _trainer(root: Path, callbacks: list[Any], **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(root), callbacks=callbacks,
                      num_sanity_val_steps=0, **kwargs)


def train_judge(x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    """A small CNN on the [-1, 1] digit images (the judge of generated samples)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(epochs):
        for xb, yb in DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True):
            opt.zero_grad()
            F.cross_entropy(net(xb), yb).backward()
            opt.step()
    return net.eval()


def judge(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, erased: int) -> dict[str, float]:
    with torch.no_grad():
        probs = net(images.clamp(-1, 1)).softmax(-1)
    pred = probs.argmax(-1)
    forget, kept = labels == erased, labels != erased
    return {
        "erased_rate": float((pred[forget] == erased).float().mean()),
        "erased_prob": float(probs[forget, erased].mean()),
        "retained_acc": float((pred[kept] == labels[kept]).float().mean()),
    }


def generate(module: DiffusionModule, callback: Optional[pl.Callback], per_class: int, steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(10).repeat_interleave(per_class)
    if isinstance(callback, SFD):
        return callback.generate(module, labels, seed=seed), labels
    return module.sample(labels, seed=seed, num_steps=steps), labels


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seconds: a few steps of everything, one seed")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--erase", type=int, default=3)
    parser.add_argument("--train-epochs", type=int, default=40)
    parser.add_argument("--steps", type=int, default=200, help="erasure steps per method")
    parser.add_argument("--samples", type=int, default=50, help="generated images per class")
    parser.add_argument("--ddim-steps", type=int, default=20)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", type=str, default="runs/diffusion_erasure_b")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.train_epochs, args.steps, args.samples, args.ddim_steps = 1, 1, 3, 2, 3
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x, y = digits_data()
    #: --quick: a tiny UNet on 200 images (a smoke run of every piece, not a measurement)
    size = {"block_out_channels": [8], "norm_num_groups": 4, "cross_attention_dim": 8, "attention_head_dim": 4,
            "num_train_timesteps": 50} if args.quick else {}
    if args.quick:
        x, y = x[:200], y[:200]
    retained = y != args.erase
    pl.seed_everything(0)
    model = DiffusionModule(unet="conditional", preset="digits", lr=1e-3, **size)
    started = time.perf_counter()
    _trainer(out / "train", [], max_epochs=args.train_epochs).fit(model, DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True))
    train_time = time.perf_counter() - started
    model.save_pretrained(str(out / "original"))
    net = train_judge(x, y, 1 if args.quick else 8)
    rows: dict[str, list[dict[str, float]]] = {"original": []}
    for seed in range(args.seeds):
        images, labels = generate(model, None, args.samples, args.ddim_steps, seed)
        rows["original"].append({**judge(net, images, labels, args.erase), "time_ratio": 0.0})
        for name in args.methods:
            pl.seed_everything(seed)
            module = DiffusionModule(unet="conditional", preset="digits", pretrained_path=str(out / "original"),
                                     lr=ERASE_LR[name], **size)
            callback = METHODS[name](args.erase, args.quick)
            callback.seed = seed
            started = time.perf_counter()
            clip = {"gradient_clip_val": 1.0, "gradient_clip_algorithm": "value"} if name == "sfd" else {}
            _trainer(out / name, [callback], max_steps=args.steps, max_epochs=-1, **clip).fit(
                module, DataLoader(TensorDataset(x[retained], y[retained]), batch_size=32, shuffle=True))
            elapsed = time.perf_counter() - started
            images, labels = generate(module, callback, args.samples, args.ddim_steps, seed)
            rows.setdefault(name, []).append({**judge(net, images, labels, args.erase), "time_ratio": elapsed / train_time})
    summary: dict[str, Any] = {}
    print(f"erase digit {args.erase}; {args.seeds} seed(s); {args.steps} erasure steps; model trained {args.train_epochs} "
          f"epochs in {train_time:.0f} s")
    print(f"{'method':18s}{'erased rate':>18s}{'erased prob':>18s}{'retained acc':>18s}{'time/train':>12s}")
    for name, runs in rows.items():
        stats = {}
        for key in ("erased_rate", "erased_prob", "retained_acc", "time_ratio"):
            values = [r[key] for r in runs]
            stats[key] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        summary[name] = {"runs": runs, "mean_std": stats}
        print(f"{name:18s}" + "".join(f"{stats[k][0]:>11.3f} ± {stats[k][1]:.3f}" for k in ("erased_rate", "erased_prob",
                                                                                          "retained_acc"))
              + f"{stats['time_ratio'][0]:>12.3f}")
    (out / "diffusion_erasure_b.json").write_text(json.dumps({"args": vars(args), "train_time": train_time,
                                                              "summary": summary}, indent=1))
    return summary


if __name__ == "__main__":
    main()
