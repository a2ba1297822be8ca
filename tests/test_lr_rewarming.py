"""Tests of LRRewarming: schedule formulas, Trainer integration, resume, infinite schedule, DDP."""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_forget.callbacks import InfiniteLRSchedule
from lightning_forget.callbacks.lr_rewarming import LRRewarming, resolve_warmup, schedule_lr
from lightning_forget.datamodules.base import ContinualDataModule
from tests.helpers.harness import quiet_trainer

MAX_LR = 0.1
MIN_LR = 0.01
TASK_SIZES = (24, 40, 16)  # 3, 5 and 2 batches of 8
BATCH = 8
EPOCHS_PER_TASK = 2


# ---------------------------------------------------------------------------------------- fixtures
class StreamDM(ContinualDataModule):
    """Three synthetic tasks of different sizes (so that every task has its own length)."""

    def __init__(self, sizes: tuple[int, ...] = TASK_SIZES, epochs_per_task: int = EPOCHS_PER_TASK) -> None:
        super().__init__(num_tasks=len(sizes), epochs_per_task=epochs_per_task, batch_size=BATCH)
        self.sizes = sizes

    def train_dataset(self, task: int) -> Dataset:
        return _task_data(task, self.sizes[task])

    def val_dataset(self, task: int) -> Dataset:
        return _task_data(task, 8)


def _task_data(task: int, n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(100 + task)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, task % 4] > 0).long()
    return TensorDataset(x, y)


class TinyModel(pl.LightningModule):
    """A linear classifier with two param groups (the bias at half the LR)."""

    def __init__(self, optimizer: str = "sgd", with_scheduler: bool = False) -> None:
        super().__init__()
        self.net = nn.Linear(4, 2)
        self.optimizer_name = optimizer
        self.with_scheduler = with_scheduler

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        pass

    def configure_optimizers(self) -> Any:
        groups = [{"params": [self.net.weight], "lr": 1.0}, {"params": [self.net.bias], "lr": 0.5}]
        opt_cls = torch.optim.Adam if self.optimizer_name == "adam" else torch.optim.SGD
        optimizer = opt_cls(groups)
        if self.with_scheduler:
            return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1)}
        return optimizer


class Recorder(pl.Callback):
    """Records the LR of every optimizer step and, optionally, a view of the optimizer state."""

    def __init__(self, out: Optional[Path] = None) -> None:
        self.steps: list[int] = []
        self.lrs: list[list[float]] = []
        self.adam_steps: list[Optional[float]] = []
        self.out = out

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        optimizer = trainer.optimizers[0]
        self.steps.append(trainer.global_step)
        self.lrs.append([float(g["lr"]) for g in optimizer.param_groups])
        state = optimizer.state.get(pl_module.net.weight, {})
        self.adam_steps.append(float(state["step"]) if "step" in state else None)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.out is not None:
            params = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
            torch.save({"lrs": self.lrs, "steps": self.steps, "params": params}, self.out / f"rank{trainer.global_rank}.pt")


def _trainer(tmp_path: Path, callbacks: list, max_epochs: int, **kwargs: Any) -> pl.Trainer:
    # The shared harness; these tests are about the LR schedule, so validation is switched off.
    kwargs.setdefault("limit_val_batches", 0)
    kwargs.setdefault("num_sanity_val_steps", 0)
    return quiet_trainer(tmp_path, callbacks, max_epochs=max_epochs, **kwargs)


def _expected_rewarm(lengths: list[int], warmup: float, decay: str = "cosine") -> list[float]:
    lrs: list[float] = []
    for total in lengths:
        w = resolve_warmup(warmup, total)
        lrs += [schedule_lr(n, MAX_LR, MIN_LR, w, total, decay) for n in range(total)]
    return lrs


def _task_lengths(sizes: tuple[int, ...] = TASK_SIZES, epochs: int = EPOCHS_PER_TASK, ranks: int = 1) -> list[int]:
    return [math.ceil(math.ceil(n / ranks) / BATCH) * epochs for n in sizes]


