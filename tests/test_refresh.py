"""Refresh learning: the unlearn step against hand-computed updates, and the callback in runs."""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_forget.callbacks import DarkExperienceReplay, ExperienceReplay, RefreshLearning
from lightning_forget.callbacks.refresh import unlearn_step
from lightning_forget.fisher import fisher_diagonal
from tests.helpers.data import BlobStream
from tests.helpers.harness import flat_tensors, params_vector, quiet_trainer, run_stream, tiny_classifier


# ---------------------------------------------------------------------- the step on paper
def _linear() -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -1.0, 0.25], [0.0, 2.0, -0.5]]))
        model.bias.copy_(torch.tensor([0.1, -0.2]))
    x = torch.tensor([[1.0, 0.0, 2.0], [-1.0, 1.0, 0.5]])
    y = torch.tensor([1, 0])
    return model, x, y


def _ce_grads(model: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d CE / d(W, b) for a linear softmax classifier: (softmax - onehot)ᵀ x / B."""
    with torch.no_grad():
        p = torch.softmax(x @ model.weight.T + model.bias, dim=1)
        r = (p - nn.functional.one_hot(y, 2).float()) / x.shape[0]
        return r.T @ x, r.sum(0)


@pytest.mark.parametrize("with_fisher", [False, True])
@pytest.mark.parametrize("noise_std", [0.0, 0.3])
def test_unlearn_step_matches_hand_computed_update(with_fisher: bool, noise_std: float) -> None:
    model, x, y = _linear()
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    gw, gb = _ce_grads(model, x, y)
    delta, c = 0.1, 0.5
    fisher = {"weight": torch.arange(6.0).reshape(2, 3), "bias": torch.tensor([4.0, 0.0])} if with_fisher else None
    moved = unlearn_step(model, (x, y), fisher, delta=delta, damping=c, noise_std=noise_std,
                         generator=torch.Generator().manual_seed(7))
    noise = torch.Generator().manual_seed(7)
    ew, eb = torch.randn(2, 3, generator=noise), torch.randn(2, generator=noise)  # drawn in named order
    uw = w0.norm() * gw / gw.norm() + noise_std * ew
    ub = b0.norm() * gb / gb.norm() + noise_std * eb
    if with_fisher:
        uw, ub = uw / (1 + c * fisher["weight"]), ub / (1 + c * fisher["bias"])
    assert torch.allclose(model.weight, w0 + delta * uw, atol=1e-6)
    assert torch.allclose(model.bias, b0 + delta * ub, atol=1e-6)
    assert torch.allclose(moved["weight"], delta * uw, atol=1e-6)
    # ascent: the loss went up
    if noise_std == 0.0 and not with_fisher:
        before = nn.functional.cross_entropy(x @ w0.T + b0, y)
        assert nn.functional.cross_entropy(model(x), y) > before


def test_unlearn_step_zero_gradient_frozen_and_missing_fisher() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    unused = nn.Parameter(torch.ones(4))
    model.register_parameter("unused", unused)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    moved = unlearn_step(model, (x, y), None, delta=0.1, noise_std=0.0)
    assert torch.equal(model[0].weight, frozen) and "0.weight" not in moved
    assert torch.equal(unused, torch.ones(4))  # g = 0 gives u = 0, not NaN
    with pytest.raises(KeyError, match="fisher"):
        unlearn_step(model, (x, y), {"1.weight": torch.zeros(2, 2)})
    with pytest.raises(TypeError, match="loss_fn"):
        unlearn_step(model, {"image": x}, None)
    with pytest.raises(ValueError, match="delta"):
        unlearn_step(model, (x, y), None, delta=-1.0)


def test_unlearn_step_keeps_batchnorm_statistics_and_grad() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    model.train()
    model(torch.randn(8, 3))  # non-trivial statistics
    stats = {name: b.clone() for name, b in model.named_buffers()}
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = params_vector(model)
    unlearn_step(model, (torch.randn(6, 3) * 3, torch.tensor([0, 1, 0, 1, 1, 0])), None, delta=1e-2)
    for name, value in model.named_buffers():
        assert torch.equal(value, stats[name]), name
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert not torch.equal(before, params_vector(model))


def test_unlearn_step_averages_gradients_through_the_strategy() -> None:
    class HalvingStrategy:  # a 2-rank mean where the other rank's gradient is 0
        world_size = 2

        def reduce(self, value: torch.Tensor, reduce_op: str = "mean") -> torch.Tensor:
            assert reduce_op == "mean"
            return value * 0.5

    model, x, y = _linear()
    w0 = model.weight.detach().clone()
    moved = unlearn_step(model, (x, y), {"weight": torch.ones(2, 3), "bias": torch.ones(2)}, delta=0.1,
                         noise_std=0.0, strategy=HalvingStrategy())
    gw, _ = _ce_grads(_linear()[0], x, y)
    # the rescaling to ‖θ‖ cancels the factor of the mean: direction only
    assert torch.allclose(moved["weight"], 0.1 * w0.norm() * gw / gw.norm() / (1 + 1e-3), atol=1e-6)


# ---------------------------------------------------------------------- the callback
class Spy(RefreshLearning):
    """Records the rows the unlearn step saw."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rows: list[int] = []

    def unlearn_batch(self, batch: Any) -> Any:
        out = super().unlearn_batch(batch)
        self.rows.append(int(out[0].shape[0]))
        return out


class RowsSeen(pl.Callback):
    def __init__(self) -> None:
        self.rows: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        from lightning_forget.losses import step_context

        context = step_context(pl_module)
        self.rows.append(int(context.replay_rows().numel()))


@pytest.mark.parametrize("replay", ["er", "derpp"])
@pytest.mark.parametrize("refresh_first", [True, False])
def test_unlearn_sees_stream_rows_only_under_replay(tmp_path: Path, replay: str, refresh_first: bool) -> None:
    pl.seed_everything(0)
    dm = BlobStream(num_tasks=2, epochs_per_task=1)
    model = tiny_classifier(dm)
    spy = Spy(delta=1e-3, fisher_samples=16)
    base = ExperienceReplay(buffer_size=16, replay_batch_size=5) if replay == "er" else DarkExperienceReplay(buffer_size=16, replay_batch_size=5)
    seen = RowsSeen()
    callbacks = [spy, base, seen] if refresh_first else [base, spy, seen]
    quiet_trainer(tmp_path, callbacks, max_epochs=dm.max_epochs).fit(model, dm)
    assert spy.rows and set(spy.rows) == {8}  # the loader's batch size
    if replay == "er":
        assert max(seen.rows) == 5  # the step itself saw replayed rows
    assert spy.fisher_estimates == 2 and set(spy.fisher) == {n for n, _ in model.named_parameters()}


def test_unlearn_changes_training_and_fisher_is_estimated_at_task_end(tmp_path: Path) -> None:
    plain, _ = run_stream(tmp_path / "a", lambda: RefreshLearning(delta=0.0), epochs_per_task=1)
    refreshed, cb = run_stream(tmp_path / "b", lambda: RefreshLearning(delta=1e-2), epochs_per_task=1)
    assert not torch.allclose(params_vector(plain), params_vector(refreshed))
    assert cb.fisher_estimates == 3
    assert all(v.abs().sum() > 0 for v in cb.fisher.values())


def test_fisher_update_rule_and_estimate(tmp_path: Path) -> None:
    cb = RefreshLearning(tau=0.5)
    cb.update_fisher({"w": torch.tensor([2.0])})
    assert torch.equal(cb.fisher["w"], torch.tensor([2.0]))
    cb.update_fisher({"w": torch.tensor([1.0])})
    assert torch.equal(cb.fisher["w"], torch.tensor([2.0]))  # 0.5·2 + 1

    # the estimate at a task end equals fisher_diagonal on the same subset
    class Capture(RefreshLearning):
        def on_task_end(self, trainer, pl_module, task):  # type: ignore[no-untyped-def]
            dataset, _ = self.fisher_dataset(trainer, task)
            order = torch.randperm(len(dataset), generator=__import__("lightning_forget.distributed", fromlist=["x"]).rank_generator(self.seed, 0xF15E, task))[: self.fisher_samples]
            xs = torch.stack([dataset[i][0] for i in order.tolist()])
            ys = torch.stack([dataset[i][1] for i in order.tolist()])
            self.expected = fisher_diagonal(pl_module, [(xs, ys)], progress=False)
            super().on_task_end(trainer, pl_module, task)

    pl.seed_everything(0)
    dm = BlobStream(num_tasks=1)
    cap = Capture(fisher_samples=20, fisher_batch_size=7)
    quiet_trainer(tmp_path, [cap], max_epochs=1).fit(tiny_classifier(dm), dm)
    for name, value in cap.expected.items():
        assert torch.allclose(cap.fisher[name], value, atol=1e-7), name


def test_one_fit_per_task_with_dict_batches(tmp_path: Path) -> None:
    class DictModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            return nn.functional.cross_entropy(self(batch["image"]), batch["label"])

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Dicts(torch.utils.data.Dataset):
        def __init__(self, seed: int) -> None:
            g = torch.Generator().manual_seed(seed)
            self.x, self.y = torch.randn(20, 4, generator=g), torch.randint(0, 3, (20,), generator=g)

        def __len__(self) -> int:
            return 20

        def __getitem__(self, i: int) -> dict:
            return {"image": self.x[i], "label": self.y[i]}

    pl.seed_everything(0)
    model = DictModule()
    cb = RefreshLearning(delta=1e-3, fisher_samples=12)
    for task in range(2):
        trainer = quiet_trainer(tmp_path, [cb], max_epochs=1)
        trainer.fit(model, DataLoader(Dicts(task), batch_size=5))
        assert cb.fisher_estimates == task + 1
    assert set(cb.fisher) == {n for n, _ in model.named_parameters()}

    bad = RefreshLearning(input_key="pixels")
    with pytest.raises(KeyError, match="loss_fn"):
        quiet_trainer(tmp_path, [bad], max_epochs=1).fit(DictModule(), DataLoader(Dicts(0), batch_size=5))


def test_loss_fn_for_other_batches(tmp_path: Path) -> None:
    Pair = namedtuple("Pair", ["features", "cls"])
    calls: list[int] = []

    def loss_fn(module: Any, batch: Any) -> torch.Tensor:
        calls.append(1)
        return nn.functional.cross_entropy(module(batch.features), batch.cls)

    pl.seed_everything(0)
    dm = BlobStream(num_tasks=1)
    model = tiny_classifier(dm)
    cb = RefreshLearning(delta=1e-3, loss_fn=loss_fn, fisher_samples=0)
    loader = DataLoader(TensorDataset(*dm._data["train"]), batch_size=8, collate_fn=lambda rows: Pair(
        torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])))
    model.split_batch = lambda b: (b.features, b.cls)  # type: ignore[method-assign]
    quiet_trainer(tmp_path, [cb], max_steps=3, limit_val_batches=0).fit(model, loader)
    assert len(calls) == 3 and cb.fisher == {}


