"""The optimizer-step boundary (`lightning_forget.optim_step`): once per real optimizer step."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from lightning_forget.optim_step import OptimizerStepHooks, StepCounter
from lightning_forget.tasks import ContinualCallback
from tests.helpers.mech import TinyRegressor, plain_trainer, regression_loader


class Recorder(OptimizerStepHooks):
    def __init__(self) -> None:
        super().__init__()
        self.fired: list[tuple[int, int, int]] = []  # (step, batch_idx, global_step)
        self.weights: list[torch.Tensor] = []
        self._batch_idx = -1

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._batch_idx = batch_idx

    def on_optimizer_step_end(self, trainer: Any, pl_module: Any, step: int) -> None:
        self.fired.append((step, self._batch_idx, trainer.global_step))
        self.weights.append(pl_module.net[0].weight.detach().clone())


def test_fires_once_per_accumulated_step(tmp_path: Path) -> None:
    torch.manual_seed(0)
    rec = Recorder()
    trainer = plain_trainer(tmp_path, [rec], max_epochs=1, accumulate_grad_batches=3)
    trainer.fit(TinyRegressor(), regression_loader(36, batch_size=4))  # 9 batches
    assert [(s, b) for s, b, _ in rec.fired] == [(1, 2), (2, 5), (3, 8)]
    assert rec.optimizer_steps == 3 == trainer.global_step


class _SkipsOneStep(TinyRegressor):
    """A loss of inf on batch 1: the AMP scaler finds inf gradients and skips that step."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if batch_idx == 1 else loss


def test_skipped_amp_step_does_not_fire(tmp_path: Path) -> None:
    # fp16 autocast with a GradScaler runs on CPU when the plugin is passed explicitly
    # (Trainer(precision="16-mixed") itself is CUDA-only); init_scale=1 keeps fp16 finite.
    torch.manual_seed(0)
    rec = Recorder()
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1.0))
    trainer = plain_trainer(tmp_path, [rec], max_epochs=1, limit_train_batches=4, plugins=[plugin])
    trainer.fit(_SkipsOneStep(), regression_loader(24))
    assert trainer.global_step == 4  # Lightning counts the skipped step ...
    assert [(s, b) for s, b, _ in rec.fired] == [(1, 0), (2, 2), (3, 3)]  # ... the boundary does not
    assert plugin.scaler.get_scale() < 1.0  # the scaler did see the inf and backed off
    assert not torch.equal(rec.weights[0], rec.weights[1])


class _ManualEveryOther(TinyRegressor):
    """Manual optimization stepping on every second batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        if batch_idx % 2 == 1:
            opt.step()
            opt.zero_grad()
        return loss


def test_manual_optimization_counts_the_users_steps(tmp_path: Path) -> None:
    torch.manual_seed(0)
    rec = Recorder()
    trainer = plain_trainer(tmp_path, [rec], max_epochs=1, limit_train_batches=6)
    trainer.fit(_ManualEveryOther(), regression_loader(24))
    assert [(s, b) for s, b, _ in rec.fired] == [(1, 1), (2, 3), (3, 5)]


def test_inner_optimizer_is_not_counted(tmp_path: Path) -> None:
    """A callback's own optimizer (k-FPF's inner loop) does not count as a step of the run."""

    class Inner(Recorder):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            inner = torch.optim.SGD(pl_module.net[2].parameters(), lr=0.0)
            pl_module.net[2].weight.sum().backward()
            inner.step()
            inner.zero_grad()
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    rec = Inner()
    trainer = plain_trainer(tmp_path, [rec], max_epochs=1, limit_train_batches=3)
    trainer.fit(TinyRegressor(), regression_loader(24))
    assert [s for s, _, _ in rec.fired] == [1, 2, 3]


def test_composes_with_continual_callback_and_continues_across_fits(tmp_path: Path) -> None:
    class Both(OptimizerStepHooks, ContinualCallback):
        def __init__(self) -> None:
            super().__init__()
            self.steps: list[int] = []

        def on_optimizer_step_end(self, trainer: Any, pl_module: Any, step: int) -> None:
            self.steps.append(step)

    cb = Both()
    model = TinyRegressor()
    for fit in range(2):
        trainer = plain_trainer(tmp_path / str(fit), [cb], max_epochs=1, limit_train_batches=2)
        trainer.fit(model, regression_loader(24))
    assert cb.steps == [1, 2, 3, 4]


def test_counter_watch_is_idempotent_and_copies_watch_nothing() -> None:
    param = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([param], lr=0.1)
    counter = StepCounter()
    counter.watch([opt])
    counter.watch([opt])
    param.grad = torch.ones(1)
    opt.step()
    assert counter.pop() == 1 and counter.pop() == 0
    clone = copy.deepcopy(counter)
    restored = pickle.loads(pickle.dumps(counter))
    opt.step()
    assert clone.pop() == 0 and restored.pop() == 0 and counter.pop() == 1
    counter.close()
    opt.step()
    assert counter.pop() == 0


@pytest.mark.parametrize("skip", [False, True])
def test_counter_sees_scaler_skip_directly(skip: bool) -> None:
    param = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([param], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    counter = StepCounter()
    counter.watch([opt])
    loss = param.sum() * (float("inf") if skip else 1.0)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert counter.pop() == (0 if skip else 1)
