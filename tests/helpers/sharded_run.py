"""One 2-process launch that runs a user's sharded module (FSDP2 through ``ModelParallelStrategy``)
with callbacks, the same under DDP, and (on every rank) one process at the same global batch.

Run as ``python -m tests.helpers.sharded_run OUT_DIR "A,B;C"`` (groups separated by ``;``, each a
comma-separated list of the callbacks ``_callbacks`` builds, run together); ``OUT_DIR/<i>/result.json``
holds for group ``i``, per strategy, the full parameters and
each callback's state after two fits (one per task), (for ``single``, and a second sharded run
``sharded_alone``, without the replay callbacks: their draws are per rank, as under DDP), and for
the sharded strategy:

- ``resumed``: a crash in the middle of task 1 and a resume from the sharded checkpoint written
  before it (Lightning's distributed checkpoint: a folder of ``.distcp`` shards and ``meta.pt``);
- ``roundtrip``: each callback's state after ``load_state_dict(state_dict())`` of the saved state;
- ``export``: the final sharded checkpoint consolidated into a plain state dict loaded into a
  fresh unsharded module (:func:`lightning_forget.export.load_sharded_checkpoint`).

Plain DDP started inside pytest would re-run pytest in the child, hence the script.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from lightning_forget.callbacks.gs_lora import GSLoRA
from lightning_forget.sharding import full_tensor

NUM_TASKS = 2
REPLAY = ("ExperienceReplay", "DarkExperienceReplay", "ILoRA")  # per-rank replay draws (ILoRA's buffer too)
#: Not compared with one process: the replay draws, k-FPF's (FPF's) buffer holds the ranks' gathered rows
#: (another order than one process's batch), AdaB²N's module has BatchNorm (per-rank batch statistics, as under DDP).
PER_RANK = (*REPLAY, "KFPF", "FPF", "AdaB2N")
FIRST_GROUP = ["ExperienceReplay", "LRRewarming", "ContinualMetrics", "ContinualEvaluation"]
BATCH = 4  # per process; one process gets 2 * BATCH


class ShardedUserModule(pl.LightningModule):
    """What a user writes for FSDP2: the network in ``__init__``, ``fully_shard`` per layer in
    ``configure_model`` (only when the strategy gives a device mesh), SGD."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 6))
        self.lr = lr

    def configure_model(self) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if self.device_mesh is None or isinstance(self.net, FSDPModule):
            return  # not sharded, or already sharded by an earlier fit (one fit per task)

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class ShardedNormModule(ShardedUserModule):
    """The user's module with a ``BatchNorm2d`` (for AdaB²N, which converts it in ``setup``, before
    ``configure_model`` shards): rows of 8 features viewed as 2 channels of 2×2."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__(lr)
        self.net = nn.Sequential(nn.Unflatten(1, (2, 2, 2)), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 16),
                                 nn.ReLU(), nn.Linear(16, 6))

    def configure_model(self) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if self.device_mesh is not None and not isinstance(self.net, FSDPModule):
            # the (converted) norm layer as its own unit: the root's parameters stay gathered after
            # an evaluation forward until the next backward
            fully_shard(self.net[1], mesh=self.device_mesh["data_parallel"])
        super().configure_model()


class ShardedRootModule(ShardedUserModule):
    """The user's module with its first linear left in the root unit (only the last is a unit of its own): the
    root's parameters stay gathered after an evaluation forward until resharded (LiNeS' "lines" group)."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if self.device_mesh is None or isinstance(self.net, FSDPModule):
            return
        fully_shard(self.net[2], mesh=self.device_mesh["data_parallel"])
        fully_shard(self.net, mesh=self.device_mesh["data_parallel"])


def _module(names: list[str]) -> pl.LightningModule:
    """The module a group runs: a tiny GPT-2 for ILoRA, a diffusion module for erasure, with a BatchNorm for AdaB²N."""
    if "ILoRA" in names:
        return ShardedLMModule()
    if "GSLoRAConv1D" in names:
        return ShardedGPT2Classifier()
    if _is_erasure(names):
        return _erasure_b_module() if names == ERASURE_B_GROUP else ShardedDiffusion()
    if "LiNeSSweep" in names:
        return ShardedRootModule()
    return ShardedNormModule() if "AdaB2N" in names else ShardedUserModule()


def _gradient_callbacks() -> dict[str, Callable[[], Callback]]:
    """Refresh learning, k-FPF and AdaB²N (gradients outside the step, buffers), sized to matter:
    a large unlearn step with a strong Fisher damping; k-FPF's sensitivity ranking and fine-tunings
    every 2 steps (one crossing the mid-task resume) and at each fit's end."""
    from lightning_forget import callbacks as cbs

    return {
        "RefreshLearning": lambda: cbs.RefreshLearning(delta=0.05, damping=50.0, noise_std=0.5, fisher_samples=6,
                                                       fisher_batch_size=4, seed=1),
        "KFPF": lambda: cbs.KFPF(k=None, interval=2, finetune_steps=2, finetune_batch_size=4, buffer_size=16,
                                 auto_top=1, seed=3, lr=0.05),
        "FPF": lambda: cbs.FPF(finetune_steps=2, finetune_batch_size=4, buffer_size=16, seed=4, lr=0.05),
        "AdaB2N": lambda: cbs.AdaB2N(num_tasks=NUM_TASKS, lambd=0.5),
    }