def test_every_n_steps_counts_updates(tmp_path: Path) -> None:
    pl.seed_everything(0)
    dm = BlobStream(num_tasks=1)
    spy = Spy(delta=1e-3, every_n_steps=2)
    quiet_trainer(tmp_path, [spy], max_epochs=1, accumulate_grad_batches=2).fit(tiny_classifier(dm), dm)
    # 6 batches = 3 updates; updates 0 and 2 (their 2 batches each) unlearn
    assert len(spy.rows) == 4 and spy.optimizer_steps == 3


def _resume_mid_epoch(tmp_path: Path, make: Any, save_step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    def data() -> BlobStream:
        return BlobStream(num_tasks=2, epochs_per_task=2)

    pl.seed_everything(0)
    dm = data()
    model, cb = tiny_classifier(dm), make()
    quiet_trainer(tmp_path / "full", [cb], max_epochs=dm.max_epochs).fit(model, dm)
    pl.seed_everything(0)
    dm1 = data()
    saver = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=save_step, save_top_k=-1, filename="{step}")
    trainer = quiet_trainer(tmp_path / "a", [make(), saver], max_steps=save_step, enable_checkpointing=True)
    trainer.fit(tiny_classifier(dm1), dm1)
    pl.seed_everything(5)
    dm2 = data()
    model2, cb2 = tiny_classifier(dm2), make()
    quiet_trainer(tmp_path / "b", [cb2], max_epochs=dm2.max_epochs).fit(
        model2, dm2, ckpt_path=str(tmp_path / "ck" / f"step={save_step}.ckpt"))
    return params_vector(model), params_vector(model2), flat_tensors(cb.state_dict()), flat_tensors(cb2.state_dict())


