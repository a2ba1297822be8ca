"""The loss-term mechanism: terms computed inside the wrapped training step, reduced once."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_forget.losses import remove_training_step_hooks, training_step_hooks
from tests.helpers.harness import RankFingerprint, params_vector, quiet_trainer


class Linear(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


class ForwardTerm(pl.Callback):
    """Adds 0.5 · mean(f(x)²): a term that needs its own forward pass."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        training_step_hooks(pl_module).add_loss_term("forward_term", self.term)

    def term(self, pl_module: pl.LightningModule, batch: Any, batch_idx: int, output: Any) -> torch.Tensor:
        return 0.5 * pl_module(batch[0] * 2.0).pow(2).mean()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        remove_training_step_hooks(pl_module, "forward_term")

    def state_dict(self) -> dict[str, Any]:
        return {}


def _data() -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(8, 3, generator=gen), torch.randint(0, 2, (8,), generator=gen))


def test_term_is_added_to_the_loss_and_hooks_are_removed() -> None:
    module = Linear()
    term = ForwardTerm()
    term.setup(None, module, "fit")  # type: ignore[arg-type]
    x, y = _data().tensors
    loss = module.training_step((x, y), 0)
    expected = nn.functional.cross_entropy(module(x), y) + 0.5 * module(2 * x).pow(2).mean()
    assert torch.allclose(loss, expected)
    term.teardown(None, module, "fit")  # type: ignore[arg-type]
    assert "training_step" not in module.__dict__
    assert torch.allclose(module.training_step((x, y), 0), nn.functional.cross_entropy(module(x), y))


def test_batch_transform_runs_before_the_step() -> None:
    module = Linear()
    seen = []
    hooks = training_step_hooks(module)
    hooks.add_batch_transform("double", lambda m, b, i: (torch.cat([b[0], b[0]]), torch.cat([b[1], b[1]])))
    original = module.__class__.training_step

    def spy(self: Linear, batch: Any, batch_idx: int) -> torch.Tensor:
        seen.append(batch[0].shape[0])
        return original(self, batch, batch_idx)

    hooks.original = spy.__get__(module)
    x, y = _data().tensors
    module.training_step((x, y), 0)
    assert seen == [16]


def test_missing_loss_gets_a_clear_error() -> None:
    module = Linear()
    module.training_step = lambda batch, batch_idx: {"logits": torch.zeros(2)}  # type: ignore[method-assign]
    hooks = training_step_hooks(module)
    hooks.add_loss_term("t", lambda m, b, i, o: torch.zeros(()))
    with pytest.raises(TypeError, match="return the loss tensor"):
        module.training_step(_data().tensors, 0)


@pytest.mark.ddp
def test_forward_term_under_ddp_equals_single_process_full_batch(tmp_path: Any) -> None:
    """2 ranks × batch 4 with the term == 1 process × batch 8: DDP reduced the term's
    gradient exactly once (averaged like the main loss), and both ranks agree."""
    single = Linear()
    quiet_trainer(tmp_path / "single", [ForwardTerm()], max_epochs=5).fit(single, DataLoader(_data(), batch_size=8))

    ddp = Linear()
    term = ForwardTerm()
    out = tmp_path / "ranks.json"
    trainer = quiet_trainer(
        tmp_path / "ddp", [term, RankFingerprint(term, str(out))], max_epochs=5, devices=2, strategy="ddp_spawn"
    )
    trainer.fit(ddp, DataLoader(_data(), batch_size=4))
    import json

    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["max_param_diff"] == 0.0, result
    assert torch.allclose(params_vector(single), params_vector(ddp), atol=1e-6)
    # Without the term the two runs would end elsewhere: the term mattered.
    plain = Linear()
    quiet_trainer(tmp_path / "plain", [], max_epochs=5).fit(plain, DataLoader(_data(), batch_size=8))
    assert not torch.allclose(params_vector(plain), params_vector(ddp), atol=1e-4)


def test_removing_hooks_restores_an_instance_training_step() -> None:
    module = Linear()

    def custom(batch: Any, batch_idx: int) -> torch.Tensor:
        return torch.tensor(123.0)

    module.training_step = custom  # type: ignore[method-assign]
    training_step_hooks(module).add_loss_term("t", lambda *a: None)
    remove_training_step_hooks(module, "t")
    assert module.training_step is custom


class SkipAndNoIdx(Linear):
    def training_step(self, batch: Any) -> Any:  # type: ignore[override]
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 2:
            return None  # Lightning: skip this batch
        return nn.functional.cross_entropy(self(batch[0]), batch[1])


def test_step_without_batch_idx_and_skipped_batches_work_with_terms(tmp_path: Any) -> None:
    term = ForwardTerm()
    module = SkipAndNoIdx()
    quiet_trainer(tmp_path, [term], max_epochs=1).fit(module, DataLoader(_data(), batch_size=2))
    assert module.calls == 4


class Manual(Linear):
    def __init__(self, use_helper: bool) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.use_helper = use_helper

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        from lightning_forget.losses import add_loss_terms

        opt = self.optimizers()
        loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
        if self.use_helper:
            loss = add_loss_terms(self, loss, batch, batch_idx)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss


def test_manual_optimization_needs_add_loss_terms_and_then_matches_automatic(tmp_path: Any) -> None:
    with pytest.raises(RuntimeError, match="manual optimization.*add_loss_terms"):
        quiet_trainer(tmp_path, [ForwardTerm()], max_epochs=1).fit(Manual(False), DataLoader(_data(), batch_size=4))
    manual, automatic = Manual(True), Linear()
    quiet_trainer(tmp_path, [ForwardTerm()], max_epochs=2).fit(manual, DataLoader(_data(), batch_size=4))
    quiet_trainer(tmp_path, [ForwardTerm()], max_epochs=2).fit(automatic, DataLoader(_data(), batch_size=4))
    assert torch.allclose(params_vector(manual), params_vector(automatic), atol=1e-6)
