"""Harnesses every method's tests reuse: quiet trainers, crash-and-resume, 2-process DDP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_forget.modules import ContinualClassifier
from tests.helpers.data import BlobStream


def tiny_classifier(dm: Any, **kwargs: Any) -> ContinualClassifier:
    """A small MLP classifier sized for ``dm`` (no report callback unless asked)."""
    kwargs.setdefault("hidden_sizes", [16])
    kwargs.setdefault("report", False)
    return ContinualClassifier(
        backbone="mlp", num_classes=dm.num_classes, input_shape=dm.input_shape, num_tasks=dm.num_tasks, **kwargs
    )


def quiet_trainer(tmp_path: Path, callbacks: list[Callback], **kwargs: Any) -> pl.Trainer:
    """A CPU Trainer without progress bars or summaries; everything else is Lightning's default
    (the sanity check included: pass ``num_sanity_val_steps=0`` only in a test about it)."""
    kwargs.setdefault("accelerator", "cpu")
    kwargs.setdefault("devices", 1)
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("reload_dataloaders_every_n_epochs", 1)
    kwargs.setdefault("deterministic", True)
    return pl.Trainer(
        default_root_dir=str(tmp_path),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def flat_tensors(obj: Any) -> torch.Tensor:
    """Every tensor and number inside a (nested) state, flattened into one float64 vector."""
    parts: list[torch.Tensor] = []

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if value.dtype != torch.bool and not value.is_complex():
                parts.append(value.detach().double().flatten().cpu())
            else:
                parts.append(value.detach().to(torch.float64).flatten().cpu())
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(torch.tensor([float(value)], dtype=torch.float64))
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                visit(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    visit(obj)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def params_vector(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten().cpu() for p in module.parameters()])


def run_stream(
    tmp_path: Path,
    make_callback: Callable[[], Callback],
    *,
    epochs_per_task: int = 2,
    resume_after_epoch: Optional[int] = None,
    resume_after_step: Optional[int] = None,
    make_data: Callable[..., Any] = BlobStream,
    make_model: Callable[[Any], pl.LightningModule] = tiny_classifier,
    extra_callbacks: Callable[[], list[Callback]] = list,
    seed: int = 0,
    save_on_train_epoch_end: Optional[bool] = None,
) -> tuple[pl.LightningModule, Callback]:
    """Train a whole stream; with ``resume_after_epoch=e``, first train and checkpoint every
    epoch, then resume a fresh model and callback from the checkpoint written after epoch
    ``e`` and return what the resumed run ends with. ``save_on_train_epoch_end=False`` writes
    checkpoints at validation end, before ``on_train_epoch_end`` hooks run.

    With ``resume_after_step=s``, the first run writes a ``ModelCheckpoint(every_n_train_steps=s)``
    checkpoint after optimizer step ``s`` (pick ``s`` inside an epoch) and crashes at the start of
    the next batch; a fresh model and callback resume from that mid-epoch checkpoint."""
    if resume_after_epoch is not None and resume_after_step is not None:
        raise ValueError("give resume_after_epoch or resume_after_step, not both")
    pl.seed_everything(seed)
    dm = make_data(epochs_per_task=epochs_per_task)
    model = make_model(dm)
    callback = make_callback()
    ckpt_dir = tmp_path / "ckpt"
    callbacks = [callback, *extra_callbacks()]
    if resume_after_epoch is None and resume_after_step is None:
        trainer = quiet_trainer(tmp_path, callbacks, max_epochs=dm.max_epochs)
        trainer.fit(model, dm)
        return model, callback
    if resume_after_step is not None:
        saver = ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", save_top_k=-1, every_n_train_steps=resume_after_step)
        trainer = quiet_trainer(
            tmp_path, [CrashAtStep(resume_after_step), *callbacks, saver], max_epochs=dm.max_epochs, enable_checkpointing=True
        )
        try:
            trainer.fit(model, dm)
        except SimulatedCrash:
            pass
        else:  # pragma: no cover - the stream is shorter than the step asked for
            raise AssertionError(f"the run ended before step {resume_after_step}: nothing was interrupted")
        checkpoint = ckpt_dir / f"step={resume_after_step}.ckpt"
    else:
        saver = ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="{epoch}",
            save_top_k=-1,
            every_n_epochs=1,
            save_on_train_epoch_end=save_on_train_epoch_end,
        )
        trainer = quiet_trainer(
            tmp_path, [*callbacks, saver], max_epochs=resume_after_epoch + 1, enable_checkpointing=True
        )
        trainer.fit(model, dm)
        checkpoint = ckpt_dir / f"epoch={resume_after_epoch}.ckpt"
    pl.seed_everything(seed + 1)  # the resumed run must not depend on the global seed
    dm2 = make_data(epochs_per_task=epochs_per_task)
    model2 = make_model(dm2)
    callback2 = make_callback()
    trainer2 = quiet_trainer(tmp_path, [callback2, *extra_callbacks()], max_epochs=dm2.max_epochs)
    trainer2.fit(model2, dm2, ckpt_path=str(checkpoint))
    return model2, callback2


class SimulatedCrash(RuntimeError):
    """Raised by :class:`CrashAtStep` to interrupt a run the way a crash would."""


class CrashAtStep(Callback):
    """Raises :class:`SimulatedCrash` at the start of the first batch after optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            raise SimulatedCrash(f"simulated crash after step {self.step}")


