"""Gradients outside the wrapped step (`lightning_forget.gradients`), one process and 2-process DDP."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_forget.gradients import (
    average_gradients,
    broadcast_parameters,
    compute_gradients,
    flatten_tensors,
    input_vjp,
    synced_gradients,
    unflatten_tensors,
)
from tests.helpers.mech import TinyRegressor, plain_trainer, regression_data, regression_loader


def _manual_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    clone = TinyRegressor()
    clone.net.load_state_dict(model.state_dict())
    nn.functional.mse_loss(clone.net(x), y).backward()
    return {name: p.grad.clone() for name, p in clone.net.named_parameters()}


def test_compute_gradients_matches_backward() -> None:
    torch.manual_seed(0)
    model = TinyRegressor().net
    data = regression_data(8)
    x, y = data.tensors
    grads = compute_gradients(nn.functional.mse_loss(model(x), y), model)
    expected = _manual_grads(model, x, y)
    assert list(grads) == list(expected)
    for name in grads:
        torch.testing.assert_close(grads[name], expected[name])
    assert all(p.grad is None for p in model.parameters())


def test_grad_untouched_during_accumulation() -> None:
    torch.manual_seed(0)
    model = TinyRegressor().net
    x, y = regression_data(8).tensors
    nn.functional.mse_loss(model(x[:4]), y[:4]).backward()  # a first micro-batch, accumulating
    before = {name: p.grad.clone() for name, p in model.named_parameters()}
    compute_gradients(nn.functional.mse_loss(model(x[4:]), y[4:]), model)
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, before[name])


def test_input_vjp_is_the_input_gradient_and_leaves_parameters_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, grad = torch.randn(5, 3), torch.randn(5, 2)
    leaf = x.clone().requires_grad_(True)
    (model(leaf) * grad).sum().backward()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():  # taken with gradients on whatever the caller's mode
        value = input_vjp(model, x, grad)
    torch.testing.assert_close(value, leaf.grad)
    assert all(p.grad is None for p in model.parameters()) and not value.requires_grad


def test_unused_and_frozen_parameters() -> None:
    model = nn.ModuleDict({"a": nn.Linear(2, 1), "b": nn.Linear(2, 1)})
    model["b"].bias.requires_grad_(False)
    loss = model["a"](torch.ones(1, 2)).sum()
    grads = compute_gradients(loss, model, retain_graph=True)
    assert set(grads) == {"a.weight", "a.bias", "b.weight"}  # frozen skipped for a module
    assert torch.equal(grads["b.weight"], torch.zeros_like(model["b"].weight))  # unused: zeros
    with pytest.raises(ValueError, match="require gradients"):
        compute_gradients(loss, {"b.bias": model["b"].bias})
    with pytest.raises(ValueError, match="scalar"):
        compute_gradients(model["a"](torch.ones(3, 2)), model)


def test_flatten_roundtrip_and_single_process_average() -> None:
    tensors = {"a": torch.randn(2, 3), "b": torch.arange(4), "c": torch.randn(5)}
    flat = flatten_tensors(tensors)
    assert set(flat) == {torch.float32, torch.int64} and flat[torch.float32].numel() == 11
    back = unflatten_tensors(flat, tensors)
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)

    class OneProcess:
        world_size = 1

        def reduce(self, *args, **kwargs):  # pragma: no cover - must not be called
            raise AssertionError("no collective on one process")

    averaged = average_gradients(OneProcess(), tensors)
    assert all(torch.equal(averaged[k], tensors[k]) for k in tensors)


def test_average_makes_one_collective_per_dtype() -> None:
    calls = []

    class TwoRanks:
        world_size = 2

        def reduce(self, tensor, reduce_op="mean"):
            calls.append((tensor.dtype, tensor.numel(), reduce_op))
            return tensor / 2  # as if the other rank sent zeros

    grads = {"a": torch.ones(3), "b": torch.ones(2, 2), "c": torch.ones(1, dtype=torch.float64)}
    averaged = average_gradients(TwoRanks(), grads)
    assert sorted(calls, key=str) == sorted([(torch.float32, 7, "mean"), (torch.float64, 1, "mean")], key=str)
    assert all(torch.equal(averaged[k], grads[k] / 2) for k in grads)
    assert averaged["b"].shape == (2, 2)


class _SyncProbe(Callback):
    """On every rank: average a gradient of this rank's half of the data, compare with the
    full-batch gradient; then make parameters differ per rank and broadcast rank 0's."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rank, world = trainer.global_rank, trainer.world_size
        x, y = regression_data(8).tensors
        net = pl_module.net
        half = slice(rank * 4, (rank + 1) * 4)
        grads = synced_gradients(trainer, nn.functional.mse_loss(net(x[half]), y[half]), net)
        full = compute_gradients(nn.functional.mse_loss(net(x), y), net)
        grad_vec = torch.cat([g.flatten() for g in grads.values()])
        full_vec = torch.cat([g.flatten() for g in full.values()])
        gathered = trainer.strategy.all_gather(grad_vec)
        grad_untouched = all(p.grad is None for p in net.parameters())

        with torch.no_grad():
            for p in net.parameters():
                p.add_(float(rank + 1))
        rank0_expected = trainer.strategy.broadcast(torch.cat([p.detach().flatten() for p in net.parameters()]))
        broadcast_parameters(trainer.strategy, net)
        params = torch.cat([p.detach().flatten() for p in net.parameters()])
        gathered_params = trainer.strategy.all_gather(params)
        result = {
            "world": world,
            "rank_diff": float((gathered[0] - gathered[1]).abs().max()),
            "full_diff": float((grad_vec - full_vec).abs().max()),
            "local_differs": float((compute_gradients(nn.functional.mse_loss(net(x[:4]), y[:4]), net)["0.weight"]
                                    - compute_gradients(nn.functional.mse_loss(net(x[4:]), y[4:]), net)["0.weight"])
                                   .abs().max()),
            "grad_untouched": grad_untouched,
            "param_rank_diff": float((gathered_params[0] - gathered_params[1]).abs().max()),
            "param_vs_rank0": float((params - rank0_expected).abs().max()),
        }
        Path(self.out, f"rank{rank}.json").write_text(json.dumps(result))


def test_ddp_average_and_broadcast(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = TinyRegressor()
    trainer = plain_trainer(
        tmp_path, [_SyncProbe(str(tmp_path))], devices=2, strategy="ddp_spawn", max_epochs=1, limit_train_batches=1
    )
    trainer.fit(model, regression_loader(8))
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["world"] == 2
        assert result["local_differs"] > 1e-4  # the ranks' own gradients really differ
        assert result["rank_diff"] == 0.0
        assert result["full_diff"] < 1e-6
        assert result["grad_untouched"]
        assert result["param_rank_diff"] == 0.0
        assert result["param_vs_rank0"] == 0.0