# ---------------------------------------------------------------------------------------- formulas
def test_schedule_lr_rewarm_cosine_values() -> None:
    lr = lambda n: schedule_lr(n, 1.0, 0.1, warmup_steps=10, total_steps=100)  # noqa: E731
    assert lr(0) == pytest.approx(0.1)  # step 0 uses eta(1) = max/W
    assert lr(4) == pytest.approx(0.5)
    assert lr(9) == pytest.approx(1.0)  # warm-up ends: eta(W) = max
    assert lr(10) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 1 / 90)))
    assert lr(54) == pytest.approx(0.55)  # t = 55: halfway through the decay
    assert lr(99) == pytest.approx(0.1)  # last step of the task: eta(T) = min
    assert lr(150) == pytest.approx(0.1)  # past the task: stays at min
    # the next task restarts the clock: its first step re-warms
    assert schedule_lr(0, 1.0, 0.1, warmup_steps=5, total_steps=50) == pytest.approx(0.2)


def test_schedule_lr_rewarm_linear_and_no_warmup() -> None:
    lr = lambda n: schedule_lr(n, 1.0, 0.0, warmup_steps=0, total_steps=10, decay="linear")  # noqa: E731
    assert [lr(n) for n in range(10)] == pytest.approx([0.9 - 0.1 * n for n in range(10)])
    assert schedule_lr(4, 1.0, 0.2, warmup_steps=2, total_steps=10, decay="linear") == pytest.approx(1.0 - 0.8 * 3 / 8)
    # a warm-up longer than the task is clamped to the task
    assert schedule_lr(3, 1.0, 0.1, warmup_steps=8, total_steps=4) == pytest.approx(1.0)


def test_schedule_lr_infinite_values() -> None:
    kw: dict[str, Any] = dict(max_lr=1.0, min_lr=0.1, warmup_steps=10, mode="infinite", cooldown_steps=20, constant_lr=0.5)
    assert schedule_lr(0, **kw) == pytest.approx(0.1)
    assert schedule_lr(9, **kw) == pytest.approx(1.0)
    assert schedule_lr(19, **kw) == pytest.approx(0.5 + 0.25 * (1 + math.cos(math.pi / 2)))  # cooldown middle
    assert schedule_lr(29, **kw) == pytest.approx(0.5)  # cooldown end
    assert schedule_lr(10_000, **kw) == pytest.approx(0.5)  # constant, across any task switch
    ann = dict(kw, anneal_start=100, anneal_steps=10)
    assert schedule_lr(99, **ann) == pytest.approx(0.5)
    assert schedule_lr(100, **ann) == pytest.approx(0.5 * 0.2 ** 0.1)
    assert schedule_lr(104, **ann) == pytest.approx(0.5 * 0.2 ** 0.5)  # anneal middle
    assert schedule_lr(109, **ann) == pytest.approx(0.1)  # anneal end
    assert schedule_lr(500, **ann) == pytest.approx(0.1)
    assert schedule_lr(104, **dict(ann, anneal="cosine")) == pytest.approx(0.1 + 0.2 * (1 + math.cos(math.pi / 2)))
    assert schedule_lr(104, **dict(ann, anneal="linear")) == pytest.approx(0.5 - 0.4 * 0.5)
    # an anneal started during the cooldown starts from the LR of that moment
    early = dict(kw, anneal_start=15, anneal_steps=4, anneal="linear")
    from_lr = 0.5 + 0.25 * (1 + math.cos(math.pi * 5 / 20))
    assert schedule_lr(16, **early) == pytest.approx(from_lr + (0.1 - from_lr) * 0.5)
    assert schedule_lr(5, constant_lr=None, **{k: v for k, v in kw.items() if k != "constant_lr"}) == pytest.approx(0.6)


def test_schedule_lr_errors() -> None:
    with pytest.raises(ValueError, match="total_steps"):
        schedule_lr(0, 1.0, mode="rewarm")
    with pytest.raises(ValueError, match="step"):
        schedule_lr(-1, 1.0, total_steps=3)
    with pytest.raises(ValueError, match="anneal_steps"):
        schedule_lr(5, 1.0, 0.1, mode="infinite", anneal_start=2)
    with pytest.raises(ValueError, match="steps_per_task"):
        resolve_warmup(0.1, None)
    assert resolve_warmup(0.01, 250) == 3
    assert resolve_warmup(7, None) == 7


