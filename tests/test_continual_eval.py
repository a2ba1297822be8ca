"""Tests of the stability-gap metrics and the ``ContinualEvaluation`` callback."""

from __future__ import annotations

import copy
import csv
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_forget.callbacks.continual_eval import ContinualEvaluation
from lightning_forget.datamodules.base import ContinualDataModule
from lightning_forget.metrics.stability import (
    EvalCurves,
    as_curves,
    current_task_index,
    min_acc,
    min_acc_from_minima,
    stability_metrics,
    update_task_minima,
    wc_acc,
    wc_acc_from,
    windowed_forgetting,
    windowed_plasticity,
)
from tests.helpers.harness import quiet_trainer

NAN = math.nan
REPO = Path(__file__).resolve().parents[1]

# ====================================================================== metrics vs hand-computed values
# Three tasks; task 0 ends at step 4, task 1 at step 8; task 2 is current at step 12.
STEPS = [2, 4, 6, 8, 10, 12]
ACC = [
    [0.5, NAN, NAN],  # step 2   (task 0 training)
    [0.9, NAN, NAN],  # step 4   (last step of task 0)
    [0.6, 0.4, NAN],  # step 6   (task 1 training)
    [0.3, 0.8, NAN],  # step 8   (last step of task 1)
    [0.7, 0.5, 0.6],  # step 10  (task 2 training)
    [0.6, 0.1, 0.9],  # step 12  (task 2 training, "now")
]
ENDS = [4, 8]


@pytest.fixture
def curves() -> EvalCurves:
    return as_curves(STEPS, ACC, ENDS)


def test_current_task_index(curves: EvalCurves) -> None:
    # ends strictly before the evaluation step: step 12 -> {4, 8} -> k = 2; step 8 -> {4} -> k = 1
    assert current_task_index(curves) == 2
    assert current_task_index(curves.upto(4)) == 1
    assert current_task_index(curves.upto(2)) == 0
    assert current_task_index(curves.upto(0)) == -1


def test_min_acc_hand_computed(curves: EvalCurves) -> None:
    # task 0, evals after step 4: 0.6, 0.3, 0.7, 0.6 -> min 0.3
    # task 1, evals after step 8: 0.5, 0.1 -> min 0.1
    # min-ACC = (0.3 + 0.1) / 2 = 0.2
    assert min_acc(curves) == pytest.approx(0.2)
    # at step 8 (k = 1): task 0 evals after step 4 up to step 8: 0.6, 0.3 -> 0.3
    assert min_acc(curves.upto(4)) == pytest.approx(0.3)
    # still in task 0: no previous task
    assert math.isnan(min_acc(curves.upto(2)))


def test_wc_acc_hand_computed(curves: EvalCurves) -> None:
    # k = 2 (3rd task): 1/3 * A(E_2, f_12) + 2/3 * min-ACC = 0.9/3 + 2/3 * 0.2 = 0.3 + 0.1333...
    assert wc_acc(curves) == pytest.approx(0.9 / 3 + 2 / 3 * 0.2)
    # step 8, k = 1: 1/2 * 0.8 + 1/2 * 0.3 = 0.55
    assert wc_acc(curves.upto(4)) == pytest.approx(0.55)
    # first task: the current accuracy, 0.9 at step 4
    assert wc_acc(curves.upto(2)) == pytest.approx(0.9)


def test_running_minima_give_min_acc_and_wc_acc_at_every_evaluation(curves: EvalCurves) -> None:
    # the incremental pieces the callback uses agree with the whole-curve functions at every step
    minima: dict[int, float] = {}
    for n in range(curves.num_evals):
        upto = curves.upto(n + 1)
        k = current_task_index(upto)
        update_task_minima(minima, curves.acc[n].tolist(), k)
        worst = min_acc_from_minima(minima, k)
        assert worst == pytest.approx(min_acc(upto), nan_ok=True)
        assert wc_acc_from(float(curves.acc[n, k]), k, worst) == pytest.approx(wc_acc(upto))
    assert minima == pytest.approx({0: 0.3, 1: 0.1})  # task 0: min(0.6, 0.3, 0.7, 0.6); task 1: min(0.5, 0.1)


