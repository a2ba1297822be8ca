"""Continual forgetting on MNIST with a tiny ViT: GS-LoRA vs GS-LoRA++ vs LoRA gradient ascent vs
fine-tuning on the retained data vs retraining from scratch, all measured in the same run.

Stream: a ViT (transformers ``ViTConfig``, built from the config, no download) is trained on all
ten digits of the embedded 5k MNIST subset (minus a 10% held-out split for membership
inference), then forgets ``[8, 9]``, ``[6, 7]``, ``[4, 5]``, ``[2, 3]`` in four tasks (digits 0
and 1 are never forgotten). Each forgetting method sees ``data_ratio`` of each stream, as the
official GS-LoRA runs do. Per task and method it prints Acc_f (accuracy on the classes forgotten
now), Acc_r (classes still retained), Acc_o (classes forgotten earlier), H-mean (from the
accuracy on the forget classes before the task), the MIA AUC (loss-threshold attack, forget
training samples vs held-out samples of the same classes: 0.5 = indistinguishable), the fraction
of blocks the merged LoRA edited, and the wall time relative to retraining from scratch for that
task.

    python benchmarks/gslora.py --quick          # a smoke run (seconds)
    python benchmarks/gslora.py --seeds 0 1 2    # the documented run
"""

from __future__ import annotations

import argparse
import copy
import math
import time
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader

from lightning_forget.callbacks import GSLoRA
from lightning_forget.datamodules import ForgetRetainDataModule
from lightning_forget.metrics import h_mean, membership_scores, mia_auc

FORGET = [[8, 9], [6, 7], [4, 5], [2, 3]]


class ViTClassifier(pl.LightningModule):
    """A tiny transformers ViT as a LightningModule (logits out, cross-entropy step)."""

    def __init__(self, hidden: int = 64, layers: int = 4, lr: float = 1e-2) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=4, intermediate_size=2 * hidden, num_labels=10)
        self.vit = ViTForImageClassification(config)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(pixel_values=x).logits

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr, weight_decay=0.05)


def train_plain(model: nn.Module, loader: DataLoader, epochs: int, lr: float) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.05)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()


@torch.no_grad()
def accuracy(model: nn.Module, dataset) -> float:
    model.eval()
    hits = [(model(x).argmax(1) == y).float() for x, y in DataLoader(dataset, batch_size=256)]
    return torch.cat(hits).mean().item() if hits else float("nan")


@torch.no_grad()
def mia(model: nn.Module, dm: ForgetRetainDataModule, task: int) -> float:
    model.eval()
    sets = dm.mia_datasets(task)

    def scores(ds):
        return torch.cat([membership_scores(model(x), y) for x, y in DataLoader(ds, batch_size=256)])

    return mia_auc(scores(sets["forget"]), scores(sets["heldout"]))


def evaluate(model: nn.Module, dm: ForgetRetainDataModule, task: int, acc_f_before: float) -> dict[str, float]:
    sets = [dm.test_dataset(i) for i in range(dm.num_tasks + 1)]
    roles = dm.loader_roles(task)
    acc_f = accuracy(model, sets[task])
    acc_r = accuracy(model, ConcatDataset([sets[i] for i in roles["retain"]]))
    acc_o = accuracy(model, ConcatDataset([sets[i] for i in roles["old"]])) if roles["old"] else float("nan")
    return {"acc_f": acc_f, "acc_r": acc_r, "acc_o": acc_o, "h": h_mean(acc_f_before, acc_f, acc_r), "mia": mia(model, dm, task)}


class TaskEval(pl.Callback):
    """After each task's last epoch (after GSLoRA's merge, which runs first), evaluate and time it."""

    def __init__(self, dm: ForgetRetainDataModule, epochs: int, gs: GSLoRA) -> None:
        self.dm, self.epochs, self.gs = dm, epochs, gs
        self.rows: list[dict[str, float]] = []
        self.t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        if (trainer.current_epoch + 1) % self.epochs:
            return
        task = trainer.current_epoch // self.epochs
        wall = time.perf_counter() - self.t0
        before = self.before[task]
        row = evaluate(pl_module, self.dm, task, before)
        blocks = max(1, len(self.gs._group_names)) if self.gs.grouping == "block" else 1
        row["nonzero"] = len(self.gs.nonzero[-1]) / blocks if self.gs.nonzero else float("nan")
        row["wall"] = wall
        self.rows.append(row)
        pl_module.train()
        self.t0 = time.perf_counter()