def _callbacks(names: list[str]) -> list[Callback]:
    from lightning_forget import callbacks as cbs

    make: dict[str, Callable[[], Callback]] = {
        "ExperienceReplay": lambda: cbs.ExperienceReplay(buffer_size=16, seed=3),
        "DarkExperienceReplay": lambda: cbs.DarkExperienceReplay(buffer_size=16, seed=3),
        "LRRewarming": lambda: cbs.LRRewarming(max_lr=0.1, warmup=2, steps_per_task=6),
        "InfiniteLRSchedule": lambda: cbs.InfiniteLRSchedule(max_lr=0.1, warmup=2, steps_per_task=6, cooldown_steps=2),
        "ContinualMetrics": lambda: cbs.ContinualMetrics(report=False),
        # Blocks net.0 (scale α) and net.2 (scale 1) by name; fixed α, applied at each fit's end.
        "LiNeS": lambda: cbs.LiNeS(alpha=0.3, save_plot=False),
        # "lines" group: an α sweep scored by the module's task-0 val_acc (collective validation forwards) at each fit's
        # end, and a fixed α at each task's end (relative to the task's start), both in one run.
        "LiNeSSweep": lambda: cbs.LiNeS(alpha_grid=[1.0, 0.4, 0.0], monitor="val_acc/dataloader_idx_0", save_plot=False),
        "LiNeSTaskEnd": lambda: cbs.LiNeS(alpha=0.5, apply_at="task_end", save_plot=False),
        # LoRA group (tests/test_sharded_contract.py "lora"): ILoRA on a tiny GPT-2 (LoRA on its attention),
        # GSLoRA on the user's two linears; no dropout (its draws differ by strategy).
        "ILoRA": lambda: cbs.ILoRA(lora={"r": 2, "alpha": 4.0, "dropout": 0.0, "kind": "attention"}, ema=0.5,
                                   buffer_size=16, seed=3),
        "GSLoRA": lambda: cbs.GSLoRA(r=2, lora_alpha=2.0, target_modules=["net.0", "net.2"], alpha=0.05,
                                     prototype=True, prototype_retain_weight=0.1, seed=3),
        "ContinualEvaluation": lambda: cbs.ContinualEvaluation(
            # 5 rows over 2 ranks in batches of 2: rank 0 runs 2 forwards, rank 1's 2 rows 1, so under
            # sharding rank 1 must run one more (a sharded forward is collective) or the run hangs.
            every_n_steps=3, samples_per_task=5, batch_size=2, save_csv=False, save_plot=False),
    }
    make.update(_gradient_callbacks())
    make.update(_conv1d_lora_callbacks())
    make.update(_unlearning_callbacks())
    make.update(_erasure_callbacks())
    make.update(_erasure_b_callbacks())
    return [make[name]() for name in names]


# ---------------------------------------------------------------- unlearning group (shunl)
UNLEARNING_GROUP = ["SCRUB", "ForgetRetainEvaluation", "UnlearningEvaluation"]


def _unlearning_callbacks() -> dict[str, Callable[[], Callback]]:
    from lightning_forget import callbacks as cbs

    class SCRUB(cbs.SCRUB):
        """SCRUB that keeps the per-tensor cosines of each step's gradient surgery."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.cosines: list[list[float]] = []

        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
            if self._surgery is not None and self._surgery.last is not None:
                self.cosines.append([float(c) for _, c in sorted(self._surgery.last.cosines.items())])
                self._surgery.last = None

    SCRUB.__qualname__ = "SCRUB"  # its state key, as the library's SCRUB's
    return {
        # The reference (teacher) model, the saliency mask (SalUn's, here on SCRUB's objective) and
        # gradient surgery in one method: the mechanisms every unlearning method shares.
        "SCRUB": lambda: SCRUB(mask_fraction=0.5, alpha=0.5, gradient_surgery="project", save_original=False),
        # Sets of 5 (validation) and 17 (forget) rows over 2 ranks in batches of 2: rank 0 runs one
        # batch more, so under sharding rank 1 must run a padding forward or the run hangs.
        "ForgetRetainEvaluation": lambda: cbs.ForgetRetainEvaluation(batch_size=2, report=False),
        "UnlearningEvaluation": lambda: cbs.UnlearningEvaluation(batch_size=2, mia="threshold", report=False),
    }


def _unlearning_data(names: list[str], task: int, devices: int) -> Any:
    """A two-stream forget/retain datamodule (forget class 4, then 5) of 8-d blobs (12 forget and 60, then 48, retained rows) for the unlearning
    group, each rank reading every second row in order as ``_tasks`` does; ``None`` for other groups."""
    if not set(names) & set(UNLEARNING_GROUP):
        return None
    from torch.utils.data import DistributedSampler

    from lightning_forget.datamodules import ForgetRetainDataModule
    from lightning_forget.datamodules.forget import PairedDataset
    from lightning_forget.datamodules.loaders import ResumableDataLoader

    class Paired(ForgetRetainDataModule):
        def train_dataloader(self) -> DataLoader:
            data = PairedDataset(self.forget_train_dataset(task), self.retain_train_dataset(task), self.seed, 0)
            world, rank = self.trainer.world_size, self.trainer.global_rank
            sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False) if world > 1 else None
            return ResumableDataLoader(data, batch_size=BATCH * (2 if world == 1 else 1), sampler=sampler)

    gen = torch.Generator().manual_seed(1234)
    centres = 3.0 * torch.randn(6, 8, generator=gen)
    x = torch.cat([centres[c] + torch.randn(24, 8, generator=gen) for c in range(6)])
    y = torch.arange(6).repeat_interleave(24)
    return Paired(train=(x, y), forget_classes=[[4], [5]], data_ratio=0.7, batch_size=8, task=task)


class ShardedCausalLM(pl.LightningModule):
    """A user's tiny GPT-2 (Hugging Face) sharded per transformer block in ``configure_model``."""

    def __init__(self) -> None:
        super().__init__()
        from lightning_forget.modules.causal_lm import build_tiny_causal_lm

        self.model = build_tiny_causal_lm("gpt2", vocab_size=257, block_size=128, n_layer=2, n_embd=16, n_head=2)

    def configure_model(self) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if self.device_mesh is None or isinstance(self.model, FSDPModule):
            return
        mesh = self.device_mesh["data_parallel"]
        for block in self.model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"],
                          use_cache=False).loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _GradNormRecorder(**kwargs: Any) -> Callback:  # noqa: N802 - a factory named as the class it builds
    """LMUnlearningEvaluation keeping each evaluation's per-sample GradNorm scores (forget, holdout)."""
    from lightning_forget.callbacks import LMUnlearningEvaluation

    class _Recorder(LMUnlearningEvaluation):
        def __init__(self) -> None:
            super().__init__(**kwargs)
            self.gradnorms: list[dict[str, list[float]]] = []

        def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
            result = super().evaluate(trainer, pl_module)
            self.gradnorms.append({split: result["per_sample"][split]["gradnorm"] for split in ("forget", "holdout")})
            return result

    return _Recorder()