@pytest.mark.parametrize("save_step", [9, 12])  # 6 batches per epoch: 9 is mid-epoch (task 0 epoch 1), 12 in task 1
def test_resume_mid_epoch_equals_uninterrupted(tmp_path: Path, save_step: int) -> None:
    a, b, sa, sb = _resume_mid_epoch(tmp_path, lambda: RefreshLearning(delta=1e-2, noise_std=0.1, fisher_samples=24), save_step)
    assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(sa, sb, atol=1e-6)
    assert sa.numel() > 10  # the Fisher is part of the state


def test_bf16_mixed_precision_unlearns_with_fp32_norms(tmp_path: Path) -> None:
    pl.seed_everything(0)
    dm = BlobStream(num_tasks=1)
    model = tiny_classifier(dm)
    spy = Spy(delta=1e-2, fisher_samples=16)
    quiet_trainer(tmp_path, [spy], max_epochs=1, precision="bf16-mixed").fit(model, dm)
    assert len(spy.rows) == 6
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(v).all() and v.dtype == torch.float32 for v in spy.fisher.values())


# ---------------------------------------------------------------------- issue 24: defects 10-14
class StreamsModule(pl.LightningModule):
    """A user's module trained on a two-stream batch (``{"stream": (x, y), "other": (x, y)}``)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x, y = batch["stream"]
        return nn.functional.cross_entropy(self(x), y) + 0.0 * self(batch["other"][0]).sum()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class StepRecorder(RefreshLearning):
    """Records the parameters' change made by each unlearn step (before the optimizer's)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.moves: list[tuple[int, int, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        before = params_vector(pl_module)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.moves.append((self.current_task(trainer), trainer.global_step, params_vector(pl_module) - before))


def _no_gradient(module: Any, batch: Any) -> torch.Tensor:
    """An unlearn loss with a zero gradient: the step is the noise alone."""
    return sum((p * 0.0).sum() for p in module.parameters())


def test_two_stream_fisher_and_noise_that_differs_between_fits(tmp_path: Path) -> None:
    """Defects 10 and 13: with `stream=` the Fisher pass reads the training set's one-stream
    batches (it crashed at the first task end), and with one fit per task the noise of task 1
    is not task 0's again (it was seeded by `global_step` only, which restarts with each fit)."""
    from lightning.pytorch.utilities import CombinedLoader

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 4, generator=g), torch.randint(0, 3, (20,), generator=g)
    pl.seed_everything(0)
    model = StreamsModule()
    cb = StepRecorder(stream="stream", delta=1e-2, noise_std=1.0, damping=0.0, fisher_samples=8, loss_fn=_no_gradient)
    for task in range(2):
        loaders = {"stream": DataLoader(TensorDataset(x, y), batch_size=5),
                   "other": DataLoader(TensorDataset(x, y), batch_size=5)}
        quiet_trainer(tmp_path, [cb], max_epochs=1).fit(model, CombinedLoader(loaders, "max_size_cycle"))
        assert cb.fisher_estimates == task + 1
    assert set(cb.fisher) == {n for n, _ in model.named_parameters()}
    first = {(t, s): move for t, s, move in cb.moves}
    assert set(first) == {(0, s) for s in range(4)} | {(1, s) for s in range(4)}
    for step in range(4):
        assert first[(0, step)].abs().sum() > 0
        assert not torch.allclose(first[(0, step)], first[(1, step)])


def test_damped_fisher_is_applied_in_the_callback(tmp_path: Path) -> None:
    """Defect 14: the step of task 1 equals δ·u/(1 + c·F) with the task-0 Fisher, for a damping
    large enough that the preconditioner is far from 1 (F = None fails this)."""
    delta, damping = 1e-2, 1e4

    class Check(RefreshLearning):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
            if self.current_task(trainer) != 1 or hasattr(self, "expected"):
                return super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
            x, y = batch
            params = dict(pl_module.named_parameters())
            before = {n: p.detach().clone() for n, p in params.items()}
            loss = nn.functional.cross_entropy(pl_module(x), y)
            grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
            self.expected = {
                n: delta * before[n].norm() * g / g.norm() / (1 + damping * self.fisher[n]) for n, g in grads.items()
            }
            self.plain = {n: delta * before[n].norm() * g / g.norm() for n, g in grads.items()}
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
            self.applied = {n: p.detach() - before[n] for n, p in params.items()}

    pl.seed_everything(0)
    dm = BlobStream(num_tasks=2)
    cb = Check(delta=delta, damping=damping, noise_std=0.0, fisher_samples=24)
    quiet_trainer(tmp_path, [cb], max_epochs=dm.max_epochs).fit(tiny_classifier(dm), dm)
    assert max(float((damping * f).max()) for f in cb.fisher.values()) > 10  # the preconditioner matters
    for name, expected in cb.expected.items():
        assert torch.allclose(cb.applied[name], expected, atol=1e-7, rtol=1e-4), name
    assert not all(torch.allclose(cb.applied[n], cb.plain[n], atol=1e-7, rtol=1e-4) for n in cb.plain)


def test_unlearn_step_leaves_every_adab2n_buffer_alone() -> None:
    """Defect 12: AdaB²N's running statistics, step counter and momentum recursion are restored."""
    from lightning_forget.nn import AdaB2NBatchNorm2d

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 1), AdaB2NBatchNorm2d(3, num_tasks=2, kappa=0.5), nn.Flatten(), nn.Linear(12, 2))
    model.train()
    model[1].next_task()
    model[1].set_task_ids(torch.tensor([0, 1, 1, 0]))
    model(torch.randn(4, 2, 2, 2))  # non-trivial statistics and recursion
    before = {name: b.clone() for name, b in model.named_buffers()}
    assert float(before["1.eta"]) > 0
    unlearn_step(model, (torch.randn(4, 2, 2, 2) * 3, torch.tensor([0, 1, 1, 0])), None, delta=1e-2)
    for name, value in model.named_buffers():
        assert torch.equal(value, before[name]), name


def test_half_precision_step_logs_what_was_applied_and_warns(tmp_path: Path) -> None:
    """Defect 11: under bf16-true the default step (δ = 1e-5) rounds away; the logged displacement
    is the applied one and the callback warns."""
    model, x, y = _linear()
    model = model.to(torch.bfloat16)
    moved = unlearn_step(model, (x.bfloat16(), y), None, delta=1e-5, noise_std=0.0)
    assert float(moved.lost_norm) > 0.5 * float(moved.intended_norm)

    pl.seed_everything(0)
    dm = BlobStream(num_tasks=1)
    cb = RefreshLearning(fisher_samples=0)
    trainer = quiet_trainer(tmp_path, [cb], max_epochs=1, precision="bf16-true", limit_val_batches=0)
    with pytest.warns(UserWarning, match="below the resolution"):
        trainer.fit(tiny_classifier(dm), dm)
    applied = float(trainer.callback_metrics["refresh/displacement"])
    intended = float(trainer.callback_metrics["refresh/intended_displacement"])
    assert intended > 0 and applied < 0.5 * intended  # most weights did not move at all