def run_gslora(base: nn.Module, dm: ForgetRetainDataModule, epochs: int, before: list[float], **kw) -> list[dict[str, float]]:
    model = copy.deepcopy(base)
    gs = GSLoRA(**kw)
    ev = TaskEval(dm, epochs, gs)
    ev.before = before
    trainer = pl.Trainer(max_epochs=dm.max_epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, reload_dataloaders_every_n_epochs=1,
                         limit_val_batches=0, num_sanity_val_steps=0, callbacks=[gs, ev])
    ev.t0 = time.perf_counter()
    trainer.fit(model, dm)
    return ev.rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 seed, 2 tasks, 1 epoch each")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--pretrain-epochs", type=int, default=6)
    parser.add_argument("--forget-epochs", type=int, default=3)
    parser.add_argument("--data-ratio", type=float, default=0.1)
    parser.add_argument("--bound", type=float, default=7.0)
    parser.add_argument("--alpha", type=float, default=1e-2, help="group-sparse weight")
    parser.add_argument("--tasks", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    warnings.filterwarnings("ignore")
    tasks = FORGET[:2] if args.quick else FORGET[: args.tasks]
    pre_epochs = 1 if args.quick else args.pretrain_epochs
    f_epochs = 1 if args.quick else args.forget_epochs
    seeds = args.seeds[:1] if args.quick else args.seeds
    methods = ["original", "GS-LoRA", "GS-LoRA++", "LoRA GA", "FT retain", "retrain"]
    results: dict[str, list[list[dict[str, float]]]] = {m: [] for m in methods}
    common = dict(bound=args.bound, beta=1.0, lora_alpha=8.0, alpha=args.alpha)
    for seed in seeds:
        pl.seed_everything(seed, verbose=False)
        dm = ForgetRetainDataModule(builtin="mnist", forget_classes=tasks, data_ratio=args.data_ratio, batch_size=32,
                                    epochs_per_task=f_epochs, seed=seed)
        dm.setup()
        base = ViTClassifier()
        t0 = time.perf_counter()
        train_plain(base, DataLoader(dm.pretrain_dataset(), batch_size=64, shuffle=True,
                                     generator=torch.Generator().manual_seed(seed)), pre_epochs, 3e-3)
        pre_wall = time.perf_counter() - t0
        # accuracy on each task's forget classes just before that task (for the H-mean), from the
        # original model for the first task and each method's own previous state afterwards
        original = [accuracy(base, dm.test_dataset(i)) for i in range(len(tasks))]
        print(f"seed {seed}: original model acc per forget set {['%.3f' % a for a in original]}, "
              f"retained {accuracy(base, dm.test_dataset(len(tasks))):.3f}, pretraining {pre_wall:.1f}s")
        rows = []
        for t in range(len(tasks)):  # the original model, measured on each task's sets (no forgetting)
            row = evaluate(base, dm, t, original[t])
            row.update(nonzero=float("nan"), wall=float("nan"))
            rows.append(row)
        results["original"].append(rows)
        results["GS-LoRA"].append(run_gslora(base, dm, f_epochs, original, **common))
        results["GS-LoRA++"].append(run_gslora(base, dm, f_epochs, original, prototype=True, prototype_forget_weight=0.1,
                                               prototype_bound=2.0, **common))
        results["LoRA GA"].append(run_gslora(base, dm, f_epochs, original, bound=1e4, beta=1.0, lora_alpha=8.0, alpha=0.0))
        # fine-tune every weight on the retained stream only
        model, rows = copy.deepcopy(base), []
        for t in range(len(tasks)):
            t0 = time.perf_counter()
            train_plain(model, DataLoader(dm.retain_train_dataset(t), batch_size=32, shuffle=True,
                                          generator=torch.Generator().manual_seed(seed + t)), f_epochs, 1e-3)
            row = evaluate(model, dm, t, original[t])
            row.update(nonzero=float("nan"), wall=time.perf_counter() - t0)
            rows.append(row)
        results["FT retain"].append(rows)
        # retrain from scratch on every training-pool sample not forgotten so far
        rows = []
        pool = dm.pretrain_dataset()
        labels = torch.tensor([int(pool[i][1]) for i in range(len(pool))])
        for t in range(len(tasks)):
            gone = torch.tensor([c for group in tasks[: t + 1] for c in group])
            keep = (~torch.isin(labels, gone)).nonzero().flatten().tolist()
            torch.manual_seed(seed + 100 + t)
            model = ViTClassifier()
            t0 = time.perf_counter()
            train_plain(model, DataLoader(torch.utils.data.Subset(pool, keep), batch_size=64, shuffle=True,
                                          generator=torch.Generator().manual_seed(seed + t)), pre_epochs, 3e-3)
            row = evaluate(model, dm, t, original[t])
            row.update(nonzero=float("nan"), wall=time.perf_counter() - t0)
            rows.append(row)
        results["retrain"].append(rows)

    def mean(values: list[float]) -> str:
        values = [v for v in values if not math.isnan(v)]
        if not values:
            return "-"
        m = sum(values) / len(values)
        if len(values) == 1:
            return f"{m:.3f}"
        sd = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5
        return f"{m:.3f}±{sd:.3f}"

    print(f"\n{len(seeds)} seed(s); {len(tasks)} tasks; forgetting epochs {f_epochs}, data_ratio {args.data_ratio}; "
          f"retrain: {pre_epochs} epochs from scratch. Acc on the test split; time relative to retraining that task.")
    print("| task | method | Acc_f ↓ | Acc_r ↑ | Acc_o ↓ | H ↑ | MIA AUC (→0.5) | non-zero blocks | time / retrain |")
    print("|---|---|---|---|---|---|---|---|---|")
    for t in range(len(tasks)):
        for m in methods:
            rows = [r[t] for r in results[m]]
            ratio = [rows[i]["wall"] / results["retrain"][i][t]["wall"] for i in range(len(rows))]
            print(f"| {t} ({tasks[t]}) | {m} | {mean([r['acc_f'] for r in rows])} | {mean([r['acc_r'] for r in rows])} | "
                  f"{mean([r['acc_o'] for r in rows])} | {mean([r['h'] for r in rows])} | {mean([r['mia'] for r in rows])} | "
                  f"{mean([r['nonzero'] for r in rows])} | {mean(ratio)} |")


    print(f"\ntotal wall time {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
