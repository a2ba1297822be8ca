"""Forwards run from hooks use the trainer's precision, like the training step."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_forget.precision import forward_context
from tests.helpers.mech import TinyRegressor, plain_trainer, regression_loader


class _StepDtype(TinyRegressor):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x)
        self.step_dtype = out.dtype
        return torch.nn.functional.mse_loss(out.float(), y)


class _HookForward(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        x, _ = batch
        with torch.no_grad():
            self.plain_dtype = pl_module(x).dtype
            with forward_context(trainer):
                self.hook_dtype = pl_module(x).dtype


@pytest.mark.parametrize(
    ("precision", "expected"), [("bf16-mixed", torch.bfloat16), ("32-true", torch.float32)]
)
def test_hook_forward_matches_training_step_precision(tmp_path, precision, expected) -> None:
    model, probe = _StepDtype(), _HookForward()
    trainer = plain_trainer(tmp_path, [probe], precision=precision, max_steps=2)
    trainer.fit(model, regression_loader())
    assert model.step_dtype == expected
    assert probe.hook_dtype == expected == model.step_dtype
    assert probe.plain_dtype == torch.float32  # outside the context a hook forward is fp32


def test_lines_score_fn_runs_under_the_training_precision(tmp_path) -> None:
    from lightning_forget.callbacks import LiNeS

    dtypes: list[torch.dtype] = []

    def score(module: torch.nn.Module) -> float:
        with torch.no_grad():
            out = module(torch.randn(4, 3))
        dtypes.append(out.dtype)
        return 0.0

    lines = LiNeS(alpha_grid=[0.5, 1.0], score_fn=score)
    trainer = plain_trainer(tmp_path, [lines], precision="bf16-mixed", max_steps=2)
    trainer.fit(TinyRegressor(), regression_loader())
    assert dtypes and set(dtypes) == {torch.bfloat16}