def unlearning_lm_run(root: Path, strategy_name: str) -> dict[str, Any]:
    """NPO (its reference through the LM path) on the tiny GPT-2 over fictitious-QA forget/retain
    batches, one fit, with LMUnlearningEvaluation before and after (greedy generation: the ranks'
    prompts stop at different lengths); the reference's numbers on this rank beside the model's."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_forget.callbacks import NPO
    from lightning_forget.datamodules import FictitiousQADataModule

    pl.seed_everything(0)
    module = ShardedCausalLM()
    dm = FictitiousQADataModule(num_people=4, questions_per_person=3, num_countries=1, forget_percent=25, phase="unlearn",
                                batch_size=2)
    npo = NPO(save_original=False)
    evaluation = _GradNormRecorder(max_new_tokens=6, batch_size=3, progress=False, report=False)  # GradNorm on
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if strategy_name == "sharded" else "ddp"
    trainer = _trainer(root, strategy, 2, [evaluation, npo], enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    from lightning_forget.sharding import reshard

    reshard(module)  # the root unit keeps its gathered weights after the evaluation's forwards
    assert npo.reference is not None and npo.reference.weights is not None
    return {"params": _params(module), "param_types": sorted({type(p).__name__ for p in module.parameters()}),
            "steps": int(trainer.global_step), "state": _plain(npo.state_dict()),
            "evaluation": _plain(evaluation.state_dict()), "gradnorms": evaluation.gradnorms,
            "reference_numel": [sum(w.numel() for w in npo.reference.weights.values()),
                                sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())]}


def _unlearning_layout(callbacks: list[Callback], module: nn.Module) -> dict[str, Any]:
    """Numbers the reference and the mask hold on this rank, beside the module's total; the cosines
    of the last gradient surgery."""
    out: dict[str, Any] = {}
    total = sum(p.numel() for p in module.parameters())
    for cb in callbacks:
        if type(cb).__name__ == "SCRUB":
            weights = cb.reference.weights if cb.reference is not None else {}
            params = dict(module.named_parameters())
            out["reference"] = [sum(weights[n].numel() for n in params), total]
            out["mask"] = [sum(m.numel() for m in cb.mask.masks.values()), total]
            out["surgery_cosines"] = cb.cosines  # each step's per-tensor cosines (over the whole tensors)
    return out


def _tasks(batch: int, world: int, rank: int, dm: Any = None) -> list[tuple[DataLoader, list[DataLoader]]]:
    """Per task: the train loader of this rank and the validation loaders. Under 2 processes each
    rank reads every second row in order (``DistributedSampler(shuffle=False)``; Lightning's own
    sampler would shuffle), so the two ranks' batches together are one process's batch of twice
    the size."""
    from torch.utils.data import DistributedSampler

    from lightning_forget.datamodules.loaders import ResumableDataLoader
    from tests.helpers.data import BlobStream

    dm = dm if dm is not None else BlobStream(num_tasks=NUM_TASKS)
    vals = [DataLoader(dm.val_dataset(t), batch_size=8) for t in range(NUM_TASKS)]
    out = []
    for t in range(NUM_TASKS):
        data = dm.train_dataset(t)
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False) if world > 1 else None
        # The library's loader: a mid-epoch resume continues at the exact batch.
        out.append((ResumableDataLoader(data, batch_size=batch, sampler=sampler), vals))
    return out


def _plain(value: Any) -> Any:
    """Callback state as JSON: tensors as flat float lists."""
    if isinstance(value, torch.Tensor):
        return full_tensor(value).detach().double().flatten().tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return repr(value)


def _params(module: nn.Module) -> dict[str, list[float]]:
    return {name: full_tensor(p).detach().double().flatten().tolist() for name, p in module.named_parameters()}


def _trainer(root: Path, strategy: Any, devices: int, callbacks: list[Callback], **kwargs: Any) -> pl.Trainer:
    kwargs.setdefault("max_epochs", 1)
    return pl.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, default_root_dir=str(root), callbacks=callbacks,
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, deterministic=True, **kwargs,
    )


class _Crash(RuntimeError):
    pass


class _CrashAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise _Crash(f"simulated crash at step {self.step}")


def run(root: Path, strategy_name: str, names: list[str], *, crash_at: int | None = None,
        resume: str | None = None, save_every: int | None = None, momentum: float | None = None) -> dict[str, Any]:
    from lightning.pytorch.strategies import ModelParallelStrategy

    pl.seed_everything(0)
    module = _module(names)
    if momentum is not None:
        module.momentum = momentum
    callbacks = _callbacks(names)
    devices = 1 if strategy_name == "single" else 2
    out: dict[str, Any] = {}
    for task in range(NUM_TASKS):
        if resume is not None and task == 0:
            continue  # the checkpoint is inside task 1: task 0's fit happened before it
        strategy = {
            "sharded": lambda: ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
            # full-state-dict checkpoints: one file, rank 0 writing whole tensors (ILoRA's extra runs)
            "sharded_full": lambda: ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                                          save_distributed_checkpoint=False),
            "ddp": lambda: "ddp",
            "single": lambda: "auto",
        }[strategy_name]()
        extra: list[Callback] = []
        kwargs: dict[str, Any] = {"enable_checkpointing": False}
        if save_every is not None and task == 1:
            extra.append(ModelCheckpoint(dirpath=root / "ckpt", filename="{step}", save_top_k=-1, every_n_train_steps=save_every))
            kwargs = {}
        if crash_at is not None and task == 1:
            extra.append(_CrashAt(crash_at))
        trainer = _trainer(root / f"{strategy_name}{task}", strategy, devices, [*callbacks, *extra],
                           use_distributed_sampler=False, **kwargs)
        dm = _unlearning_data(names, task, devices)
        train, vals = _tasks_for(names)(BATCH * (2 if devices == 1 else 1), devices, trainer.global_rank)[task] if dm is None else (None, None)
        try:
            trainer.fit(module, train, vals, datamodule=dm, ckpt_path=resume if task == 1 else None)
        except _Crash:
            return {"crashed": True}
    from lightning_forget.sharding import reshard

    reshard(module)  # a root unit with parameters keeps them gathered after the last validation's forwards
    out["params"] = _params(module)
    # keyed by the names given (a class can run twice in a group, e.g. LiNeSSweep and LiNeSTaskEnd)
    out["states"] = {name: _plain(cb.state_dict()) for name, cb in zip(names, callbacks)}
    out["classes"] = {name: type(cb).__name__ for name, cb in zip(names, callbacks)}
    out["param_types"] = sorted({type(p).__name__ for p in module.parameters()})
    for cb in callbacks:
        if type(cb).__name__ == "LiNeS":
            # θ_0 as this rank's shards (numel), and the files of the last fit (rank 0 writes them).
            out["lines_theta0_numel"] = [sum(t.numel() for t in cb.theta0.values()), sum(p.numel() for p in module.parameters())]
            if cb.output_paths:
                out["lines_files"] = {kind: {n: v.double().flatten().tolist() for n, v in torch.load(cb.output_paths[kind], weights_only=True).items()}
                                      for kind in ("scaled", "unscaled")}
    out["lines_sweeps"] = {name: sorted(cb.sweep_scores.items()) for name, cb in zip(names, callbacks)
                           if type(cb).__name__ == "LiNeS" and cb.alpha_grid is not None}
    for cb in callbacks:
        if type(cb).__name__ == "RefreshLearning":  # the Fisher as this rank's shards (numel)
            out["refresh_fisher_numel"] = [sum(t.numel() for t in cb.fisher.values()),
                                           sum(p.numel() for p in module.parameters() if p.requires_grad)]
    out["unlearning_numel"] = _unlearning_layout(callbacks, module)
    out.update(_lora_extras(root, module, callbacks))
    out.update(_conv1d_layout(module, callbacks))
    _erasure_report(out, callbacks, module)
    _erasure_b_report(out, callbacks, module)
    out["global_step"] = int(trainer.global_step)
    out["strategy"] = [type(trainer.strategy).__name__, int(trainer.world_size)]
    if strategy_name == "sharded":
        roundtrip = _callbacks(names)
        for fresh, cb in zip(roundtrip, callbacks):
            fresh.load_state_dict(cb.state_dict())
        out["roundtrip"] = {name: _plain(cb.state_dict()) for name, cb in zip(names, roundtrip)}
    return out


def classifier_run(root: Path, strategy_name: str) -> dict[str, Any]:
    """The library's ``ContinualClassifier`` (its ``configure_model`` shards backbone and head) over
    a two-task stream in one fit, with ER."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_forget.callbacks import ExperienceReplay
    from lightning_forget.sharding import is_sharded
    from tests.helpers.data import BlobStream
    from tests.helpers.harness import tiny_classifier

    pl.seed_everything(0)
    dm = BlobStream(num_tasks=NUM_TASKS)
    model = tiny_classifier(dm)
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if strategy_name == "sharded" else "ddp"
    trainer = _trainer(root, strategy, 2, [ExperienceReplay(buffer_size=16, seed=3)], max_epochs=dm.max_epochs,
                       reload_dataloaders_every_n_epochs=1, enable_checkpointing=False)
    trainer.fit(model, dm)
    return {"params": _params(model), "sharded": is_sharded(model)}