# ---------------------------------------------------------------------------------------- constructor
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(max_lr=0.0), ValueError, "max_lr"),
        (dict(max_lr=float("nan")), ValueError, "max_lr"),
        (dict(max_lr=1.0, min_lr=-1.0), ValueError, "min_lr"),
        (dict(max_lr=1.0, min_lr=2.0), ValueError, "must not exceed `max_lr`"),
        (dict(max_lr=1.0, warmup=1.5), ValueError, "fraction"),
        (dict(max_lr=1.0, warmup=-2), ValueError, "warmup"),
        (dict(max_lr=1.0, warmup="10"), TypeError, "warmup"),
        (dict(max_lr=1.0, decay="step"), ValueError, "decay"),
        (dict(max_lr=1.0, steps_per_task=0), ValueError, "steps_per_task"),
        (dict(max_lr=1.0, reset_optimizer_state="yes"), TypeError, "reset_optimizer_state"),
        (dict(max_lr=1.0, mode="cyclic"), ValueError, "mode"),
        (dict(max_lr=1.0, cooldown_steps=10), ValueError, "mode='infinite'"),
        (dict(max_lr=1.0, anneal_at_start=True), ValueError, "anneal_at_start"),
        (dict(max_lr=1.0, mode="infinite", cooldown_steps=-1), ValueError, "cooldown_steps"),
        (dict(max_lr=1.0, mode="infinite", constant_lr=2.0), ValueError, "constant_lr"),
        (dict(max_lr=1.0, mode="infinite", anneal="step"), ValueError, "anneal"),
        (dict(max_lr=1.0, mode="infinite", min_lr=0.0), ValueError, "min_lr"),
        (dict(max_lr=1.0, mode="infinite", anneal_steps=0), ValueError, "anneal_steps"),
        (dict(max_lr=1.0, mode="infinite", anneal_at_start=True), ValueError, "anneal_steps"),
        (dict(max_lr=1.0, mode="infinite", anneal_after_steps=-1), ValueError, "anneal_after_steps"),
        (
            dict(max_lr=1.0, mode="infinite", anneal_at_start=True, anneal_after_steps=3, anneal_steps=2),
            ValueError,
            "only one",
        ),
    ],
)
def test_constructor_errors(kwargs: dict[str, Any], error: type, match: str) -> None:
    cls = LRRewarming
    if kwargs.get("mode") == "infinite":
        kwargs = {k: v for k, v in kwargs.items() if k != "mode"}
        cls = InfiniteLRSchedule
    with pytest.raises(error, match=match):
        cls(**kwargs)


def test_defaults_pickle_and_method_errors() -> None:
    cb = LRRewarming(max_lr=3e-4)
    assert cb.min_lr == pytest.approx(3e-5)
    inf = InfiniteLRSchedule(max_lr=1.0, min_lr=0.1)
    assert inf.constant_lr == pytest.approx(0.55)
    clone = pickle.loads(pickle.dumps(cb))
    assert clone.state_dict() == cb.state_dict()
    assert cb.state_dict()["version"] == 1
    with pytest.raises(RuntimeError, match="infinite"):
        cb.start_anneal(5)
    with pytest.raises(RuntimeError, match="no task"):
        cb.lr_at(0)
    with pytest.raises(ValueError, match="steps"):
        inf.start_anneal()
    # with a known task length, lr_at works before training
    assert LRRewarming(max_lr=1.0, min_lr=0.1, warmup=2, steps_per_task=10).lr_at(1) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------- one fit, many tasks
