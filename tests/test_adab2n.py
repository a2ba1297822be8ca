"""The AdaB2N callback: task ids per row with fine-tune, ER and DER++, the loss term, resume, DDP."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

from lightning_forget.callbacks import KFPF, AdaB2N, DarkExperienceReplay, ExperienceReplay, RefreshLearning
from lightning_forget.losses import StepContext
from lightning_forget.nn import AdaB2NBatchNorm2d, adab2n_layers
from tests.helpers.data import BlobStream
from tests.helpers.harness import flat_tensors, params_vector, quiet_trainer
from tests.helpers.models import conv_classifier


class RowRecorder(Callback):
    """Records, for every training forward of the model, the task ids the layers got and the
    true task of each row (looked up from the input rows, whose labels are known)."""

    def __init__(self, dm: BlobStream) -> None:
        x, y = dm._data["train"]
        self.task_of = {tuple(row.tolist()): int(label) // dm.classes_per_task for row, label in zip(x, y)}
        self.records: list[tuple[list[int], list[int]]] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        layer = adab2n_layers(pl_module)[0]
        truth: list[list[int]] = []

        def rows(module: Any, args: Any) -> None:
            if module.training:
                truth[:] = [[self.task_of[tuple(r.tolist())] for r in args[0]]]

        def record(module: Any, args: Any) -> None:  # runs after AdaB2N's own hook on the layer
            if module.training:
                ids = layer._task_ids
                self.records.append((ids.tolist() if ids is not None else [], truth[0]))

        pl_module.backbone.register_forward_pre_hook(rows)
        layer.register_forward_pre_hook(record)


def _fit(tmp_path: Path, callbacks: list[Callback], epochs_per_task: int = 1, **trainer_kwargs: Any) -> pl.LightningModule:
    pl.seed_everything(0)
    dm = BlobStream(epochs_per_task=epochs_per_task)
    model = conv_classifier(dm)
    trainer = quiet_trainer(tmp_path, callbacks, max_epochs=dm.max_epochs, **trainer_kwargs)
    trainer.fit(model, dm)
    return model


@pytest.mark.parametrize("replay", ["none", "er", "derpp", "er+derpp", "kfpf", "refresh+derpp"])
def test_every_row_gets_its_task(tmp_path: Path, replay: str) -> None:
    """Every training forward labels each row with its true task: the loader's rows, ER's joined
    rows, DER++'s draws joined to the step's forward, k-FPF's fine-tuning batches (defect 16: they
    were labelled with the current task), refresh's unlearn forward."""
    dm = BlobStream()
    recorder = RowRecorder(dm)
    parts = replay.split("+")
    extra: list[Callback] = []
    if "er" in parts:
        extra.append(ExperienceReplay(buffer_size=16, replay_batch_size=4))
    if "derpp" in parts:
        extra.append(DarkExperienceReplay(buffer_size=16, replay_batch_size=3))
    if "kfpf" in parts:
        extra.append(KFPF(interval=4, finetune_steps=2, finetune_batch_size=6, buffer_size=16))
    if "refresh" in parts:
        extra.insert(0, RefreshLearning(delta=1e-3, fisher_samples=8))
    # AdaB2N before the replay callbacks: its term still runs after DER++'s forwards
    model = _fit(tmp_path, [AdaB2N(kappa=0.5, lambd=0.1), *extra, recorder])
    records = recorder.records
    assert records and all(ids == truth for ids, truth in records), [r for r in records if r[0] != r[1]][:2]
    mixed = [ids for ids, _ in records if len(set(ids)) > 1]
    sizes = {len(ids) for ids, _ in records}
    if replay != "none":
        assert mixed, "replay must put rows of earlier tasks in some forwards"
    if replay == "er":
        assert 12 in sizes  # 8 + 4 joined
    elif replay == "er+derpp":
        assert 18 in sizes and 3 not in sizes  # 8 + 4 joined by ER, + 3 + 3 joined to the forward by DER++
    elif "derpp" in parts:
        assert 14 in sizes and 3 not in sizes  # DER++'s two draws of 3 joined to the step's forward
    elif replay == "kfpf":
        assert 6 in sizes
    layers = adab2n_layers(model)
    assert len(layers) == 1 and all(int(layer.cur_task) == 3 for layer in layers)
    # the task weights were trained (task 0 gets mass without rows in a fine-tune run)
    assert bool((layers[0].task_weight[:2] != 0).any())


class ForwardCounter(Callback):
    """Counts the model's training forwards per step and checks the user's step sees its own rows."""

    def __init__(self) -> None:
        self.per_step: list[int] = []
        self.outputs: list[int] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        def count(module: Any, args: Any) -> None:
            if module.training and trainer.training:
                self.per_step[-1] += 1

        pl_module.backbone.register_forward_pre_hook(count)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.per_step.append(0)


