"""LiNeS after fine-tuning: keep what a model knew while it learns something new.

1. "Pre-train" a classifier on Split Digits task 0 (digits 0 and 1) and save its checkpoint.
2. Fine-tune it on task 1 (digits 2 and 3) with the `LiNeS` callback: at the end of the fit the
   fine-tuning update of each block is scaled by lambda(l) = alpha + (1 - alpha)(l-1)/(L-1), so
   shallow layers return towards the pre-trained weights. alpha is chosen from a grid on the
   average validation accuracy over both tasks (`monitor="val/acc_avg"`).
3. Print the accuracy on both tasks for the pre-trained, the fine-tuned and the LiNeS model.

Everything goes into one results folder, by the library's rule (the logger's directory: one
`lightning_logs/version_N` shared by both fits; or `--out DIR`): `pretrained.ckpt`, the
fine-tuned weights before scaling (`unscaled_weights.pt`), the weights after LiNeS
(`lines_scaled_weights.pt`), the scale of each block (`lines_scales.png`) and `accuracies.json`;
the last line says where.

    python examples/lines_finetune.py [--fast] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_forget.callbacks import LiNeS
from lightning_forget.datamodules import SplitDigits
from lightning_forget.modules import ContinualClassifier
from lightning_forget.reporting import announce_results, results_dir


def accuracy(model: ContinualClassifier, data: SplitDigits, task: int) -> float:
    x, y = (torch.stack(t) for t in zip(*[data.val_dataset(task)[i] for i in range(len(data.val_dataset(task)))]))
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fast", action="store_true", help="fewer epochs (for tests)")
    parser.add_argument("--out", default=None, help="results folder (default: a new lightning_logs/version_N)")
    args = parser.parse_args(argv)
    epochs = 1 if args.fast else 5
    pl.seed_everything(0)
    model = ContinualClassifier(hidden_sizes=[128, 128], num_classes=10, input_shape=(1, 8, 8), num_tasks=5, report=False)
    # One logger object for both fits: one folder. With --out, no logger and that default_root_dir.
    logger = CSVLogger(save_dir=".", name="lightning_logs") if args.out is None else False
    where = {} if args.out is None else {"default_root_dir": args.out}
    quiet = {"accelerator": "cpu", "enable_progress_bar": False, "logger": logger, "enable_checkpointing": False, **where}

    pretrain = SplitDigits(task=0, epochs_per_task=epochs, batch_size=16)
    trainer = pl.Trainer(max_epochs=epochs, reload_dataloaders_every_n_epochs=1, **quiet)
    trainer.fit(model, pretrain)
    out = Path(results_dir(trainer))
    trainer.save_checkpoint(out / "pretrained.ckpt")
    results = {"pre-trained": [accuracy(model, pretrain, t) for t in (0, 1)]}

    finetune = SplitDigits(task=1, epochs_per_task=epochs, batch_size=16)
    lines = LiNeS(alpha_grid=[0.0, 0.2, 0.4, 0.6, 0.8, 1.0], monitor="val/acc_avg", head_policy="alpha")
    trainer = pl.Trainer(max_epochs=epochs, reload_dataloaders_every_n_epochs=1, callbacks=[lines], **quiet)
    trainer.fit(model, finetune)
    results["LiNeS (alpha=%s)" % lines.applied_alpha] = [accuracy(model, finetune, t) for t in (0, 1)]
    model.load_state_dict(lines.unscaled_state_dict, strict=False)
    results["fine-tuned (unscaled)"] = [accuracy(model, finetune, t) for t in (0, 1)]
    for name, (old, new) in results.items():
        print(f"{name:>24}: digits 0-1 {old:.3f} | digits 2-3 {new:.3f}")
    accuracies = out / "accuracies.json"
    accuracies.write_text(json.dumps({name: {"digits_0_1": old, "digits_2_3": new} for name, (old, new) in results.items()}, indent=2) + "\n")
    announce_results(trainer, "lines_finetune", sorted(out.glob("*.pt")) + [out / "pretrained.ckpt", accuracies])
    return results


if __name__ == "__main__":
    main()