def test_rewarm_one_fit_matches_formula_and_lr_monitor(tmp_path: Path) -> None:
    pl.seed_everything(0)
    dm = StreamDM()
    cb = LRRewarming(max_lr=MAX_LR, min_lr=MIN_LR, warmup=0.25)
    rec = Recorder()
    monitor = LearningRateMonitor(logging_interval="step")
    trainer = _trainer(tmp_path, [cb, rec, monitor], dm.max_epochs, logger=CSVLogger(tmp_path), log_every_n_steps=1)
    with pytest.warns(UserWarning, match="replaced the scheduler"):
        trainer.fit(TinyModel(with_scheduler=True), datamodule=dm)

    lengths = _task_lengths()
    assert lengths == [6, 10, 4]
    expected = _expected_rewarm(lengths, 0.25)
    assert rec.steps == list(range(sum(lengths)))
    assert [lr[0] for lr in rec.lrs] == pytest.approx(expected)
    assert [lr[1] for lr in rec.lrs] == pytest.approx([0.5 * v for v in expected])  # group ratio kept
    assert [cb.lr_at(s) for s in rec.steps] == pytest.approx(expected)
    # the first step of every task re-warms
    assert rec.lrs[6][0] == pytest.approx(MAX_LR / 3) and rec.lrs[16][0] == pytest.approx(MAX_LR)
    assert rec.lrs[5][0] == pytest.approx(MIN_LR) and rec.lrs[15][0] == pytest.approx(MIN_LR)
    # LearningRateMonitor sees the callback's scheduler
    assert monitor.lrs["lr_rewarming/lr/pg1"] == pytest.approx(expected)
    assert monitor.lrs["lr_rewarming/lr/pg2"] == pytest.approx([0.5 * v for v in expected])
    state = cb.state_dict()["method"]
    assert state["steps"] == 20
    assert state["segments"] == [[0, 6, 2], [6, 10, 3], [16, 4, 1]]


def test_linear_decay_and_steps_per_task(tmp_path: Path) -> None:
    dm = StreamDM(sizes=(40, 40), epochs_per_task=1)  # 5 steps per task
    cb = LRRewarming(max_lr=MAX_LR, min_lr=MIN_LR, warmup=1, decay="linear", steps_per_task=4)
    rec = Recorder()
    with pytest.warns(UserWarning, match="run past"):  # tasks have 5 steps, but steps_per_task says 4
        _trainer(tmp_path, [cb, rec], dm.max_epochs).fit(TinyModel(), datamodule=dm)
    one_task = [MAX_LR, MAX_LR - (MAX_LR - MIN_LR) / 3, MAX_LR - 2 * (MAX_LR - MIN_LR) / 3, MIN_LR, MIN_LR]
    assert one_task == pytest.approx([schedule_lr(n, MAX_LR, MIN_LR, 1, 4, "linear") for n in range(5)])
    assert [lr[0] for lr in rec.lrs] == pytest.approx(one_task * 2)


@pytest.mark.parametrize("reset", [True, False])
def test_reset_optimizer_state_at_switch(tmp_path: Path, reset: bool) -> None:
    dm = StreamDM(sizes=(24, 16), epochs_per_task=1)
    cb = LRRewarming(max_lr=MAX_LR, min_lr=MIN_LR, warmup=1, reset_optimizer_state=reset)
    rec = Recorder()
    _trainer(tmp_path, [cb, rec], dm.max_epochs).fit(TinyModel("adam"), datamodule=dm)
    # 3 steps in task 0, then task 1 starts at global step 3
    assert rec.adam_steps[:3] == [None, 1.0, 2.0]
    assert rec.adam_steps[3] == (None if reset else 3.0)
    assert rec.adam_steps[4] == (1.0 if reset else 4.0)


# ---------------------------------------------------------------------------------------- one fit per task
@pytest.mark.parametrize("reset", [False, True])
def test_one_fit_per_task_rewarms_and_carries_adam_state(tmp_path: Path, reset: bool) -> None:
    model = TinyModel("adam")
    cb = LRRewarming(max_lr=MAX_LR, min_lr=MIN_LR, warmup=0.25, reset_optimizer_state=reset)
    first, second = Recorder(), Recorder()
    loader0 = DataLoader(_task_data(0, 24), batch_size=BATCH)
    loader1 = DataLoader(_task_data(1, 40), batch_size=BATCH)
    kw = dict(reload_dataloaders_every_n_epochs=0)
    trainer0 = _trainer(tmp_path, [cb, first], 2, **kw)
    trainer0.fit(model, train_dataloaders=loader0)
    end_of_task0 = {k: v.clone() for k, v in trainer0.optimizers[0].state[model.net.weight].items()}
    trainer1 = _trainer(tmp_path, [cb, second], 2, **kw)
    trainer1.fit(model, train_dataloaders=loader1)

    assert cb.task == 1
    assert [lr[0] for lr in first.lrs] == pytest.approx(_expected_rewarm([6], 0.25))
    assert [lr[0] for lr in second.lrs] == pytest.approx(_expected_rewarm([10], 0.25))  # re-warmed
    assert cb.state_dict()["method"]["segments"] == [[0, 6, 2], [6, 10, 3]]
    assert [cb.lr_at(6 + n) for n in range(10)] == pytest.approx(_expected_rewarm([10], 0.25))
    if reset:
        assert second.adam_steps[0] is None
    else:
        assert second.adam_steps[0] == end_of_task0["step"].item() == 6.0
        assert second.adam_steps[1] == 7.0


