"""LiNeS after fine-tuning: keep what a model knew while it learns something new.

1. "Pre-train" a classifier on Split Digits task 0 (digits 0 and 1) and save its checkpoint.
2. Fine-tune it on task 1 (digits 2 and 3) with the `LiNeS` callback: at the end of the fit the
   fine-tuning update of each block is scaled by lambda(l) = alpha + (1 - alpha)(l-1)/(L-1), so
   shallow layers return towards the pre-trained weights. alpha is chosen from a grid on the
   average validation accuracy over both tasks (`monitor="val/acc_avg"`).
3. Print the accuracy on both tasks for the pre-trained, the fine-tuned and the LiNeS model.

Both weights are saved in the output folder: `unscaled_weights.pt` (fine-tuned) and
`lines_scaled_weights.pt` (after LiNeS), with `lines_scales.png` (the scale of each block).

    python examples/lines_finetune.py [--fast]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_forget.callbacks import LiNeS
from lightning_forget.datamodules import SplitDigits
from lightning_forget.modules import ContinualClassifier


def accuracy(model: ContinualClassifier, data: SplitDigits, task: int) -> float:
    x, y = (torch.stack(t) for t in zip(*[data.val_dataset(task)[i] for i in range(len(data.val_dataset(task)))]))
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fast", action="store_true", help="fewer epochs (for tests)")
    parser.add_argument("--out", default=None, help="where checkpoints and logs go (default: a temp dir)")
    args = parser.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="lines_example_"))
    epochs = 1 if args.fast else 5
    pl.seed_everything(0)
    model = ContinualClassifier(hidden_sizes=[128, 128], num_classes=10, input_shape=(1, 8, 8), num_tasks=5, report=False)
    quiet = {"accelerator": "cpu", "enable_progress_bar": False, "logger": False, "enable_checkpointing": False}

    pretrain = SplitDigits(task=0, epochs_per_task=epochs, batch_size=16)
    trainer = pl.Trainer(max_epochs=epochs, reload_dataloaders_every_n_epochs=1, default_root_dir=str(out), **quiet)
    trainer.fit(model, pretrain)
    trainer.save_checkpoint(out / "pretrained.ckpt")
    results = {"pre-trained": [accuracy(model, pretrain, t) for t in (0, 1)]}

    finetune = SplitDigits(task=1, epochs_per_task=epochs, batch_size=16)
    lines = LiNeS(alpha_grid=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0], monitor="val/acc_avg", head_policy="alpha")
    trainer = pl.Trainer(
        max_epochs=epochs, reload_dataloaders_every_n_epochs=1, callbacks=[lines], default_root_dir=str(out), **quiet
    )
    trainer.fit(model, finetune)
    results["LiNeS (alpha=%s)" % lines.applied_alpha] = [accuracy(model, finetune, t) for t in (0, 1)]
    model.load_state_dict(lines.unscaled_state_dict, strict=False)
    results["fine-tuned (unscaled)"] = [accuracy(model, finetune, t) for t in (0, 1)]
    for name, (old, new) in results.items():
        print(f"{name:>24}: digits 0-1 {old:.3f} | digits 2-3 {new:.3f}")
    return results


if __name__ == "__main__":
    main()