def test_running_minima_ignore_nan_and_undefined_min_acc() -> None:
    minima = update_task_minima({}, [NAN, 0.5], current_task=2)
    assert math.isnan(minima[0]) and minima[1] == 0.5
    assert update_task_minima(minima, [0.4, NAN], current_task=2) == {0: 0.4, 1: 0.5}  # NaN keeps 0.5
    assert min_acc_from_minima({0: NAN, 1: 0.2}, 2) == pytest.approx(0.2)  # unmeasured task left out
    assert math.isnan(min_acc_from_minima({0: 0.5}, 0))  # first task: no previous task
    assert wc_acc_from(0.8, 0, NAN) == 0.8 and wc_acc_from(0.8, 2, NAN) == 0.8
    assert wc_acc_from(0.9, 1, 0.3) == pytest.approx(0.9 / 2 + 0.3 / 2)


def test_windowed_forgetting_phase_hand_computed(curves: EvalCurves) -> None:
    wf = lambda c, w: windowed_forgetting(c, window=w, scope="phase")  # noqa: E731
    # task 0 from step 4 on: [0.9, 0.6, 0.3, 0.7, 0.6]; task 1 from step 8 on: [0.8, 0.5, 0.1]
    # w = 2 (adjacent pairs): task 0 drops 0.3, 0.3, -0.4, 0.1 -> 0.3; task 1 drops 0.3, 0.4 -> 0.4
    assert wf(curves, 2) == pytest.approx((0.3 + 0.4) / 2)
    # w = 3 adds lag-2 pairs: task 0: 0.9-0.3 = 0.6 -> 0.6; task 1: 0.8-0.1 = 0.7 -> 0.7
    assert wf(curves, 3) == pytest.approx((0.6 + 0.7) / 2)
    # a window longer than the curves sees every ordered pair: same as w = 3 here
    assert wf(curves, 10) == pytest.approx(0.65)
    # at step 8 (k = 1): task 0 from step 4: [0.9, 0.6, 0.3] -> w=2: 0.3
    assert wf(curves.upto(4), 2) == pytest.approx(0.3)
    assert math.isnan(wf(curves.upto(2), 2))


def test_windowed_forgetting_official_hand_computed(curves: EvalCurves) -> None:
    """Default scope "seen": every seen task, the current one included, over all its
    measurements; a task measured once counts as 0."""
    # task 0: [0.5, 0.9, 0.6, 0.3, 0.7, 0.6]; task 1: [0.4, 0.8, 0.5, 0.1]; task 2: [0.6, 0.9]
    # w = 2: task 0 max adjacent drop 0.3; task 1 0.4; task 2 none -> 0; mean over 3 tasks
    assert windowed_forgetting(curves, window=2) == pytest.approx((0.3 + 0.4 + 0.0) / 3)
    # w = 3: task 0: 0.9 - 0.3 = 0.6; task 1: 0.8 - 0.1 = 0.7; task 2: 0
    assert windowed_forgetting(curves, window=3) == pytest.approx((0.6 + 0.7) / 3)
    # step 4 (still task 0): [0.5, 0.9] only rises -> 0, not NaN; step 2: one measurement -> 0
    assert windowed_forgetting(curves.upto(2), window=2) == 0.0
    assert windowed_forgetting(curves.upto(1), window=2) == 0.0
    # the current task's own dip while it is trained counts under "seen", not under "phase"
    dip = as_curves([1, 2, 3], [[0.5], [0.2], [0.8]], [])
    assert windowed_forgetting(dip, window=2) == pytest.approx(0.3)
    assert math.isnan(windowed_forgetting(dip, window=2, scope="phase"))
    # no evaluation at all
    assert math.isnan(windowed_forgetting(curves.upto(0), window=2))


def test_windowed_forgetting_clips_at_zero() -> None:
    # an earlier task that only improves has no forgetting: 0, not negative
    rising = as_curves([1, 2, 3], [[0.5, NAN], [0.6, 0.1], [0.8, 0.2]], [1])
    assert windowed_forgetting(rising, window=2) == 0.0
    assert windowed_forgetting(rising, window=2, scope="phase") == 0.0