def test_one_fit_per_task_needs_a_length(tmp_path: Path) -> None:
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):  # type: ignore[no-untyped-def]
            for i in range(3):
                yield torch.randn(4), torch.tensor(i % 2)

    cb = LRRewarming(max_lr=MAX_LR, min_lr=MIN_LR)
    trainer = _trainer(tmp_path, [cb], -1, reload_dataloaders_every_n_epochs=0, max_steps=-1)
    with pytest.raises(RuntimeError, match="steps_per_task"):
        trainer.fit(TinyModel(), train_dataloaders=DataLoader(Stream(), batch_size=2))


def test_two_instances_refused(tmp_path: Path) -> None:
    # Lightning refuses it when the Trainer is built (the two would share a state key)
    with pytest.raises(RuntimeError, match="more than one stateful callback of type `LRRewarming`"):
        _trainer(tmp_path, [LRRewarming(max_lr=1.0), LRRewarming(max_lr=2.0)], 1)


# ---------------------------------------------------------------------------------------- resume
def _resume_run(
    tmp_path: Path, max_steps: int = -1, ckpt: Optional[Path] = None, callbacks: tuple = ()
) -> tuple[Recorder, pl.LightningModule, pl.Trainer]:
    pl.seed_everything(0)
    model, rec = TinyModel("adam"), Recorder()
    cb = LRRewarming(max_lr=MAX_LR, min_lr=MIN_LR, warmup=0.25)
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    trainer = _trainer(
        tmp_path, [cb, rec, *callbacks], StreamDM().max_epochs, max_steps=max_steps, enable_checkpointing=checkpointing
    )
    trainer.fit(model, datamodule=StreamDM(), ckpt_path=ckpt)
    return rec, model, trainer


def test_resume_mid_task_matches_uninterrupted(tmp_path: Path) -> None:
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=4, save_top_k=-1)
    full, model_a, _ = _resume_run(tmp_path, callbacks=(saver,))
    by_step = dict(zip(full.steps, full.lrs))

    # 1. stopped by max_steps at step 11: an epoch boundary inside task 1 (6 + 5 of its 10 steps)
    _, _, stopped = _resume_run(tmp_path, max_steps=11)
    stopped.save_checkpoint(tmp_path / "stop.ckpt")
    resumed, model_b, _ = _resume_run(tmp_path, ckpt=tmp_path / "stop.ckpt")
    assert resumed.steps == list(range(11, 20))
    assert resumed.lrs == [pytest.approx(by_step[s]) for s in resumed.steps]
    for p_a, p_b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.allclose(p_a, p_b)

    # 2. a checkpoint written mid-epoch (step 8, the 3rd batch of task 1's first epoch): the LR of
    # every later step is the uninterrupted run's (the batches differ: the loader is not resumable)
    ckpt = next((tmp_path / "ckpts").glob("*step=8.ckpt"))
    resumed_mid, _, _ = _resume_run(tmp_path, ckpt=ckpt)
    assert resumed_mid.steps == list(range(8, 20))
    assert resumed_mid.lrs == [pytest.approx(by_step[s]) for s in resumed_mid.steps]


# ---------------------------------------------------------------------------------------- infinite
def _infinite(**kwargs: Any) -> InfiniteLRSchedule:
    return InfiniteLRSchedule(max_lr=MAX_LR, min_lr=MIN_LR, warmup=2, cooldown_steps=4, **kwargs)


