"""Continual forgetting with GS-LoRA: a tiny ViT learns all ten MNIST digits, then forgets two per task.

1. Train the original model, a ViT built from a transformers ``ViTConfig`` (nothing is
   downloaded), on every digit: ``ForgetRetainDataModule(joint=True)`` serves its whole training
   pool and keeps a held-out split for membership inference. Save its checkpoint.
2. Forget ``[8, 9]``, ``[6, 7]``, ``[4, 5]``, ``[2, 3]`` in four tasks with ``GSLoRA`` (LoRA on the
   two feed-forward linears of every block, bounded forgetting loss, retain cross-entropy,
   group-sparse penalty, merge after each task), starting from that checkpoint
   (``pretrained_ckpt``). ``ForgetRetainEvaluation`` prints Acc_f / Acc_r / Acc_o / H-mean / MIA
   AUC after each task and writes ``unlearning.csv`` and ``unlearning.png``. Pass ``--plus`` for
   GS-LoRA++ (prototype loss).

Everything goes into one results folder, by the library's rule (the logger's directory: one
``lightning_logs/version_N`` shared by both fits; or ``--out DIR``): ``original.ckpt``,
``unlearning.csv``, ``unlearning.png``; the last line says where.

    python examples/gs_lora_forget.py [--fast] [--plus] [--out DIR]
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_forget.callbacks import ForgetRetainEvaluation, GSLoRA
from lightning_forget.datamodules import ForgetRetainDataModule
from lightning_forget.modules import ContinualClassifier
from lightning_forget.nn import ViT
from lightning_forget.reporting import announce_results, results_dir

FORGET = [[8, 9], [6, 7], [4, 5], [2, 3]]


def data(fast: bool, joint: bool) -> ForgetRetainDataModule:
    tasks = FORGET[:2] if fast else FORGET
    return ForgetRetainDataModule(builtin="mnist", forget_classes=tasks, joint=joint, data_ratio=0.1,
                                  epochs_per_task=(1 if fast else 6) if joint else (1 if fast else 3),
                                  batch_size=64 if joint else 32, seed=0)


def model(dm: ForgetRetainDataModule, lr: float) -> ContinualClassifier:
    torch.manual_seed(0)
    backbone = ViT(input_shape=dm.input_shape, patch_size=7, hidden_size=64, num_hidden_layers=4, num_attention_heads=4)
    return ContinualClassifier(backbone=backbone, num_classes=dm.num_classes, input_shape=dm.input_shape,
                               num_tasks=dm.num_tasks + 1, report=False,
                               optimizer=functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.05))


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="two tasks, one epoch each (a smoke run)")
    parser.add_argument("--plus", action="store_true", help="GS-LoRA++ (prototype loss)")
    parser.add_argument("--out", type=str, default=None, help="results folder (default: the logger's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pl.seed_everything(0)
    # One logger object for both fits: one folder. With --out, no logger and that default_root_dir.
    logger = CSVLogger(save_dir=".", name="lightning_logs") if args.out is None else False
    where = {} if args.out is None else {"default_root_dir": args.out}
    common = dict(accelerator="cpu", devices=1, logger=logger, enable_progress_bar=False, enable_model_summary=False,
                  reload_dataloaders_every_n_epochs=1, num_sanity_val_steps=0, limit_val_batches=0, **where)

    # 1. the original model, on every digit
    original = data(args.fast, joint=True)
    net = model(original, lr=3e-3)
    trainer = pl.Trainer(max_epochs=original.max_epochs, enable_checkpointing=False, **common)
    trainer.fit(net, original)
    folder = Path(results_dir(trainer))
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = folder / "original.ckpt"
    trainer.save_checkpoint(ckpt)

    # 2. forget two digits per task, starting from the original weights
    dm = data(args.fast, joint=False)
    gs = GSLoRA(r=8, lora_alpha=8.0, alpha=1e-2, beta=1.0, bound=7.0, prototype=args.plus, prototype_forget_weight=0.1,
                prototype_bound=2.0, pretrained_ckpt=str(ckpt))
    evaluation = ForgetRetainEvaluation(split="test", log_dir=str(folder))
    forget_net = model(dm, lr=1e-2)
    trainer = pl.Trainer(max_epochs=dm.max_epochs, enable_checkpointing=False, callbacks=[gs, evaluation], **common)
    trainer.fit(forget_net, dm)
    edited = [f"task {t}: {len(blocks)} block(s) {blocks}" for t, blocks in enumerate(gs.nonzero)]
    print("GS-LoRA edited:", "; ".join(edited))
    announce_results(trainer, "gs_lora_forget", [ckpt, folder / "unlearning.csv", folder / "unlearning.png"])
    return evaluation.rows


if __name__ == "__main__":
    main()