def test_windowed_plasticity_hand_computed(curves: EvalCurves) -> None:
    wp = lambda c, w: windowed_plasticity(c, window=w, scope="phase")  # noqa: E731
    # phase: task 0 while trained (step <= 4): [0.5, 0.9] -> +0.4
    # task 1 (4 < step <= 8): [0.4, 0.8] -> +0.4; task 2 (step > 8): [0.6, 0.9] -> +0.3
    assert wp(curves, 2) == pytest.approx((0.4 + 0.4 + 0.3) / 3)
    assert wp(curves.upto(4), 2) == pytest.approx(0.4)
    # one evaluation only: nothing to compare
    assert math.isnan(wp(curves.upto(1), 2))
    # seen (default): whole histories; here the largest adjacent gains are the same
    # (task 0: 0.4, task 1: 0.4, task 2: 0.3)
    assert windowed_plasticity(curves, window=2) == pytest.approx((0.4 + 0.4 + 0.3) / 3)
    assert windowed_plasticity(curves.upto(1), window=2) == 0.0
    # a task that keeps improving after it ended: counted under "seen" only
    late = as_curves([1, 2, 3], [[0.5, NAN], [0.6, 0.1], [0.9, 0.2]], [1])
    assert windowed_plasticity(late, window=2) == pytest.approx((0.3 + 0.1) / 2)
    assert windowed_plasticity(late, window=2, scope="phase") == pytest.approx(0.1)


def test_stability_metrics_bundle(curves: EvalCurves) -> None:
    out = stability_metrics(curves, window=2, scope="phase")
    assert out == pytest.approx({"min_acc": 0.2, "wc_acc": 0.3 + 0.4 / 3, "wf": 0.35, "wp": 1.1 / 3})
    out = stability_metrics(curves, window=2)
    assert out == pytest.approx({"min_acc": 0.2, "wc_acc": 0.3 + 0.4 / 3, "wf": 0.7 / 3, "wp": 1.1 / 3})


def test_metric_input_errors(curves: EvalCurves) -> None:
    with pytest.raises(ValueError, match="window"):
        windowed_forgetting(curves, window=1)
    with pytest.raises(ValueError, match="scope"):
        windowed_plasticity(curves, window=2, scope="previous")
    with pytest.raises(ValueError, match="strictly increasing"):
        as_curves([2, 2], [[0.1], [0.2]], [])
    with pytest.raises(ValueError, match="rows"):
        as_curves([1, 2, 3], [[0.1], [0.2]], [])
    with pytest.raises(TypeError, match="as_curves"):
        min_acc((STEPS, ACC, ENDS))  # type: ignore[arg-type]


# ====================================================================== fixtures for the callback
NUM_FEATURES = 8


def _blobs(task: int, n: int, salt: int) -> TensorDataset:
    """Two Gaussian blobs per task (classes 2t, 2t+1), linearly separable, fixed by (task, salt)."""
    g = torch.Generator().manual_seed(1000 * task + salt)
    centres = torch.randn(2, NUM_FEATURES, generator=torch.Generator().manual_seed(77 + task)) * 3
    labels = torch.arange(n) % 2
    x = centres[labels] + 0.8 * torch.randn(n, NUM_FEATURES, generator=g)
    return TensorDataset(x, labels + 2 * task)


class Blobs(ContinualDataModule):
    """Synthetic class-incremental stream: ``num_tasks`` tasks of two classes."""

    def __init__(self, num_tasks: int = 3, epochs_per_task: int = 1, train_size: int = 56, val_size: int = 40, **kw: Any) -> None:
        super().__init__(num_tasks=num_tasks, epochs_per_task=epochs_per_task, batch_size=8, **kw)
        self.train_size = train_size
        self.val_size = val_size

    def train_dataset(self, task: int) -> Dataset:
        return _blobs(task, self.train_size, salt=1)

    def val_dataset(self, task: int) -> Dataset:
        return _blobs(task, self.val_size, salt=2)


class Net(pl.LightningModule):
    """An MLP with BatchNorm and dropout (to prove eval mode and RNG restoration)."""

    def __init__(self, num_classes: int = 6, dropout: float = 0.3, lr: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(NUM_FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, num_classes)
        )
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = (batch["image"], batch["label"]) if isinstance(batch, dict) else batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        self.records.append((int(step or 0), dict(metrics)))


def _trainer(tmp_path: Path, max_epochs: int, callbacks: list[Callback], **kw: Any) -> pl.Trainer:
    # The shared harness; these tests are about the callback's own evaluation, so Lightning's
    # validation loop is switched off.
    kw.setdefault("num_sanity_val_steps", 0)
    kw.setdefault("limit_val_batches", 0)
    kw.setdefault("deterministic", False)
    return quiet_trainer(tmp_path, callbacks, max_epochs=max_epochs, **kw)


