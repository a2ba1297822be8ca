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

from lightning_forget.sharding import full_tensor

NUM_TASKS = 2
REPLAY = ("ExperienceReplay", "DarkExperienceReplay")
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
        "ContinualEvaluation": lambda: cbs.ContinualEvaluation(
            # 5 rows over 2 ranks in batches of 2: rank 0 runs 2 forwards, rank 1's 2 rows 1, so under
            # sharding rank 1 must run one more (a sharded forward is collective) or the run hangs.
            every_n_steps=3, samples_per_task=5, batch_size=2, save_csv=False, save_plot=False),
    }
    make.update(_erasure_callbacks())
    return [make[name]() for name in names]


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
        resume: str | None = None, save_every: int | None = None) -> dict[str, Any]:
    from lightning.pytorch.strategies import ModelParallelStrategy

    pl.seed_everything(0)
    module = _module_for(names)
    callbacks = _callbacks(names)
    devices = 1 if strategy_name == "single" else 2
    out: dict[str, Any] = {}
    for task in range(NUM_TASKS):
        if resume is not None and task == 0:
            continue  # the checkpoint is inside task 1: task 0's fit happened before it
        strategy = {
            "sharded": lambda: ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
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
        train, vals = _tasks(BATCH * (2 if devices == 1 else 1), devices, trainer.global_rank, _data_for(names))[task]
        try:
            trainer.fit(module, train, vals, ckpt_path=resume if task == 1 else None)
        except _Crash:
            return {"crashed": True}
    out["params"] = _params(module)
    out["states"] = {type(cb).__name__: _plain(cb.state_dict()) for cb in callbacks}
    out["param_types"] = sorted({type(p).__name__ for p in module.parameters()})
    for cb in callbacks:
        if type(cb).__name__ == "LiNeS":
            # θ_0 as this rank's shards (numel), and the files of the last fit (rank 0 writes them).
            out["lines_theta0_numel"] = [sum(t.numel() for t in cb.theta0.values()), sum(p.numel() for p in module.parameters())]
            if cb.output_paths:
                out["lines_files"] = {kind: {n: v.double().flatten().tolist() for n, v in torch.load(cb.output_paths[kind], weights_only=True).items()}
                                      for kind in ("scaled", "unscaled")}
    _erasure_report(out, callbacks, module)
    out["global_step"] = int(trainer.global_step)
    out["strategy"] = [type(trainer.strategy).__name__, int(trainer.world_size)]
    if strategy_name == "sharded":
        roundtrip = _callbacks(names)
        for fresh, cb in zip(roundtrip, callbacks):
            fresh.load_state_dict(cb.state_dict())
        out["roundtrip"] = {type(cb).__name__: _plain(cb.state_dict()) for cb in roundtrip}
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
    alone = [name for name in names if name not in REPLAY and name not in ERASURE_GROUP]
    rank = torch.distributed.get_rank()
    if alone:
        results["sharded_alone"] = run(root / "e", "sharded", alone) if alone != names else results["sharded"]
        results["single"] = run(root / f"d{rank}", "single", alone)
    if names == FIRST_GROUP:
        results["classifier"] = {strategy: classifier_run(root / f"cls_{strategy}", strategy) for strategy in ("sharded", "ddp")}
    if rank == 0:
        from lightning_forget.export import load_sharded_checkpoint

        final = sorted((root / "a" / "ckpt").glob("*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))[-1]
        plain = _module_for(names)
        checkpoint = load_sharded_checkpoint(final, plain)
        from lightning_forget.export import export_plain_checkpoint

        written = export_plain_checkpoint(_module_for(names), root / "plain.ckpt", checkpoint_path=final)
        again = _module_for(names)
        again.load_state_dict(torch.load(written, weights_only=True)["state_dict"])
        results["export"] = {
            "params": _params(plain),
            "plain_checkpoint_params": _params(again),
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
ERASURE_GROUP = ["ESD", "UCE", "ErasureEvaluation"]


def _erasure_callbacks() -> dict[str, Callable[[], Callback]]:
    from lightning_forget.callbacks import ESD, UCE, ErasureEvaluation

    return {"ESD": lambda: ESD(erase=[[0], [2]], ddim_steps=2, seed=1),
            "UCE": lambda: UCE(erase=[[1], [3]], when="task_end"),
            # 4 classes × 3 samples: 6 a rank (the padding of uneven shares is checked in tests/test_erasure.py)
            "ErasureEvaluation": lambda: ErasureEvaluation(erase=[[0], [2]], samples_per_class=3, judge_epochs=1,
                                                           num_steps=2, grid_per_class=1)}


def _erasure_report(out: dict[str, Any], callbacks: list[Callback], module: nn.Module) -> None:
    """ESD's teacher: the entries this rank holds against the module's (local shards under FSDP2, a full copy under DDP)."""
    for cb in callbacks:
        if type(cb).__name__ == "ESD" and cb.teacher is not None:
            out["esd_teacher_numel"] = [sum(v.numel() for v in cb.teacher.weights.values()),
                                        sum(p.numel() for p in module.parameters())]
            out["esd_table_numel"] = int(module.concept_embeddings.numel())


def _module_for(names: list[str]) -> pl.LightningModule:
    return ShardedDiffusion() if names == ERASURE_GROUP else ShardedUserModule()


def _data_for(names: list[str]) -> Any:
    if names != ERASURE_GROUP:
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


if __name__ == "__main__":
    torch.set_num_threads(1)
    # Groups separated by ";" share the launch: OUT_DIR/<i>/result.json per group.
    for index, group in enumerate(sys.argv[2].split(";")):
        main(Path(sys.argv[1]) / str(index), group.split(","))
    torch.distributed.destroy_process_group()
