"""Sequential LoRA vs ER-LoRA vs I-LoRA on the embedded instruction stream (docs/results.md).

Protocol (small, CPU): per seed, a tiny GPT-2 (2 layers, width 64, bytes) is first pre-trained in
full on Python's help topics (``--pretrain-steps`` next-token steps, the same base weights for the
three methods of that seed), then LoRA (r 8, α 32, dropout 0.1, attention and MLP projections)
is trained on the three instruction tasks of ``InstructionStreamDataModule`` in order
(category → next_word → length_sum; 192 training and 48 validation examples each, one epoch
per task), AdamW lr 1e-3, batch 16:

- ``lora``: sequential LoRA fine-tuning, no replay;
- ``er_lora``: ``ExperienceReplay`` (reservoir pinned, as I-LoRA's own buffer; 500 samples, a replay
  batch joined to each batch);
- ``i_lora``: ``ILoRA`` with the official λ = 0.25, γ = 1, 500 samples, evaluated with the slow
  learner; also ``i_lora_λ0.99`` (a slow learner that averages over ~100 steps).
  ``train("i_lora_fast", ...)`` evaluates with the fast learner instead (not in the default list).

Printed, measured in this one run: average final exact match over the tasks and its forgetting
(mean ± std over seeds, from the exact-match accuracy matrix), the final answer loss averaged
over tasks, and each method's training step time and peak memory relative to ER-LoRA. Each run
trains in a forked child process so its peak resident memory (``ru_maxrss``; on a GPU the
peak allocated memory) is its own.

    python benchmarks/ilora.py            # full: 3 seeds
    python benchmarks/ilora.py --quick    # one seed, a few steps per task (a smoke run)

``--stream vit``: the same three baselines on Split MNIST (5 tasks of 2 digits, the embedded 5k
subset, one epoch per task, batch 32) with a tiny ViT built from a ViTConfig (hidden 32, 2
blocks, 2 heads, patch 7; random weights, frozen) inside ``ContinualClassifier``: LoRA (same
settings) on the ViT, the linear head trained, AdamW lr 3e-3; the metric is class-incremental
accuracy (no loss column).

    python benchmarks/ilora.py --stream vit

``--stream rotated``: a stream on which sequential LoRA forgets part of what it learned, not
all: Rotated MNIST (the embedded 5k subset; four domains at 0°, 20°, 40°, 60°, the same ten
digits in each; one epoch per task, batch 32). Per seed, the tiny ViT classifier (as above) is
first trained in full on the upright training split for ``--pretrain-epochs`` epochs (the same
weights for every method of that seed); then the backbone is frozen, LoRA (same settings) goes on
it and the head keeps training, AdamW lr 3e-3. Methods: sequential LoRA, ER-LoRA (500-sample
reservoir), I-LoRA with λ = 0.25 (official value), λ = 0.99, and ``slow_update="frozen"`` (what
the official code effectively runs: the slow learner is the pre-trained model), each evaluated
with the slow learner. Domain-incremental accuracy on every domain after each task.

    python benchmarks/ilora.py --stream rotated

``--methods`` runs a subset (ER-LoRA always runs: it is the step-time reference);
``--gradient-clip-val`` clips every method's gradient norm (the official runs' HF ``Trainer`` default is 1.0):

    python benchmarks/ilora.py --stream rotated --methods i_lora --gradient-clip-val 1.0
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import resource
import statistics
import time
from functools import partial
from typing import Any, Optional

import torch

RANK_SETTINGS = {"r": 8, "alpha": 32.0, "dropout": 0.1, "kind": "all"}
METHODS = ("lora", "er_lora", "i_lora", "i_lora_λ0.99")


def pretrained_base(seed: int, steps: int) -> dict[str, torch.Tensor]:
    """A tiny GPT-2 trained in full on Python's help topics for ``steps`` steps (state dict)."""
    import lightning.pytorch as pl

    from lightning_forget.datamodules import TextStreamDataModule
    from lightning_forget.modules.causal_lm import build_tiny_causal_lm, causal_lm_loss

    pl.seed_everything(seed, verbose=False)
    model = build_tiny_causal_lm("gpt2", 257, 96, 2, 64, 4)
    if steps:
        data = TextStreamDataModule(corpora=["python_docs"], block_size=96, max_chars_per_corpus=400_000, batch_size=16, seed=seed)
        data.setup("fit")
        dataset = data.train_dataset(0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(steps):
            rows = torch.randint(len(dataset), (16,), generator=generator)
            ids = torch.stack([dataset[int(i)]["input_ids"] for i in rows])
            loss = causal_lm_loss(model(input_ids=ids).logits, ids)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train(method: str, seed: int, base: dict[str, torch.Tensor], quick: bool, clip: Optional[float] = None) -> dict[str, Any]:
    """One continual run; returns the accuracy matrix, final losses, step time and peak memory."""
    import lightning.pytorch as pl

    from lightning_forget.callbacks import ContinualMetrics, ExperienceReplay, ILoRA
    from lightning_forget.callbacks.i_lora import TOKEN_PAD_VALUES
    from lightning_forget.datamodules import InstructionStreamDataModule
    from lightning_forget.lora import LoRASettings, add_lora
    from lightning_forget.modules import CausalLMModule

    torch.set_num_threads(1)
    pl.seed_everything(seed, verbose=False)
    data = InstructionStreamDataModule(examples_per_task=32 if quick else 192, val_examples_per_task=16 if quick else 48,
                                       batch_size=16, epochs_per_task=1, seed=seed)
    model = CausalLMModule("gpt2", vocab_size=257, block_size=96, n_layer=2, n_embd=64, n_head=4,
                           optimizer=partial(torch.optim.AdamW, lr=1e-3))
    model.model.load_state_dict(base)
    settings = LoRASettings(**RANK_SETTINGS)
    callbacks: list[Any] = [ContinualMetrics(key="val/exact_match/task_{task}", report=False)]
    if method == "er_lora":
        model.model = add_lora(model.model, settings)
        callbacks.append(ExperienceReplay(buffer_size=500, seed=seed, update="reservoir", draw="step", pad_values=dict(TOKEN_PAD_VALUES)))
    elif method.startswith("i_lora"):
        ema = 0.99 if method.endswith("0.99") else 0.25
        learner = "fast" if method.endswith("fast") else "slow"
        callbacks.append(ILoRA(lora=settings, ema=ema, buffer_size=500, seed=seed, inference_learner=learner, save_adapters=False))
    else:
        model.model = add_lora(model.model, settings)
    trainer = pl.Trainer(
        accelerator="auto", devices=1, max_epochs=data.max_epochs, reload_dataloaders_every_n_epochs=1,
        enable_progress_bar=False, enable_model_summary=False, logger=False, enable_checkpointing=False,
        num_sanity_val_steps=0, callbacks=callbacks, limit_train_batches=2 if quick else None,
        gradient_clip_val=clip,
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    metrics = callbacks[0]
    losses = [float(trainer.callback_metrics[f"val/loss/task_{t}"]) for t in range(data.num_tasks)]
    peak = (torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"matrix": metrics.matrix.tolist(), "summary": metrics.summary, "loss": sum(losses) / len(losses),
            "step_seconds": seconds / max(trainer.global_step, 1), "peak_mb": peak}


VIT_METHODS = ("lora", "er_lora", "i_lora")


def train_vit(method: str, seed: int, base: Any, quick: bool, clip: Optional[float] = None) -> dict[str, Any]:
    """One Split MNIST run of a tiny ViT (random weights from a ViTConfig, frozen) with LoRA and a trained head."""
    import lightning.pytorch as pl

    from lightning_forget.datamodules import SplitMNIST
    from lightning_forget.modules import ContinualClassifier
    from lightning_forget.nn import ViT

    torch.set_num_threads(1)
    pl.seed_everything(seed, verbose=False)
    data = SplitMNIST(batch_size=32, epochs_per_task=1, seed=seed)
    model = ContinualClassifier(
        backbone=ViT((1, 28, 28), patch_size=7, hidden_size=32, num_hidden_layers=2, num_attention_heads=2),
        num_classes=10, input_shape=(1, 28, 28), num_tasks=5, report=False,
        optimizer=partial(torch.optim.AdamW, lr=3e-3),
    )
    return _fit_vit(method, seed, model, data, quick, clip)


ROTATED_METHODS = ("lora", "er_lora", "i_lora", "i_lora_λ0.99", "i_lora_frozen")
ROTATED_ANGLES = [0.0, 20.0, 40.0, 60.0]


def _rotated_classifier() -> Any:
    from lightning_forget.modules import ContinualClassifier
    from lightning_forget.nn import ViT

    return ContinualClassifier(
        backbone=ViT((1, 28, 28), patch_size=7, hidden_size=32, num_hidden_layers=2, num_attention_heads=2),
        num_classes=10, input_shape=(1, 28, 28), num_tasks=len(ROTATED_ANGLES), report=False,
        optimizer=partial(torch.optim.AdamW, lr=3e-3),
    )


def pretrained_vit(seed: int, epochs: int) -> dict[str, torch.Tensor]:
    """The tiny ViT classifier trained in full on upright MNIST (the first domain's training split) for ``epochs``."""
    import lightning.pytorch as pl
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from lightning_forget.datamodules import RotatedMNIST

    pl.seed_everything(seed, verbose=False)
    data = RotatedMNIST(angles=ROTATED_ANGLES, batch_size=32, seed=seed)
    data.setup("fit")
    model = _rotated_classifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = DataLoader(data.train_dataset(0), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train_rotated(method: str, seed: int, base: Any, quick: bool, clip: Optional[float] = None) -> dict[str, Any]:
    """One Rotated MNIST run (4 domains, 0/30/60/90 degrees) of a tiny ViT (random weights, frozen) with LoRA
    and a trained head: the same ten digits in every task, so sequential LoRA forgets partly, not completely."""
    import lightning.pytorch as pl

    from lightning_forget.datamodules import RotatedMNIST

    torch.set_num_threads(1)
    pl.seed_everything(seed, verbose=False)
    data = RotatedMNIST(angles=ROTATED_ANGLES, batch_size=32, epochs_per_task=1, seed=seed)
    model = _rotated_classifier()
    model.load_state_dict(base)
    return _fit_vit(method, seed, model, data, quick, clip)


def _fit_vit(method: str, seed: int, model: Any, data: Any, quick: bool, clip: Optional[float] = None) -> dict[str, Any]:
    """Put the method on ``model.backbone`` (a ViT), fit the stream, return the accuracy matrix, step time, peak memory.

    ``lora``: LoRA only; ``er_lora``: LoRA and a 500-sample reservoir ``ExperienceReplay``;
    ``i_lora``: ``ILoRA`` (λ = 0.25; ``..._λ0.99``: λ = 0.99; ``..._frozen``: ``slow_update="frozen"``).
    """
    import lightning.pytorch as pl

    from lightning_forget.callbacks import ContinualMetrics, ExperienceReplay, ILoRA
    from lightning_forget.lora import LoRASettings, add_lora

    settings = LoRASettings(**RANK_SETTINGS)
    callbacks: list[Any] = [ContinualMetrics(report=False)]
    if method.startswith("i_lora"):
        ema = 0.99 if method.endswith("0.99") else 0.25
        update = "frozen" if method.endswith("frozen") else "ema"
        callbacks.append(ILoRA(lora=settings, model_attr="backbone", ema=ema, slow_update=update, buffer_size=500,
                               seed=seed, save_adapters=False))
    else:
        model.backbone = add_lora(model.backbone, settings)
        if method == "er_lora":
            callbacks.append(ExperienceReplay(buffer_size=500, seed=seed, update="reservoir", draw="step"))
    trainer = pl.Trainer(
        accelerator="auto", devices=1, max_epochs=data.max_epochs, reload_dataloaders_every_n_epochs=1,
        enable_progress_bar=False, enable_model_summary=False, logger=False, enable_checkpointing=False,
        num_sanity_val_steps=0, callbacks=callbacks, limit_train_batches=3 if quick else None,
        limit_val_batches=2 if quick else None, gradient_clip_val=clip,
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    metrics = callbacks[0]
    return {"matrix": metrics.matrix.tolist(), "summary": metrics.summary, "loss": None,
            "step_seconds": seconds / max(trainer.global_step, 1), "peak_mb": peak}


TRAINERS = {"instructions": train, "vit": train_vit, "rotated": train_rotated}
STREAM_METHODS = {"instructions": METHODS, "vit": VIT_METHODS, "rotated": ROTATED_METHODS}


def _child(queue: Any, *args: Any) -> None:
    stream, *rest = args
    queue.put(TRAINERS[stream](*rest))


def run_isolated(*args: Any) -> dict[str, Any]:
    """``train`` in a forked child (its own peak memory)."""
    context = mp.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, *args))
    process.start()
    result = queue.get()
    process.join()
    return result


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main(argv: Optional[list[str]] = None) -> dict[str, list[dict[str, Any]]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=3, help="how many seeds")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed, first-seed + 1, ...")
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--pretrain-epochs", type=int, default=3, help="--stream rotated: full training on upright MNIST")
    parser.add_argument("--stream", choices=("instructions", "vit", "rotated"), default="instructions",
                        help="instructions: tiny GPT-2 on the instruction stream; vit: tiny ViT on Split MNIST; "
                             "rotated: pre-trained tiny ViT on Rotated MNIST")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="run only these methods of the stream (default: all; er_lora is always added: the reference)")
    parser.add_argument("--gradient-clip-val", type=float, default=None,
                        help="Trainer(gradient_clip_val=...) for every method (the official runs' HF Trainer clips at 1.0)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [args.first_seed] if args.quick else list(range(args.first_seed, args.first_seed + args.seeds))
    methods = STREAM_METHODS[args.stream]
    if args.methods:
        unknown = sorted(set(args.methods) - set(methods))
        if unknown:
            parser.error(f"--methods {unknown}: not methods of --stream {args.stream}; choose from {list(methods)}")
        methods = tuple(m for m in methods if m in args.methods or m == "er_lora")
    metric = "exact match" if args.stream == "instructions" else "accuracy"
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    started = time.perf_counter()
    for seed in seeds:
        if args.stream == "instructions":
            base = run_isolated_base(seed, 5 if args.quick else args.pretrain_steps)
        elif args.stream == "rotated":
            base = run_isolated_base(seed, 0 if args.quick else args.pretrain_epochs, vit=True)
        else:
            base = None
        for method in methods:  # interleaved: machine load affects every method alike
            results[method].append(run_isolated(args.stream, method, seed, base, args.quick, args.gradient_clip_val))
            row = results[method][-1]
            loss = "" if row["loss"] is None else f", answer loss {row['loss']:.3f}"
            print(f"seed {seed} {method}: {metric} {row['summary'].get('average_accuracy')}, "
                  f"forgetting {row['summary'].get('forgetting')}{loss}, "
                  f"step {row['step_seconds'] * 1000:.0f} ms, peak {row['peak_mb']:.0f} MB", flush=True)
    er_step = statistics.mean(r["step_seconds"] for r in results["er_lora"])
    er_peak = statistics.mean(r["peak_mb"] for r in results["er_lora"])
    print()
    print(f"| method | avg final {metric} | forgetting | avg final answer loss | step time vs ER-LoRA | peak memory vs ER-LoRA |")
    print("|---|---|---|---|---|---|")
    for method in methods:
        rows = results[method]
        acc = _mean_std([r["summary"].get("average_accuracy") for r in rows])
        forgetting = _mean_std([r["summary"].get("forgetting") for r in rows])
        loss = _mean_std([r["loss"] for r in rows])
        step = statistics.mean(r["step_seconds"] for r in rows) / er_step
        peak = statistics.mean(r["peak_mb"] for r in rows) / er_peak
        print(f"| {method} | {acc} | {forgetting} | {loss} | {step:.2f}× | {peak:.2f}× |")
    if args.stream == "rotated":
        print(f"\nAccuracy matrix R[i, j] (after task i, on domain j), mean over seeds:")
        for method in methods:
            matrices = torch.tensor([r["matrix"] for r in results[method]])
            for seed, matrix in zip(seeds, matrices.tolist()):
                print(f"seed {seed} {method}: " + " / ".join("[" + ", ".join(f"{v:.3f}" for v in row) + "]" for row in matrix))
            mean = matrices.mean(0)
            print(f"{method}: " + " / ".join("[" + ", ".join(f"{v:.3f}" for v in row) + "]" for row in mean.tolist()))
    if args.gradient_clip_val is not None:
        print(f"gradient_clip_val={args.gradient_clip_val} for every method")
    print(f"\n{len(seeds)} seed(s); wall time {time.perf_counter() - started:.0f} s")
    return results


def _base_child(queue: Any, seed: int, steps: int, vit: bool) -> None:
    torch.set_num_threads(1)
    buffer = io.BytesIO()  # bytes: a tensor sent through the queue would need the child alive
    torch.save(pretrained_vit(seed, steps) if vit else pretrained_base(seed, steps), buffer)
    queue.put(buffer.getvalue())


def run_isolated_base(seed: int, steps: int, vit: bool = False) -> dict[str, torch.Tensor]:
    context = mp.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=_base_child, args=(queue, seed, steps, vit))
    process.start()
    result = queue.get()
    process.join()
    return torch.load(io.BytesIO(result), weights_only=True)


if __name__ == "__main__":
    main()