def _fit(tmp_path: Path, callbacks: list[Callback], dropout: float = 0.3, epochs_per_task: int = 1, **kw: Any) -> Net:
    pl.seed_everything(3, verbose=False)
    model = Net(dropout=dropout)
    dm = Blobs(epochs_per_task=epochs_per_task)
    _trainer(tmp_path, dm.max_epochs, callbacks, **kw).fit(model, datamodule=dm)
    return model


# ====================================================================== callback tests
def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match="every_n_steps"):
        ContinualEvaluation(every_n_steps=0)
    with pytest.raises(ValueError, match="samples_per_task"):
        ContinualEvaluation(samples_per_task=-3)
    with pytest.raises(ValueError, match="batch_size"):
        ContinualEvaluation(batch_size=0)
    with pytest.raises(ValueError, match="window"):
        ContinualEvaluation(window=1)
    with pytest.raises(ValueError, match="scope"):
        ContinualEvaluation(window_scope="all")
    with pytest.raises(ValueError, match="max_eval_fraction"):
        ContinualEvaluation(max_eval_fraction=1.5)
    with pytest.raises(ValueError, match="seed"):
        ContinualEvaluation(seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="input_key"):
        ContinualEvaluation(input_key=0)  # type: ignore[arg-type]
    cb = ContinualEvaluation(every_n_steps=2, samples_per_task=None)
    assert pickle.loads(pickle.dumps(cb)).every_n_steps == 2
    assert ContinualEvaluation(seed=1).state_key != ContinualEvaluation(seed=2).state_key


def test_training_unchanged_by_evaluation(tmp_path: Path) -> None:
    plain = _fit(tmp_path / "a", [])
    cb = ContinualEvaluation(every_n_steps=1, samples_per_task=16, batch_size=5, save_csv=False, save_plot=False)
    evaluated = _fit(tmp_path / "b", [cb])
    assert len(cb.curves.steps) == 21  # 3 tasks x 7 batches, one evaluation per step
    for (name, a), (_, b) in zip(plain.state_dict().items(), evaluated.state_dict().items()):
        assert torch.equal(a, b), name  # weights *and* BatchNorm running statistics
    assert evaluated.training  # train mode restored (submodule flags too)
    assert all(m.training for m in evaluated.modules())


def test_subsample_determinism() -> None:
    a, b, c = ContinualEvaluation(seed=0), ContinualEvaluation(seed=0), ContinualEvaluation(seed=1)
    assert a._subsample_indices(1000, 0) == b._subsample_indices(1000, 0)
    assert a._subsample_indices(1000, 0) != c._subsample_indices(1000, 0)
    assert a._subsample_indices(1000, 0) != a._subsample_indices(1000, 1)  # each task its own draw
    assert len(a._subsample_indices(1000, 0)) == 256
    assert a._subsample_indices(10, 0) == list(range(10))  # smaller set: all of it
    before = torch.random.get_rng_state()
    a._subsample_indices(1000, 3)
    assert torch.equal(before, torch.random.get_rng_state())  # own generator, global RNG untouched


def test_curves_recorded_at_the_right_steps(tmp_path: Path) -> None:
    logger = MemoryLogger()
    cb = ContinualEvaluation(every_n_steps=3, samples_per_task=20, save_csv=False, save_plot=False)
    _fit(tmp_path, [cb], logger=logger)
    curves = cb.curves
    # 56 samples / batch 8 = 7 steps per task; tasks end at 7, 14, 21.
    # multiples of 3 plus the task ends (21 is both)
    assert curves.steps.tolist() == [3, 6, 7, 9, 12, 14, 15, 18, 21]
    assert curves.task_end_steps.tolist() == [7, 14, 21]
    seen = (~torch.isnan(curves.acc)).sum(1).tolist()
    assert seen == [1, 1, 1, 2, 2, 2, 3, 3, 3]  # only seen tasks are evaluated
    assert cb._indices[0] == ContinualEvaluation(seed=0, samples_per_task=20)._subsample_indices(40, 0)
    # logged values match the pure functions on the curves up to each evaluation
    logged = [(step, m) for step, m in logger.records if "eval/interval" in m]
    assert [step for step, _ in logged] == curves.steps.tolist()
    for n, (step, metrics) in enumerate(logged):
        upto = curves.upto(n + 1)
        for task in range(seen[n]):
            assert metrics[f"eval/acc/task_{task}"] == pytest.approx(float(curves.acc[n, task]))
        assert metrics["eval/wc_acc"] == pytest.approx(wc_acc(upto))
        if math.isnan(min_acc(upto)):
            assert "eval/min_acc" not in metrics
        else:
            assert metrics["eval/min_acc"] == pytest.approx(min_acc(upto))
    assert cb.min_acc == pytest.approx(min_acc(curves))
    assert 0.0 <= cb.wf <= 1.0 and 0.0 <= cb.wp <= 1.0
    assert cb.final_accuracies[2] > 0.4  # learned the last task (chance is 1/6)