# ---------------------------------------------------------------- the LoRA group (ILoRA, GSLoRA)
class ShardedLMModule(pl.LightningModule):
    """A user's causal LM for FSDP2: a tiny GPT-2 at ``self.model`` (ILoRA wraps it with PEFT LoRA in
    ``setup``, before ``configure_model``), each block and then the whole model ``fully_shard``-ed."""

    def __init__(self, lr: float = 0.5) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        self.model = GPT2LMHeadModel(config)
        self.lr = lr

    def configure_model(self) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if self.device_mesh is None or isinstance(self.model, FSDPModule):
            return
        mesh = self.device_mesh["data_parallel"]
        for module in self.model.modules():
            if type(module).__name__ == "GPT2Block":
                fully_shard(module, mesh=mesh)
        # The root holds the embeddings and the head: freed after each forward as the blocks are.
        fully_shard(self.model, mesh=mesh, reshard_after_forward=True)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.log("val_loss", self.model(**batch).loss, sync_dist=True)

    def configure_optimizers(self) -> Any:
        # momentum: ILoRA's full-state-dict runs (Lightning cannot resume a full checkpoint of a stateless optimizer)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=getattr(self, "momentum", 0.0))


class _Tokens(torch.utils.data.Dataset):
    """Token rows of one task: ``input_ids``, ``attention_mask`` (the last ``task + row % 2`` positions
    padded), ``labels`` (-100 at the padding)."""

    def __init__(self, task: int, rows: int) -> None:
        g = torch.Generator().manual_seed(100 + task)
        self.ids = torch.randint(1, 16, (rows, 6), generator=g)
        self.mask = torch.ones(rows, 6, dtype=torch.long)
        for i in range(rows):
            self.mask[i, 6 - (task + i % 2):] = 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, mask = self.ids[i] * self.mask[i], self.mask[i]
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


class _TwoStreams(torch.utils.data.Dataset):
    """GS-LoRA's two-stream items: ``{"forget": (x, y), "retain": (x, y)}`` (forget: class ``task`` of
    the blobs, cycled; retain: classes 2 and 3), with ``.forget``/``.retain`` for the prototypes."""

    def __init__(self, task: int) -> None:
        from torch.utils.data import TensorDataset

        from tests.helpers.data import BlobStream

        x, y = BlobStream(num_tasks=NUM_TASKS)._data["train"]
        self.forget = TensorDataset(x[y == task], y[y == task])
        self.retain = TensorDataset(x[y >= 2], y[y >= 2])

    def __len__(self) -> int:
        return len(self.retain)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"forget": self.forget[i % len(self.forget)], "retain": self.retain[i]}