class BatchRecorder(Callback):
    """Records ``(epoch, batch_idx, global_step, checksum of the batch's tensors)`` of every
    trained batch; one recorder passed to both halves of a resumed run records the whole run."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, int, float]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.seen.append((trainer.current_epoch, batch_idx, trainer.global_step, float(flat_tensors(batch).sum())))


def same_state(a: Any, b: Any) -> bool:
    """Whether two (nested) states hold the same keys, the same non-tensor values and equal
    tensors (NaNs equal to NaNs)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b) or torch.allclose(a.double(), b.double(), atol=0, rtol=0, equal_nan=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(same_state(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    return type(a) is type(b) and a == b


class RankFingerprint(Callback):
    """At train end, gathers parameter and callback-state fingerprints of every rank and
    writes rank 0's comparison to ``out`` (JSON) so the parent test can assert on it."""

    def __init__(self, watched: Callback, out: str) -> None:
        self.watched = watched
        self.out = out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = params_vector(pl_module)
        state = flat_tensors(self.watched.state_dict())
        fingerprint = torch.cat([params, state]).to(torch.float64)
        length = torch.tensor([float(fingerprint.numel())], dtype=torch.float64)
        lengths = trainer.strategy.all_gather(length).flatten()
        if lengths.min() != lengths.max():
            result: dict[str, Any] = {"equal_length": False, "lengths": lengths.tolist()}
        else:
            # Unmeasured entries are NaN in some states; equal NaNs count as equal.
            gathered = trainer.strategy.all_gather(torch.nan_to_num(fingerprint, nan=-1.2345e30))
            result = {
                "equal_length": True,
                "world_size": int(gathered.shape[0]),
                "max_param_diff": float((gathered[0, : params.numel()] - gathered[1, : params.numel()]).abs().max()),
                "max_state_diff": float((gathered[0, params.numel():] - gathered[1, params.numel():]).abs().max())
                if state.numel()
                else 0.0,
                "state_size": int(state.numel()),
                "global_step": int(trainer.global_step),
            }
        if trainer.global_rank == 0:
            Path(self.out).write_text(json.dumps(result))


class RankRNGDrift(Callback):
    """Draws from the global RNGs (torch, numpy, random) a different number of times on each rank in
    ``setup``, before the other callbacks' ``setup`` (as a datamodule whose ``prepare_data`` runs on
    local rank 0 only, or whose ``setup`` shuffles per rank, does): state a callback builds from the
    global RNG before DDP broadcasts the weights then differs by rank."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        import random

        import numpy as np

        for _ in range(trainer.global_rank + 1):
            torch.rand(7)
            np.random.rand(3)
            random.random()


def run_ddp_pair(
    tmp_path: Path,
    make_callback: Callable[[], Callback],
    *,
    make_data: Callable[..., Any] = BlobStream,
    make_model: Callable[[Any], pl.LightningModule] = tiny_classifier,
    epochs_per_task: int = 1,
    rng_drift: bool = False,
) -> dict[str, Any]:
    """Train a stream with 2 CPU processes (``ddp_spawn``, gloo) and compare the ranks.

    ``rng_drift=True`` makes the global RNGs differ by rank before the callback's ``setup``
    (:class:`RankRNGDrift`)."""
    pl.seed_everything(0)
    dm = make_data(epochs_per_task=epochs_per_task)
    model = make_model(dm)
    callback = make_callback()
    out = str(tmp_path / "ranks.json")
    trainer = quiet_trainer(
        tmp_path,
        [*([RankRNGDrift()] if rng_drift else []), callback, RankFingerprint(callback, out)],
        max_epochs=dm.max_epochs,
        devices=2,
        strategy="ddp_spawn",
    )
    trainer.fit(model, dm)
    return json.loads(Path(out).read_text())

