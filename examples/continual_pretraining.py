"""Continual pre-training of a tiny GPT-2: English prose, then Python code, the recipe of
Ibrahim et al. (TMLR 2024): re-warm and re-decay the LR at each corpus and replay a small
share of earlier tokens in place of new ones (the token budget per corpus is unchanged).

The corpora ship with Python itself (its documentation topics and standard-library source);
tokens are bytes, the model is built from a config: nothing is downloaded.

    python examples/continual_pretraining.py [--replay 0.05] [--fast]

Validation loss and perplexity per corpus are logged as val/loss/task_{t} and val/ppl/task_{t}
(also under the corpus names); the LR schedule is visible through LearningRateMonitor. The
logger's folder (`lightning_logs/version_N`) receives `metrics.csv` and `val_losses.json` (the
final validation loss per corpus); the last line says where.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import LearningRateMonitor

from lightning_forget.callbacks import LRRewarming
from lightning_forget.datamodules import TextStreamDataModule
from lightning_forget.modules import CausalLMModule
from lightning_forget.reporting import announce_results, results_dir


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replay", type=float, default=0.05, help="share of each corpus's blocks replayed from earlier ones")
    parser.add_argument("--max-lr", type=float, default=3e-4)
    parser.add_argument("--fast", action="store_true", help="tiny data and a few steps (for tests)")
    args = parser.parse_args(argv)
    pl.seed_everything(0)
    data = TextStreamDataModule(
        corpora=["python_docs", "python_code"],
        block_size=64 if args.fast else 128,
        max_chars_per_corpus=20_000 if args.fast else 250_000,
        replay_fraction=args.replay,
        batch_size=16,
    )
    model = CausalLMModule(
        model="gpt2",
        n_layer=2,
        n_embd=64 if args.fast else 128,
        n_head=4,
        vocab_size=257,
        block_size=data.block_size,
        corpus_names=["prose", "code"],
        optimizer=partial(torch.optim.AdamW, lr=args.max_lr, weight_decay=0.1),
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=data.max_epochs,
        reload_dataloaders_every_n_epochs=1,
        callbacks=[
            LRRewarming(max_lr=args.max_lr, min_lr=args.max_lr / 10, warmup=0.01, decay="cosine"),
            *([] if args.fast else [LearningRateMonitor(logging_interval="step")]),
        ],
        limit_train_batches=4 if args.fast else 1.0,
        limit_val_batches=2 if args.fast else 1.0,
        enable_progress_bar=not args.fast,
        enable_checkpointing=False,
    )
    trainer.fit(model, data)
    losses = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/loss/")}
    for name, value in sorted(losses.items()):
        print(f"{name}: {value:.3f}")
    folder = Path(results_dir(trainer))
    summary = folder / "val_losses.json"
    if trainer.is_global_zero:
        summary.write_text(json.dumps(losses, indent=2, sort_keys=True) + "\n")
    announce_results(trainer, "continual_pretraining", sorted(folder.glob("metrics.csv")) + [summary])
    return losses


if __name__ == "__main__":
    main()