# ------------------------------------------------ GS-LoRA on GPT-2's Conv1D (group "lora_gslora_conv1d")
class _GPT2Net(nn.Module):
    """A tiny GPT-2 (transformers' ``GPT2Model``: its attention and MLP are ``Conv1D``, weight (in, out))
    over each 8-feature row read as 2 tokens of 4 features (``inputs_embeds``), a linear head on the
    last token."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        config = GPT2Config(vocab_size=4, n_positions=2, n_embd=4, n_layer=2, n_head=2, n_inner=6,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        self.gpt2 = GPT2Model(config)
        self.head = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.gpt2(inputs_embeds=x.view(len(x), 2, 4), use_cache=False).last_hidden_state
        return self.head(hidden[:, -1])


class ShardedGPT2Classifier(ShardedUserModule):
    """The user's classifier with a GPT-2 body (``self.net``), each GPT-2 block and then the net
    ``fully_shard``-ed (FSDP2 shards dim 0 of each stored weight: the *input* dim of a Conv1D)."""

    def __init__(self, lr: float = 0.5) -> None:
        super().__init__(lr)
        self.net = _GPT2Net()

    def configure_model(self) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if self.device_mesh is None or isinstance(self.net, FSDPModule):
            return
        mesh = self.device_mesh["data_parallel"]
        for block in self.net.gpt2.h:
            fully_shard(block, mesh=mesh)
        # The root holds the embeddings, the final norm and the head (all frozen under GS-LoRA): freed
        # after each forward, as docs/sharding.md advises for roots.
        fully_shard(self.net, mesh=mesh, reshard_after_forward=True)


def _conv1d_lora_callbacks() -> dict[str, Callable[[], Callback]]:
    """GS-LoRA++ on the GPT-2's ``c_attn`` and ``c_fc`` (``Conv1D``: PEFT's ``fan_in_fan_out``), one group
    per block, a group-sparse weight and prototypes large enough to matter."""

    class GSLoRAConv1D(GSLoRA):
        pass

    GSLoRAConv1D.__qualname__ = "GSLoRAConv1D"  # its state key

    return {"GSLoRAConv1D": lambda: GSLoRAConv1D(r=2, lora_alpha=4.0, target_modules=["c_attn", "c_fc"], alpha=0.05,
                                                 prototype=True, prototype_retain_weight=0.1, seed=5)}


def merge_folders_run(root: Path, names: list[str]) -> dict[str, Any]:
    """``lightning-forget merge`` (:func:`~lightning_forget.merge_cli.merge_checkpoints`) on two sharded
    checkpoint folders of the GPT-2 run (TIES, θ_0 the one of step 3): against TIES of the two plain modules the
    folders load into, and whether the written checkpoint loads strictly into the module."""
    from lightning_forget.export import load_sharded_checkpoint
    from lightning_forget.merge_cli import merge_checkpoints
    from lightning_forget.merging import merge

    folders = [root / "a" / "ckpt" / f"step={step}.ckpt" for step in (3, 6)]
    written = root / "merged.ckpt"
    got = merge_checkpoints(str(folders[0]), [str(folders[1])], str(written), method="ties", k=0.5)
    modules = [_plain_module(names) for _ in folders]
    for module, folder in zip(modules, folders):
        load_sharded_checkpoint(folder, module)
    expected = merge(modules[0], modules[1:], method="ties", k=0.5)
    checkpoint = torch.load(written, weights_only=False)
    _plain_module(names).load_state_dict(checkpoint["state_dict"])  # strict
    moved = max(float((expected[n] - modules[0].state_dict()[n]).abs().max()) for n in expected)
    return {"difference": max(float((got[n] - expected[n]).abs().max()) for n in expected), "moved": moved,
            "keys": sorted(checkpoint), "same_names": sorted(got) == sorted(expected)}


def _conv1d_layout(module: nn.Module, callbacks: list[Callback]) -> dict[str, Any]:
    """For GSLoRAConv1D: each LoRA layer's base class and ``fan_in_fan_out``, each task's kept ΔW norm."""
    from lightning_forget.callbacks.gs_lora import lora_layers

    for cb in callbacks:
        if type(cb).__name__ == "GSLoRAConv1D":
            return {"conv1d_layers": {n: [type(m.get_base_layer()).__name__, bool(m.fan_in_fan_out)]
                                      for n, m in lora_layers(module).items()},
                    "conv1d_delta_norms": [float(sum(float(full_tensor(v).norm()) for v in d.values()))
                                           for d in cb.method_state()["deltas"]]}
    return {}


def _lora_tasks(lm: bool, batch: int, world: int, rank: int) -> list[tuple[DataLoader, Any]]:
    """As :func:`_tasks` (each rank every second row in order) for the LoRA group's data: token rows
    (``lm``, with validation loaders: ILoRA evaluates its slow learner) or two-stream items."""
    from torch.utils.data import DistributedSampler

    from lightning_forget.datamodules.loaders import ResumableDataLoader

    out = []
    for t in range(NUM_TASKS):
        data = _Tokens(t, 48) if lm else _TwoStreams(t)
        vals = [DataLoader(_Tokens(v, 8), batch_size=8) for v in range(NUM_TASKS)] if lm else None
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False) if world > 1 else None
        out.append((ResumableDataLoader(data, batch_size=batch, sampler=sampler), vals))
    return out


def _plain_module(names: list[str]) -> pl.LightningModule:
    """A fresh unsharded module of the group's kind with the layers its callbacks add (AdaB²N's,
    LoRA's), to load its checkpoint."""
    module = _module(names)
    if "AdaB2N" in names:
        from lightning_forget.nn.adab2n import convert_adab2n

        convert_adab2n(module, NUM_TASKS, 0.7)
    for cb in _callbacks(names):
        if type(cb).__name__ == "ILoRA":
            cb._wrap(module)
        elif isinstance(cb, GSLoRA):  # GSLoRAConv1D too
            cb._inject(module)
        elif type(cb).__name__ == "ESD" and cb.lora_rank is not None:
            cb.select_parameters(module)  # its LoRA layers
    return module