def _expected_infinite(steps: range, **kwargs: Any) -> list[float]:
    return [
        schedule_lr(s, MAX_LR, MIN_LR, 2, None, mode="infinite", cooldown_steps=4, **kwargs) for s in steps
    ]


class AnnealAt(pl.Callback):
    def __init__(self, cb: InfiniteLRSchedule, step: int, length: int) -> None:
        self.cb, self.step, self.length = cb, step, length

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            self.cb.start_anneal(self.length)


def test_infinite_schedule_no_rewarming_and_start_anneal(tmp_path: Path) -> None:
    dm = StreamDM()
    cb = _infinite(reset_optimizer_state=False)
    rec = Recorder()
    _trainer(tmp_path, [cb, AnnealAt(cb, 14, 4), rec], dm.max_epochs).fit(TinyModel(), datamodule=dm)
    expected = _expected_infinite(range(20), anneal_start=14, anneal_steps=4)
    assert [lr[0] for lr in rec.lrs] == pytest.approx(expected)
    const = 0.5 * (MAX_LR + MIN_LR)
    assert [lr[0] for lr in rec.lrs[6:14]] == pytest.approx([const] * 8)  # across the task switch at 6
    assert rec.lrs[17][0] == pytest.approx(MIN_LR)
    assert [cb.lr_at(s) for s in range(20)] == pytest.approx(expected)


def test_infinite_anneal_after_steps(tmp_path: Path) -> None:
    dm = StreamDM()
    cb = _infinite(anneal_after_steps=10, anneal_steps=5, anneal="cosine")
    rec = Recorder()
    _trainer(tmp_path, [cb, rec], dm.max_epochs).fit(TinyModel(), datamodule=dm)
    expected = _expected_infinite(range(20), anneal_start=10, anneal_steps=5, anneal="cosine")
    assert [lr[0] for lr in rec.lrs] == pytest.approx(expected)


def test_infinite_release_branch_anneals_while_main_stays_constant(tmp_path: Path) -> None:
    dm = StreamDM()
    main, rec_main = _infinite(), Recorder()
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpts", every_n_train_steps=12, save_top_k=-1)
    pl.seed_everything(0)
    _trainer(tmp_path, [main, rec_main, ckpt_cb], dm.max_epochs, enable_checkpointing=True).fit(
        TinyModel(), datamodule=dm
    )
    const = 0.5 * (MAX_LR + MIN_LR)
    assert [lr[0] for lr in rec_main.lrs[6:]] == pytest.approx([const] * 14)  # main run never anneals
    ckpt = next((tmp_path / "ckpts").glob("*step=12*"))

    branch, rec_branch = _infinite(anneal_at_start=True, anneal_steps=4), Recorder()
    trainer = _trainer(tmp_path, [branch, rec_branch], dm.max_epochs, max_steps=16)
    trainer.fit(TinyModel(), datamodule=StreamDM(), ckpt_path=ckpt)
    assert rec_branch.steps == [12, 13, 14, 15]
    assert [lr[0] for lr in rec_branch.lrs] == pytest.approx([const * (MIN_LR / const) ** (k / 4) for k in (1, 2, 3, 4)])
    assert branch.state_dict()["method"]["anneal_start"] == 12


def test_infinite_one_fit_per_task_warms_up_once(tmp_path: Path) -> None:
    model = TinyModel()
    cb = InfiniteLRSchedule(max_lr=MAX_LR, min_lr=MIN_LR, warmup=0.25, cooldown_steps=3)
    recs = [Recorder(), Recorder()]
    for rec, data in zip(recs, (_task_data(0, 24), _task_data(1, 40))):
        trainer = _trainer(tmp_path, [cb, rec], 2, reload_dataloaders_every_n_epochs=0)
        trainer.fit(model, train_dataloaders=DataLoader(data, batch_size=BATCH))
    # W = ceil(0.25 * 6) = 2 from the first task; the second fit continues the same clock
    expected = [schedule_lr(s, MAX_LR, MIN_LR, 2, None, mode="infinite", cooldown_steps=3) for s in range(16)]
    assert [lr[0] for lr in recs[0].lrs + recs[1].lrs] == pytest.approx(expected)
    assert [lr[0] for lr in recs[1].lrs] == pytest.approx([0.5 * (MAX_LR + MIN_LR)] * 10)
    assert cb.state_dict()["method"]["steps"] == 16 and cb.state_dict()["method"]["warmup_steps"] == 2