def test_derpp_draws_join_the_one_forward_of_the_step(tmp_path: Path) -> None:
    """Defect 15: with AdaB²N, DER++ runs one joined forward per step (stream and both draws), as
    the official code does, instead of three; the momentum recursion advances once per step and
    the statistics loss is counted once; the replay terms use the joined rows' outputs."""
    counter = ForwardCounter()
    derpp = DarkExperienceReplay(buffer_size=16, replay_batch_size=3, alpha=0.3, beta=0.7)

    class Counted(AdaB2N):
        forwards: list[int] = []

        def _stat_term(self, pl_module, batch, batch_idx, output):  # type: ignore[no-untyped-def]
            self.forwards.append(len(self._losses))
            return super()._stat_term(pl_module, batch, batch_idx, output)

    ada = Counted(kappa=0.5, lambd=0.1)
    model = _fit(tmp_path, [ada, derpp, counter])
    steps = len(counter.per_step)
    assert steps == 18 and counter.per_step == [1] * steps, counter.per_step
    assert ada.forwards == [1] * steps  # the statistics loss of one forward per step
    layer = adab2n_layers(model)[0]
    assert int(layer.num_batches_tracked) == steps  # the recursion advanced once per step
    assert len(derpp.buffer) == 16


def test_stat_loss_is_added_from_ada_t0(tmp_path: Path) -> None:
    base = params_vector(_fit(tmp_path / "a", [AdaB2N(kappa=0.5, lambd=0.0)]))
    never = params_vector(_fit(tmp_path / "b", [AdaB2N(kappa=0.5, lambd=5.0, ada_t0=3)]))
    late = params_vector(_fit(tmp_path / "c", [AdaB2N(kappa=0.5, lambd=5.0, ada_t0=2)]))
    assert torch.equal(base, never)
    assert not torch.allclose(base, late)


class _Fake(StepContext):
    pass


def test_labels_fallback_and_the_error_without_it() -> None:
    context = StepContext()
    context.add_replay("ER", 4, 3, {"y": torch.tensor([5, 0, 3])}, torch.tensor([-1, 0, -1]))
    callback = AdaB2N(classes_per_task=2)
    callback._in_step = True
    ids = callback.row_task_ids(context, 7, task=2)
    assert ids.tolist() == [2, 2, 2, 2, 2, 0, 1]
    with pytest.raises(RuntimeError, match="classes_per_task"):
        AdaB2N()._segment_ids(context.segments[0])
    with pytest.raises(RuntimeError, match="7"):
        callback.row_task_ids(context, 5, task=2)


def test_constructor_and_setup_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kappa"):
        AdaB2N(kappa=2.0)
    with pytest.raises(ValueError, match="lambd"):
        AdaB2N(lambd=-1.0)
    with pytest.raises(TypeError, match="ada_t0"):
        AdaB2N(ada_t0=0.5)  # type: ignore[arg-type]
    dm = BlobStream()
    from tests.helpers.harness import tiny_classifier

    trainer = quiet_trainer(tmp_path, [AdaB2N()], max_epochs=dm.max_epochs)
    with pytest.raises(RuntimeError, match="no nn.BatchNorm2d"):
        trainer.fit(tiny_classifier(dm), dm)


def test_sync_batchnorm_is_refused(tmp_path: Path) -> None:
    from lightning.pytorch.plugins import TorchSyncBatchNorm

    dm = BlobStream()
    trainer = quiet_trainer(tmp_path, [AdaB2N()], max_epochs=dm.max_epochs)
    trainer.strategy._layer_sync = TorchSyncBatchNorm()  # what Trainer(sync_batchnorm=True) sets under DDP
    with pytest.raises(RuntimeError, match="sync_batchnorm"):
        trainer.fit(conv_classifier(dm), dm)


def _resume_run(root: Path, saver: Any = None, resume: Any = None) -> pl.LightningModule:
    pl.seed_everything(0 if resume is None else 7)
    dm = BlobStream(epochs_per_task=2)
    model = conv_classifier(dm)
    callbacks: list[Callback] = [ExperienceReplay(buffer_size=16, replay_batch_size=4), AdaB2N(kappa=0.4, lambd=0.5)]
    kwargs: dict[str, Any] = {}
    if saver is not None:
        callbacks.append(saver)
        kwargs["enable_checkpointing"] = True
    trainer = quiet_trainer(root, callbacks, max_epochs=dm.max_epochs, **kwargs)
    trainer.fit(model, dm, ckpt_path=resume)
    return model