def test_state_dict_round_trip(tmp_path: Path) -> None:
    cb = ContinualEvaluation(every_n_steps=4, samples_per_task=12, save_csv=False, save_plot=False)
    _fit(tmp_path, [cb])
    state = cb.state_dict()
    assert state["version"] == 1 and state["method"]["data"] == {}  # datamodule mode keeps only indices
    restored = ContinualEvaluation(every_n_steps=4, samples_per_task=12)
    restored.load_state_dict(copy.deepcopy(pickle.loads(pickle.dumps(state))))
    assert torch.equal(restored.curves.steps, cb.curves.steps)
    assert torch.allclose(restored.curves.acc, cb.curves.acc, equal_nan=True)
    assert restored.curves.task_end_steps.tolist() == cb.curves.task_end_steps.tolist()
    assert restored._running_min == cb._running_min
    assert restored._indices == cb._indices
    assert (restored.min_acc, restored.wc_acc) == (cb.min_acc, cb.wc_acc)


class _CrashAt(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


def test_crash_and_resume_mid_task(tmp_path: Path) -> None:
    def make_cb() -> ContinualEvaluation:
        return ContinualEvaluation(every_n_steps=3, samples_per_task=16, save_csv=False, save_plot=False)

    # uninterrupted: 3 tasks x 2 epochs x 7 steps
    full_cb = make_cb()
    full = _fit(tmp_path / "full", [full_cb], dropout=0.0, epochs_per_task=2)

    # crash at the start of epoch 3 (the middle of task 1), after a checkpoint at the end of epoch 2
    ckpt_dir = tmp_path / "ckpt"
    ckpt = ModelCheckpoint(dirpath=ckpt_dir, every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(tmp_path / "crash", [make_cb(), ckpt, _CrashAt(3)], dropout=0.0, epochs_per_task=2, enable_checkpointing=True)
    paths = sorted(ckpt_dir.glob("epoch=2*.ckpt"))
    assert paths, sorted(ckpt_dir.iterdir())

    resumed_cb = make_cb()
    pl.seed_everything(3, verbose=False)
    model = Net(dropout=0.0)
    dm = Blobs(epochs_per_task=2)
    _trainer(tmp_path / "resume", dm.max_epochs, [resumed_cb]).fit(model, datamodule=dm, ckpt_path=str(paths[0]))

    assert resumed_cb.curves.steps.tolist() == full_cb.curves.steps.tolist()
    assert resumed_cb.curves.task_end_steps.tolist() == full_cb.curves.task_end_steps.tolist() == [14, 28, 42]
    assert torch.allclose(resumed_cb.curves.acc, full_cb.curves.acc, equal_nan=True)
    for a, b in zip(full.parameters(), model.parameters()):
        assert torch.allclose(a, b)


def test_interval_widening_with_fake_clock(tmp_path: Path) -> None:
    clock = SimpleNamespace(now=0.0)

    class TrainTakesOneSecond(Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            clock.now += 1.0

    cb = ContinualEvaluation(every_n_steps=1, samples_per_task=8, max_eval_fraction=0.3, eval_at_task_end=False,
                             save_csv=False, save_plot=False)
    cb._clock = lambda: clock.now
    count = cb._count_correct

    def slow_count(*args: Any) -> torch.Tensor:
        clock.now += 1.0  # every evaluation takes one (fake) second
        return count(*args)

    cb._count_correct = slow_count  # type: ignore[method-assign]
    logger = MemoryLogger()
    _fit(tmp_path, [TrainTakesOneSecond(), cb], logger=logger)
    # step 1: eval 1 / (1 + 1) = 0.5 > 0.3 -> every 2; step 2: 1 / (1 + 1) -> every 4;
    # step 4: 1 / (1 + 2) = 0.33 -> every 8; step 8: 1 / (1 + 4) = 0.2 -> stays; then 16
    assert cb.curves.steps.tolist() == [1, 2, 4, 8, 16]
    assert cb.interval == 8
    assert [m["eval/interval"] for _, m in logger.records] == [1.0, 2.0, 4.0, 8.0, 8.0]


def test_interval_decision_comes_from_rank_zero() -> None:
    cb = ContinualEvaluation(max_eval_fraction=0.3)
    calls: list[Any] = []

    def broadcast(obj: Any, src: int = 0) -> Any:
        calls.append((obj, src))
        return True  # rank 0 decided to widen, whatever this rank measured

    trainer = SimpleNamespace(strategy=SimpleNamespace(broadcast=broadcast))
    cb._window_train_time = 10.0
    cb._steer_interval(trainer, eval_time=0.1)  # locally 1% < 30%
    assert calls == [(False, 0)] and cb.interval == 20
    cb2 = ContinualEvaluation(max_eval_fraction=0.3)
    cb2._window_train_time = 1.0
    cb2._steer_interval(SimpleNamespace(strategy=SimpleNamespace(broadcast=lambda o, src=0: o)), eval_time=0.2)
    assert cb2.interval == 10  # 0.2 / 1.2 = 17% <= 30%


def test_csv_and_png_written(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cb = ContinualEvaluation(every_n_steps=2, samples_per_task=16, log_dir=str(out))
    _fit(tmp_path, [cb])
    rows = list(csv.DictReader(open(out / "continual_eval.csv")))
    assert list(rows[0].keys()) == ["step", "train_task", "task", "acc"]
    assert len(rows) == int((~torch.isnan(cb.curves.acc)).sum())
    first = rows[0]
    assert (first["step"], first["train_task"], first["task"]) == ("2", "0", "0")
    png = (out / "stability_gap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_stability_gap_figure_reaches_the_loggers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.helpers.loggers import ImageLogger, RecordingTensorBoard

    image, board = ImageLogger(), RecordingTensorBoard(str(tmp_path / "tb"))
    cb = ContinualEvaluation(every_n_steps=2, samples_per_task=16, save_csv=False)
    _fit(tmp_path, [cb], logger=[image, board])
    last_step = int(cb.curves.steps[-1])
    [(tag, figure, step)] = board.writer.calls
    assert (tag, step) == ("eval/stability_gap", last_step)
    assert figure.axes[0].get_title().startswith("Continual evaluation every 2 steps")
    assert [(key, step) for key, _, step in image.images] == [("eval/stability_gap", last_step)]
    # the PNG is written as well, into the results folder (no logger directory: default_root_dir)
    assert (tmp_path / "stability_gap.png").exists() and not (tmp_path / "continual_eval.csv").exists()
    assert f"ContinualEvaluation: results written to {tmp_path.resolve()}: stability_gap.png" in capsys.readouterr().out


# ---------------------------------------------------------------------- one fit per task
class _DictDataset(Dataset):
    def __init__(self, base: TensorDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x, y = self.base[i]
        return {"image": x, "label": y}


class ValidatedNet(Net):
    """``Net`` with a ``validation_step``, so Lightning sets up the fit's validation loaders."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = (batch["image"], batch["label"]) if isinstance(batch, dict) else batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))


def _val_on(tmp_path: Path, callbacks: list[Callback]) -> pl.Trainer:
    """One epoch with Lightning's validation defaults (sanity check on, all validation batches)."""
    return _trainer(tmp_path, 1, callbacks, num_sanity_val_steps=2, limit_val_batches=1.0)


def test_one_fit_per_task_keeps_earlier_subsamples(tmp_path: Path) -> None:
    cb = ContinualEvaluation(every_n_steps=3, samples_per_task=10, input_key="image", target_key="label",
                             save_csv=False, save_plot=False)
    pl.seed_everything(0, verbose=False)
    model = ValidatedNet()
    for task in range(2):
        train = DataLoader(_DictDataset(_blobs(task, 24, salt=1)), batch_size=8, shuffle=True)
        val = DataLoader(_DictDataset(_blobs(task, 30, salt=2)), batch_size=8)
        _val_on(tmp_path, [cb]).fit(model, train_dataloaders=train, val_dataloaders=val)
        if task == 0:
            state = cb.state_dict()
    # 3 steps per fit; each fit has a new Trainer (global_step restarts at 0), the curves go on
    curves = cb.curves
    assert curves.num_tasks == 2
    assert curves.steps.tolist() == [3, 6] and curves.task_end_steps.tolist() == [3, 6]
    # task 0 (kept from the first fit) is evaluated in the second fit
    assert not math.isnan(float(curves.acc[-1, 0])) and not math.isnan(float(curves.acc[-1, 1]))
    assert set(state["method"]["data"]) == {0} and state["method"]["data"][0]["image"].shape == (10, NUM_FEATURES)
    fresh = ContinualEvaluation(every_n_steps=3, samples_per_task=10, input_key="image", target_key="label")
    fresh.load_state_dict(state)
    assert fresh.task == 0 and torch.equal(fresh._data[0]["label"], cb._data[0]["label"])


def test_one_fit_per_task_reads_the_datamodules_val_dataloader(tmp_path: Path) -> None:
    # no validation_step and no sanity check: trainer.val_dataloaders stays None, the datamodule's
    # val_dataloader() is the public fallback
    cb = ContinualEvaluation(every_n_steps=3, samples_per_task=10, save_csv=False, save_plot=False)
    pl.seed_everything(0, verbose=False)
    dm = pl.LightningDataModule.from_datasets(_blobs(0, 24, salt=1), _blobs(0, 30, salt=2), batch_size=8)
    _trainer(tmp_path, 1, [cb]).fit(Net(), datamodule=dm)
    assert cb.curves.steps.tolist() == [3] and len(cb._indices[0]) == 10
    assert torch.equal(cb._data[0][1], _blobs(0, 30, salt=2).tensors[1][cb._indices[0]])


def test_one_fit_per_task_without_reachable_val_data_says_how_to_fix(tmp_path: Path) -> None:
    # loaders given to fit() but validation never set up (no validation_step, no sanity check):
    # Lightning offers no public way to reach them, so the callback says what to do
    cb = ContinualEvaluation(every_n_steps=3, samples_per_task=10, save_csv=False, save_plot=False)
    train = DataLoader(_blobs(0, 24, salt=1), batch_size=8)
    val = DataLoader(_blobs(0, 30, salt=2), batch_size=8)
    with pytest.raises(RuntimeError, match=r"val_dataloaders.*not set up.*num_sanity_val_steps"):
        _trainer(tmp_path, 1, [cb]).fit(Net(), train_dataloaders=train, val_dataloaders=val)


def test_no_private_lightning_attributes_read() -> None:
    source = (REPO / "lightning_forget" / "callbacks" / "continual_eval.py").read_text()
    assert "._data_source" not in source and "val_loop._" not in source


# ---------------------------------------------------------------------- 2-process DDP
class _DumpPerRank(Callback):
    """Saves each rank's curves and an unsharded, uncollected re-evaluation of the final weights."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        cb = next(c for c in trainer.callbacks if isinstance(c, ContinualEvaluation))
        dm = trainer.datamodule
        was_training = pl_module.training
        pl_module.eval()
        reference = []
        with torch.no_grad():
            for task in range(dm.num_tasks):
                x, y = dm.val_dataset(task)[cb._indices[task]]
                reference.append((pl_module(x).argmax(-1) == y).double().mean().item())
        pl_module.train(was_training)
        torch.save(
            {"state": cb.state_dict(), "reference": reference, "params": {k: v.detach().clone() for k, v in pl_module.state_dict().items()}},
            os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"),
        )


@pytest.mark.ddp
def test_ddp_two_processes_curves_identical_and_counts_summed(tmp_path: Path) -> None:
    # 25 samples per task: shards of 13 and 12, so averaging per-rank accuracies would be wrong
    cb = ContinualEvaluation(every_n_steps=2, samples_per_task=25, save_csv=False, save_plot=False)
    pl.seed_everything(3, verbose=False)
    model = Net()
    dm = Blobs(train_size=64)
    trainer = _trainer(tmp_path, dm.max_epochs, [cb, _DumpPerRank(str(tmp_path))], devices=2, strategy="ddp_spawn")
    trainer.fit(model, datamodule=dm)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    a, b = ranks[0]["state"]["method"], ranks[1]["state"]["method"]
    # 64 samples / 2 ranks / batch 8 = 4 steps per task: ends at 4, 8, 12
    assert a["steps"] == b["steps"] == [2, 4, 6, 8, 10, 12]
    assert a["task_end_steps"] == b["task_end_steps"] == [4, 8, 12]
    assert torch.equal(torch.tensor(a["acc"]).nan_to_num(-1), torch.tensor(b["acc"]).nan_to_num(-1))
    names = {name for name, _ in model.named_parameters()}
    for key in names:  # parameters are equal; BatchNorm buffers may differ between DDP ranks
        assert torch.equal(ranks[0]["params"][key], ranks[1]["params"][key]), key
    # the last evaluation (end of the last task) used the final weights (and rank 0's BatchNorm
    # statistics): the summed counts equal a one-process evaluation of the whole subsample with
    # rank 0's model, exactly (k/25 with the same k)
    assert a["acc"][-1] == pytest.approx(ranks[0]["reference"], abs=0)
    assert all(abs(v * 25 - round(v * 25)) < 1e-9 for v in a["acc"][-1])


# ---------------------------------------------------------------------- the benchmark cannot rot
def test_benchmark_quick_runs(tmp_path: Path) -> None:
    pytest.importorskip("mlxtend")
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "stability_gap.py"), "--quick", "--out-dir", str(out)],
        capture_output=True, text=True, timeout=300, cwd=str(REPO),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "min-ACC" in proc.stdout and "WC-ACC" in proc.stdout
    for run in ("finetune", "er"):
        assert (out / run / "stability_gap.png").exists() and (out / run / "continual_eval.csv").exists()
    assert (out / "results.json").exists()


def test_predict_can_be_overridden(tmp_path: Path) -> None:
    class AlwaysFive(ContinualEvaluation):
        def predict(self, pl_module: pl.LightningModule, x: torch.Tensor) -> torch.Tensor:
            return torch.full((x.shape[0],), 5, dtype=torch.long, device=x.device)

    cb = AlwaysFive(every_n_steps=7, samples_per_task=20, save_csv=False, save_plot=False)
    _fit(tmp_path, [cb])
    acc = cb.curves.acc
    # class 5 belongs to task 2 only: tasks 0 and 1 always 0; task 2 = share of label 5 in its subsample
    assert acc[:, 0].tolist() == [0.0, 0.0, 0.0] and acc[1:, 1].tolist() == [0.0, 0.0]
    labels = Blobs().val_dataset(2)[cb._indices[2]][1]
    assert float(acc[-1, 2]) == pytest.approx(float((labels == 5).double().mean()))


def test_windowed_plasticity_official_variant_differs_where_hand_computed() -> None:
    # one task measured [0.5, 0.2, 0.8], w = 3: the largest gain within the window is 0.8 - 0.2 = 0.6;
    # official=True skips the start 0.2 (below the running maximum 0.5) and finds 0.8 - 0.5 = 0.3
    curves = as_curves([1, 2, 3], [[0.5], [0.2], [0.8]], [])
    assert windowed_plasticity(curves, window=3) == pytest.approx(0.6)
    assert windowed_plasticity(curves, window=3, official=True) == pytest.approx(0.3)
    # w = 2: windows [0.2, 0.8] are seen in full by both -> 0.6
    assert windowed_plasticity(curves, window=2, official=True) == pytest.approx(0.6)
    # rising curves: both agree
    rising = as_curves([1, 2, 3], [[0.1], [0.4], [0.9]], [])
    assert windowed_plasticity(rising, window=3, official=True) == windowed_plasticity(rising, window=3) == pytest.approx(0.8)


def test_unwritable_log_dir_fails_in_setup(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    cb = ContinualEvaluation(every_n_steps=2, samples_per_task=8, log_dir=str(blocker / "out"))
    steps: list[int] = []

    class Count(Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            steps.append(trainer.global_step)

    with pytest.raises(RuntimeError, match="log_dir"):
        _fit(tmp_path, [cb, Count()])
    assert steps == []  # refused before the first training step