class ManualModel(TinyModel):
    """Manual optimization: Lightning does not step schedulers, the callback still sets the LR."""

    def __init__(self, n_optimizers: int = 1) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.n_optimizers = n_optimizers

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        opt = opt[0] if isinstance(opt, list) else opt
        loss = super().training_step(batch, batch_idx)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss

    def configure_optimizers(self) -> Any:
        if self.n_optimizers == 1:
            return super().configure_optimizers()
        return [torch.optim.SGD([self.net.weight], lr=1.0), torch.optim.SGD([self.net.bias], lr=1.0)]


def test_manual_optimization_and_optimizer_count(tmp_path: Path) -> None:
    dm = StreamDM()
    cb, rec = LRRewarming(max_lr=MAX_LR, min_lr=MIN_LR, warmup=0.25), Recorder()
    _trainer(tmp_path, [cb, rec], dm.max_epochs).fit(ManualModel(), datamodule=dm)
    assert [lr[0] for lr in rec.lrs] == pytest.approx(_expected_rewarm(_task_lengths(), 0.25))
    trainer = _trainer(tmp_path, [LRRewarming(max_lr=MAX_LR)], dm.max_epochs)
    with pytest.raises(RuntimeError, match="exactly one optimizer"):
        trainer.fit(ManualModel(n_optimizers=2), datamodule=StreamDM())


# ---------------------------------------------------------------------------------------- DDP
@pytest.mark.ddp
def test_ddp_two_processes_same_lr_and_parameters(tmp_path: Path) -> None:
    dm = StreamDM()
    cb = LRRewarming(max_lr=MAX_LR, min_lr=MIN_LR, warmup=0.25, reset_optimizer_state=True)
    rec = Recorder(out=tmp_path)
    trainer = _trainer(tmp_path, [cb, rec], dm.max_epochs, devices=2, strategy="ddp_spawn")
    trainer.fit(TinyModel("adam"), datamodule=dm)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    lengths = _task_lengths(ranks=2)
    assert r0["steps"] == r1["steps"] == list(range(sum(lengths)))
    assert r0["lrs"] == r1["lrs"]
    assert [lr[0] for lr in r0["lrs"]] == pytest.approx(_expected_rewarm(lengths, 0.25))
    for key in r0["params"]:
        assert torch.equal(r0["params"][key], r1["params"][key])


# ---------------------------------------------------------------------------------------- the split (issue 10.2)
def test_schedule_functions_match_schedule_lr() -> None:
    from lightning_forget.schedules import TaskSegment, infinite_lr, rewarm_lr, segment_lr

    for n in range(0, 120, 7):
        assert rewarm_lr(n, 1.0, 0.1, 10, 100) == schedule_lr(n, 1.0, 0.1, 10, 100)
        assert infinite_lr(n, 1.0, 0.1, 10, 20, 0.5, anneal_start=60, anneal_steps=10) == schedule_lr(
            n, 1.0, 0.1, 10, mode="infinite", cooldown_steps=20, constant_lr=0.5, anneal_start=60, anneal_steps=10
        )
    segment = TaskSegment(start=30, total_steps=100, warmup_steps=10)
    assert segment_lr(30 + 54, segment, 1.0, 0.1) == pytest.approx(0.55)
    assert segment == (30, 100, 10) and segment.total_steps == 100
    with pytest.raises(ValueError, match="mode"):
        schedule_lr(0, 1.0, mode="cyclic")  # type: ignore[arg-type]


def test_segments_are_named(tmp_path: Path) -> None:
    from lightning_forget.schedules import TaskSegment

    dm = StreamDM()
    cb = LRRewarming(max_lr=MAX_LR, min_lr=MIN_LR, warmup=0.25)
    _trainer(tmp_path, [cb], dm.max_epochs).fit(TinyModel(), datamodule=dm)
    assert cb.segments == (TaskSegment(0, 6, 2), TaskSegment(6, 10, 3), TaskSegment(16, 4, 1))
    assert cb.segments[1].warmup_steps == 3
    assert cb.state_dict()["method"]["segments"] == [[0, 6, 2], [6, 10, 3], [16, 4, 1]]  # plain lists on disk