@torch.no_grad()
def _same_outputs(module: pl.LightningModule, plain: pl.LightningModule) -> float:
    """The largest difference between the outputs of ``module`` and ``plain`` on fixed inputs."""
    module.eval(), plain.eval()
    if isinstance(module, ShardedLMModule):
        ids = torch.randint(1, 16, (3, 6), generator=torch.Generator().manual_seed(7))
        outs = [m.model(input_ids=ids).logits for m in (module, plain)]
    elif hasattr(module, "net"):
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(7))
        outs = [m.net(x) for m in (module, plain)]
    elif set(dict(module.named_parameters())) != set(dict(plain.named_parameters())):  # ESD's LoRA merged away
        config, gen = module.unet.config, torch.Generator().manual_seed(7)
        x = torch.randn(2, config.in_channels, config.sample_size, config.sample_size, generator=gen)
        context = torch.randn(2, 1, config.cross_attention_dim, generator=gen)
        outs = [m.unet(x, torch.tensor([3, 17]), encoder_hidden_states=context).sample for m in (module, plain)]
    else:  # no method layer merged away (the diffusion module): the same parameters
        a, b = dict(module.named_parameters()), dict(plain.named_parameters())
        return max(float((a[n] - b[n]).abs().max()) for n in a)
    return float((outs[0] - outs[1]).abs().max())


def _lora_extras(root: Path, module: nn.Module, callbacks: list[Callback]) -> dict[str, Any]:
    """The LoRA callbacks' per-parameter state as this rank holds it (numel: local, full) and
    ILoRA's last task's adapter files (rank 0 writes them: full tensors)."""
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for cb in callbacks:
        if type(cb).__name__ == "ILoRA":
            out["ilora_slow_numel"] = [sum(t.numel() for t in cb._slow.values()),
                                       sum(p.numel() for p in cb.fast_parameters().values())]
            files = {kind: sorted(root.rglob(f"task_{NUM_TASKS - 1}_{kind}*.safetensors")) for kind in ("fast", "slow")}
            if all(files.values()):
                out["ilora_files"] = {kind: {n: v.double().flatten().tolist() for n, v in load_file(str(paths[-1])).items()}
                                      for kind, paths in files.items()}
        elif isinstance(cb, GSLoRA):  # GSLoRAConv1D too
            from lightning_forget.callbacks.gs_lora import lora_layers

            layers = lora_layers(module)
            out["gslora_delta_numel"] = [sum(v.numel() for d in cb.deltas for v in d.values()),
                                         sum(layers[n].get_base_layer().weight.numel() for d in cb.deltas for n in d)]
    return out


def ilora_full_state_run(root: Path, names: list[str]) -> dict[str, Any]:
    """ILoRA with full-state-dict checkpoints (``ModelParallelStrategy(save_distributed_checkpoint=False)``:
    one file; rank 0's state dict holds whole tensors, the other ranks' nothing, so the slow learner
    written into its weights is gathered on every rank): a crash in task 1 after the file of step 4,
    a resume from that file, and the uninterrupted DDP run with its file of the same step; on rank 0
    both files' weights and ILoRA state, and the export of the sharded run's file to a plain module
    (its function against the PEFT module's). SGD with momentum: Lightning (2.6) fails to resume a
    full checkpoint whose optimizer has no state (``_rekey_optimizer_state_if_needed``)."""
    crashed = run(root / "f", "sharded_full", names, crash_at=5, save_every=4, momentum=0.5)
    ckpt = root / "f" / "ckpt" / "step=4.ckpt"
    out: dict[str, Any] = {"crashed_first": crashed.get("crashed", False), "is_file": ckpt.is_file()}
    out["resumed"] = run(root / "f", "sharded_full", names, resume=str(ckpt), momentum=0.5)
    out["ddp"] = run(root / "g", "ddp", names, save_every=4, momentum=0.5)
    if torch.distributed.get_rank() == 0:
        from lightning_forget.export import export_plain_checkpoint

        files = {"sharded": ckpt, "ddp": root / "g" / "ckpt" / "step=4.ckpt"}
        loaded = {kind: torch.load(path, weights_only=False) for kind, path in files.items()}
        out["files"] = {kind: {"state_dict": _plain(c["state_dict"]),
                               "ilora": _plain(next(v for k, v in c["callbacks"].items() if k.startswith("ILoRA")))}
                        for kind, c in loaded.items()}
        peft = _plain_module(names)
        peft.load_state_dict(loaded["sharded"]["state_dict"])
        written = export_plain_checkpoint(_plain_module(names), root / "plain_full.ckpt", checkpoint_path=ckpt)
        plain = _module(names)
        plain.load_state_dict(torch.load(written, weights_only=True)["state_dict"])
        out["export_outputs"] = _same_outputs(peft, plain)
    return out


def config_run(root: Path, config: str) -> dict[str, Any]:
    """A shipped sharded config through the CLI on this launch's 2 processes, with the overrides of
    tests/test_configs.py (two tasks of two batches)."""
    from lightning_forget.cli import main as cli_main
    from lightning_forget.sharding import is_sharded

    cli = cli_main(["fit", "--config", str(Path(__file__).resolve().parents[2] / config),
                    "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
                    "--data.init_args.epochs_per_task", "1", "--trainer.max_epochs", "2",
                    "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
                    "--trainer.enable_checkpointing", "false"])
    params = list(cli.model.parameters())
    return {"global_step": int(cli.trainer.global_step), "world_size": int(cli.trainer.world_size),
            "sharded": is_sharded(cli.model), "finite": all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in params),
            "ended": [int(cb._ended) for cb in cli.trainer.callbacks if hasattr(cb, "_ended")]}