@pytest.mark.parametrize("where", ["mid_epoch", "epoch_end"])
def test_resume_equals_uninterrupted_with_the_recursion(tmp_path: Path, where: str) -> None:
    ckpt = tmp_path / "ckpt"
    if where == "mid_epoch":
        saver = ModelCheckpoint(dirpath=ckpt, every_n_train_steps=5, save_top_k=-1, filename="{step}")
        name = "step=15.ckpt"  # task 1, second epoch, third batch
    else:
        saver = ModelCheckpoint(dirpath=ckpt, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
        name = "epoch=2.ckpt"
    full = _resume_run(tmp_path / "full", saver=saver)
    assert (ckpt / name).exists(), sorted(os.listdir(ckpt))
    state = torch.load(ckpt / name, weights_only=False)["state_dict"]
    assert float(state["backbone.bn.eta"]) > 0 and int(state["backbone.bn.cur_task"]) == 1
    resumed = _resume_run(tmp_path / "resumed", resume=str(ckpt / name))
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].double(), b[key].double(), atol=1e-6), key


class ModelStateFingerprint(Callback):
    """At train end, rank 0 writes the largest difference of the model state (parameters and
    buffers) and of each callback's state between the two ranks."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = flat_tensors(dict(pl_module.state_dict()))
        states = flat_tensors([cb.state_dict() for cb in trainer.callbacks if cb is not self])
        vector = torch.cat([model, states])
        gathered = trainer.strategy.all_gather(vector)
        n = model.numel()
        if trainer.global_rank == 0:
            Path(self.out).write_text(json.dumps({
                "model": float((gathered[0, :n] - gathered[1, :n]).abs().max()),
                "callbacks": float((gathered[0, n:] - gathered[1, n:]).abs().max()),
                "eta": [float(m.eta) for m in adab2n_layers(pl_module)],
                "steps": int(trainer.global_step),
            }))


@pytest.mark.ddp
@pytest.mark.parametrize("broadcast_buffers", [True, False])
def test_ddp_ranks_keep_identical_parameters_and_layer_state(tmp_path: Path, broadcast_buffers: bool) -> None:
    out = str(tmp_path / "ranks.json")
    callbacks: list[Callback] = [
        DarkExperienceReplay(buffer_size=16, replay_batch_size=3),
        AdaB2N(kappa=0.4, lambd=0.5),
        ModelStateFingerprint(out),
    ]
    strategy = DDPStrategy(start_method="spawn", broadcast_buffers=broadcast_buffers)
    _fit(tmp_path, callbacks, devices=2, strategy=strategy)
    result = json.loads(Path(out).read_text())
    assert result["steps"] > 0 and result["eta"][0] > 0
    assert result["model"] == 0.0, result
    assert result["callbacks"] == 0.0, result


def test_layer_is_not_a_batchnorm_for_lightning() -> None:
    from torch.nn.modules.batchnorm import _BatchNorm

    assert not issubclass(AdaB2NBatchNorm2d, _BatchNorm)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), AdaB2NBatchNorm2d(2, 2, 0.5))
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    assert isinstance(synced[1], AdaB2NBatchNorm2d)  # left alone, not silently swapped


def test_fpf_selection_and_conversions_with_adab2n_layers(tmp_path: Path) -> None:
    """Defect 17: "batchnorm" selects AdaB²N layers; converting again with other settings, or an
    AdaB2N callback whose settings differ from the model's AdaB²N layers, is refused."""
    from lightning_forget.fpf_selection import select_modules
    from lightning_forget.nn import convert_adab2n

    dm = BlobStream()
    model = conv_classifier(dm)
    convert_adab2n(model, num_tasks=3, kappa=0.5)
    assert select_modules(model, ("batchnorm",)) == ["backbone.bn"]
    assert select_modules(model) == ["backbone.bn", "head"]
    assert "backbone.bn" in select_modules(model, ("norm",))
    convert_adab2n(model, num_tasks=3, kappa=0.5)  # the same settings: nothing to do
    with pytest.raises(ValueError, match=r"kappa=0.5 \(asked: 0.7\)"):
        convert_adab2n(model, num_tasks=3, kappa=0.7)
    with pytest.raises(ValueError, match=r"num_tasks=3 \(asked: 5\)"):
        convert_adab2n(model, num_tasks=5, kappa=0.5)
    trainer = quiet_trainer(tmp_path, [AdaB2N(kappa=0.7)], max_epochs=dm.max_epochs)
    with pytest.raises(RuntimeError, match=r"kappa=0.5 \(asked: 0.7\)"):
        trainer.fit(model, dm)