def test_mode_infinite_is_deprecated_and_builds_the_new_class() -> None:
    with pytest.warns(DeprecationWarning, match="InfiniteLRSchedule"):
        cb = LRRewarming(max_lr=1.0, min_lr=0.1, warmup=2, mode="infinite", cooldown_steps=5, anneal_steps=3)
    assert type(cb) is InfiniteLRSchedule
    assert (cb.cooldown_steps, cb.anneal_steps, cb.constant_lr) == (5, 3, pytest.approx(0.55))
    assert cb.SCHEDULER_NAME == "lr_rewarming/lr"  # the LR key existing runs log
    assert InfiniteLRSchedule.SCHEDULER_NAME == "infinite_lr/lr"
    assert type(pickle.loads(pickle.dumps(cb))) is InfiniteLRSchedule
    with pytest.warns(DeprecationWarning):  # positional `mode` too
        assert type(LRRewarming(1.0, 0.1, 2, "cosine", None, False, "infinite")) is InfiniteLRSchedule
    assert type(LRRewarming(max_lr=1.0)) is LRRewarming
    assert type(pickle.loads(pickle.dumps(LRRewarming(max_lr=1.0)))) is LRRewarming


def test_legacy_infinite_checkpoint_resumes_with_the_new_class(tmp_path: Path) -> None:
    """A checkpoint of `LRRewarming(mode="infinite")` keeps its state under the key "LRRewarming"."""
    dm = StreamDM()
    full, rec_full = _infinite(), Recorder()
    _trainer(tmp_path, [full, rec_full], dm.max_epochs).fit(TinyModel(), datamodule=dm)

    stopped = _infinite()
    trainer = _trainer(tmp_path, [stopped], dm.max_epochs, max_steps=11)  # an epoch end inside task 1
    trainer.fit(TinyModel(), datamodule=StreamDM())
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    ckpt = torch.load(tmp_path / "new.ckpt", weights_only=False)
    ckpt["callbacks"] = {"LRRewarming": ckpt["callbacks"]["InfiniteLRSchedule"]}
    torch.save(ckpt, tmp_path / "legacy.ckpt")

    resumed, rec = _infinite(), Recorder()
    _trainer(tmp_path, [resumed, rec], dm.max_epochs).fit(TinyModel(), datamodule=StreamDM(), ckpt_path=tmp_path / "legacy.ckpt")
    assert rec.steps == list(range(11, 20))
    assert [lr[0] for lr in rec.lrs] == pytest.approx([lr[0] for lr in rec_full.lrs[11:]])
    assert resumed.state_dict()["method"] == full.state_dict()["method"]
    # the re-warming callback refuses an infinite schedule's state instead of misreading it
    with pytest.raises(RuntimeError, match="InfiniteLRSchedule"):
        LRRewarming(max_lr=MAX_LR).load_state_dict(full.state_dict())


def test_deprecated_infinite_yaml_still_runs(tmp_path: Path) -> None:
    import yaml

    from lightning_forget.cli import main

    config = {
        "trainer": {
            "accelerator": "cpu", "fast_dev_run": 2, "reload_dataloaders_every_n_epochs": 1, "logger": False,
            "enable_progress_bar": False, "default_root_dir": str(tmp_path),
            "callbacks": [{
                "class_path": "lightning_forget.callbacks.LRRewarming",
                "init_args": {"mode": "infinite", "max_lr": 0.1, "min_lr": 0.01, "warmup": 3, "cooldown_steps": 10},
            }],
        },
        "model": {"class_path": "lightning_forget.modules.ContinualClassifier", "init_args": {"hidden_sizes": [16], "report": False}},
        "data": {"class_path": "tests.helpers.data.BlobStream"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.warns(DeprecationWarning, match="InfiniteLRSchedule"):
        cli = main(["fit", "--config", str(path)])
    built = [cb for cb in cli.trainer.callbacks if isinstance(cb, InfiniteLRSchedule)]
    assert len(built) == 1 and built[0].cooldown_steps == 10
    assert cli.trainer.global_step > 0