def _tasks_for(names: list[str]) -> Callable[[int, int, int], list[tuple[DataLoader, Any]]]:
    if "ILoRA" in names or "GSLoRA" in names or "GSLoRAConv1D" in names:
        return functools.partial(_lora_tasks, "ILoRA" in names)
    return functools.partial(_tasks, dm=_data_for(names))


def main(root: Path, names: list[str]) -> None:
    results: dict[str, Any] = {}
    results["sharded"] = run(root / "a", "sharded", names, save_every=3)
    # Task 1 is one epoch of 6 steps (48 rows, 2 ranks × 4): a crash before its step 5, a resume
    # from the sharded checkpoint of step 4 (mid-epoch).
    crashed = run(root / "b", "sharded", names, crash_at=5, save_every=4)
    ckpt = root / "b" / "ckpt" / "step=4.ckpt"
    results["resumed"] = run(root / "b", "sharded", names, resume=str(ckpt))
    results["resumed"]["crashed_first"] = crashed.get("crashed", False)
    results["ddp"] = run(root / "c", "ddp", names)
    # One process at the same global batch: replay draws per rank (as under DDP), so the replay
    # callbacks are left out of this comparison, and the sharded run is repeated without them.
    alone = [name for name in names if name not in PER_RANK and not _is_erasure([name])]
    rank = torch.distributed.get_rank()
    if alone:
        results["sharded_alone"] = run(root / "e", "sharded", alone) if alone != names else results["sharded"]
        results["single"] = run(root / f"d{rank}", "single", alone)
    if names == UNLEARNING_GROUP:
        results["lm"] = {strategy: unlearning_lm_run(root / f"lm_{strategy}", strategy) for strategy in ("sharded", "ddp")}
    if names == ["ILoRA"]:
        results["config_run"] = config_run(root / "cfg", "configs/i_lora/vit_split_mnist_sharded.yaml")
        results["full_state"] = ilora_full_state_run(root, names)
    if names == ["GSLoRAConv1D"] and rank == 0:
        results["merge_folders"] = merge_folders_run(root, names)
    if names == FIRST_GROUP:
        results["classifier"] = {strategy: classifier_run(root / f"cls_{strategy}", strategy) for strategy in ("sharded", "ddp")}
    if rank == 0:
        from lightning_forget.export import load_sharded_checkpoint

        final = sorted((root / "a" / "ckpt").glob("*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))[-1]
        plain = _plain_module(names)
        checkpoint = load_sharded_checkpoint(final, plain)
        from lightning_forget.export import export_plain_checkpoint

        written = export_plain_checkpoint(_plain_module(names), root / "plain.ckpt", checkpoint_path=final)
        again = _module(names)  # the exported file holds the plain model (AdaB2N layers back to BatchNorm2d, LoRA merged)
        again.load_state_dict(torch.load(written, weights_only=True)["state_dict"])
        results["export"] = {
            "params": _params(plain),
            "plain_checkpoint_params": _params(again),
            # A module whose method layers the export merged (LoRA): the same function, other weights.
            "plain_outputs": _same_outputs(plain, again),
            "callbacks": sorted(checkpoint.get("callbacks", {})),
            "checkpoint": final.name,
            "is_dir": final.is_dir(),
        }
        (root / "result.json").write_text(json.dumps(results))
    torch.distributed.barrier()


# ---------------------------------------------------------------------------- concept erasure (ESD, UCE)
#: ESD, UCE and ErasureEvaluation on a user's diffusion module that shards its UNet blocks; the module's own
#: denoising loss (and ESD's samples) draw per rank, as under DDP, so the runs are compared with DDP, not with one
#: process.
ERASURE_GROUP = ["ESD", "UCE", "ConceptAblation", "ErasureEvaluation"]
#: ESD with PEFT LoRA on the cross-attention's linears (injected before configure_model shards them, merged shard-wise
#: at each task's end, the teacher the module with its adapters disabled): a group of its own, as ESD's parameter set
#: and LoRA's would freeze each other in one run.
ERASURE_LORA_GROUP = ["ESDLoRA"]


def _is_erasure(names: list[str]) -> bool:
    """A group of erasure callbacks (on the diffusion module, its own draws per rank)."""
    return bool(set(names) & {*ERASURE_GROUP, *ERASURE_LORA_GROUP, *ERASURE_B_GROUP, *SFD_GROUP})


def _erasure_callbacks() -> dict[str, Callable[[], Callback]]:
    from lightning_forget.callbacks import ESD, UCE, ConceptAblation, ErasureEvaluation

    return {"ESD": lambda: ESD(erase=[[0], [2]], ddim_steps=2, seed=1),
            "UCE": lambda: UCE(erase=[[1], [3]], when="task_end"),
            "ESDLoRA": lambda: ESD(erase=[[0], [2]], lora_rank=2, ddim_steps=2, seed=1),
            # anchors sampled with the sharded teacher (4 a task, 2 DDIM steps), the same on every rank
            "ConceptAblation": lambda: ConceptAblation(erase=[[1], [3]], num_anchor_samples=4, sample_steps=2, batch_size=2,
                                                       seed=1),
            # 4 classes × 3 samples: 6 a rank (the padding of uneven shares is checked in tests/test_erasure.py)
            "ErasureEvaluation": lambda: ErasureEvaluation(erase=[[0], [2]], samples_per_class=3, judge_epochs=1,
                                                           num_steps=2, grid_per_class=1),
            **_sfd_callbacks()}


def _erasure_report(out: dict[str, Any], callbacks: list[Callback], module: nn.Module) -> None:
    """ESD's teacher: the entries this rank holds against the module's (local shards under FSDP2, a full copy under DDP)."""
    _sfd_report(out, callbacks, module)
    for cb in callbacks:
        if type(cb).__name__ == "ESD" and cb.teacher is not None and cb.teacher.weights is not None:
            out["esd_teacher_numel"] = [sum(v.numel() for v in cb.teacher.weights.values()),
                                        sum(p.numel() for p in module.parameters())]
            out["esd_table_numel"] = int(module.concept_embeddings.numel())


def _data_for(names: list[str]) -> Any:
    if not _is_erasure(names):
        return None
    from tests.helpers.diffusion import DigitImageStream

    return DigitImageStream(num_tasks=NUM_TASKS, samples_per_class=24)  # 48 rows a task: 6 steps of 2 × 4


def ShardedDiffusion() -> pl.LightningModule:  # noqa: N802 - a factory named as the class it builds
    """A user's diffusion module under FSDP2: the library's DiffusionModule with ``configure_model`` sharding each
    UNet block and then the UNet, and the concept table frozen (a pretrained text embedding's role)."""
    from tests.helpers.diffusion import TINY_UNET
    from lightning_forget.modules import DiffusionModule

    class _ShardedDiffusion(DiffusionModule):
        def configure_model(self) -> None:
            from torch.distributed.fsdp import FSDPModule, fully_shard

            if self.device_mesh is None or isinstance(self.unet, FSDPModule):
                return
            mesh = self.device_mesh["data_parallel"]
            for block in [*self.unet.down_blocks, self.unet.mid_block, *self.unet.up_blocks]:
                fully_shard(block, mesh=mesh)
            fully_shard(self.unet, mesh=mesh, reshard_after_forward=True)

    module = _ShardedDiffusion(**{**TINY_UNET, "num_classes": 2 * NUM_TASKS})
    module.concept_embeddings.requires_grad_(False)
    return module


# ---------------------------------------------------------------------------- concept erasure b (DoCo, SalUnDiffusion)
#: DoCo and SalUnDiffusion on the erasure group's diffusion module, compared with DDP as that group is.
ERASURE_B_GROUP = ["DoCo", "SalUnDiffusion"]


def _erasure_b_callbacks() -> dict[str, Callable[[], Callback]]:
    from lightning_forget.callbacks import DoCo, SalUnDiffusion

    return {
        # adversarial from global step 3 (task 0's step 3, and all of task 1, where the resume is); the surgery
        # (cosines over all shards, both gradients clipped by their norm over all shards) adds the preservation
        # gradient, so SalUn's term (inside it) moves the weights too
        "DoCo": lambda: DoCo(erase=[[1], [3]], num_anchor_samples=4, sample_steps=2, batch_size=2, discriminator_warmup=2,
                             discriminator_width=4, discriminator_blocks=1, add_preservation=True, seed=1),
        # the mask (global top half over all shards) over every Linear/Conv (the last setup's parameter set wins):
        # not "full", which would train the module's unsharded concept table
        "SalUnDiffusion": lambda: SalUnDiffusion(erase=[[0], [2]], parameters="all", num_forget_samples=4, sample_steps=2,
                                                 batch_size=2, mask_batch_size=2, seed=2),
    }


def _erasure_b_module() -> pl.LightningModule:
    """The erasure group's module at AdamW lr 1e-4 (not 1e-3): Adam scales each entry's step by its own gradient
    size, so entries whose gradient is rounding noise would move by O(lr) in directions that differ between the
    sharded and the DDP run (reductions in another order)."""
    module = ShardedDiffusion()
    module.lr = 1e-4
    return module


def _erasure_b_report(out: dict[str, Any], callbacks: list[Callback], module: nn.Module) -> None:
    """SalUn's mask: the entries this rank holds against the trained parameters' (local shards under FSDP2); DoCo's
    last surgery's per-tensor cosines and how far its discriminator differs between the ranks."""
    for cb in callbacks:
        if type(cb).__name__ == "SalUnDiffusion" and cb.mask is not None:
            out["salun_mask_numel"] = [sum(m.numel() for m in cb.mask.masks.values()),
                                       sum(p.numel() for p in module.parameters() if p.requires_grad)]
        if type(cb).__name__ == "DoCo" and cb._surgery is not None and cb._surgery.last is not None:
            out["doco_cosines"] = [float(c) for _, c in sorted(cb._surgery.last.cosines.items())]
        if type(cb).__name__ == "DoCo" and cb.discriminator is not None and torch.distributed.is_initialized():
            # the replicated discriminator: its largest difference between the ranks (a collective, every rank here)
            flat = torch.cat([p.detach().flatten() for p in cb.discriminator.parameters()])
            high, low = flat.clone(), flat.clone()
            torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
            torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
            out["doco_discriminator_spread"] = float((high - low).max())
# ---------------------------------------------------------------------------- SFD (shsfd)
#: SFD alone (its parameter set and loss term would clash with ESD's in one trainer) on the same sharded diffusion module.
SFD_GROUP = ["SFD"]


def _sfd_callbacks() -> dict[str, Callable[[], Callback]]:
    from lightning_forget.callbacks import SFD

    # The generator trains the UNet's Linear/Conv weights ("all": the norms and the concept table stay frozen, the
    # fake score trains them too); the fake's Adam sized to move its weights beyond the tolerance. The forgotten
    # class's SiD term (the same code with other labels) is left out to keep the launch short.
    return {"SFD": lambda: SFD(erase=[[0], [2]], batch_size=1, parameters="all", fake_lr=1e-2, forget_weight=0.0,
                               fake_forget_weight=1.0, seed=1)}


def _sfd_report(out: dict[str, Any], callbacks: list[Callback], module: nn.Module) -> None:
    """SFD's fake score network: the entries this rank holds against the module's, and its Adam moments'."""
    for cb in callbacks:
        if type(cb).__name__ == "SFD" and cb.fake is not None:
            moments = [v for s in cb.fake_optimizer.state.values() for v in s.values() if v.dim() > 0]
            out["sfd_fake_numel"] = [sum(v.numel() for v in cb.fake.values()), sum(p.numel() for p in module.parameters()),
                                     sum(v.numel() for v in moments)]
            out["sfd_table_numel"] = int(module.concept_embeddings.numel())


if __name__ == "__main__":
    torch.set_num_threads(1)
    # Groups separated by ";" share the launch: OUT_DIR/<i>/result.json per group.
    for index, group in enumerate(sys.argv[2].split(";")):
        main(Path(sys.argv[1]) / str(index), group.split(","))
    torch.distributed.destroy_process_group()

