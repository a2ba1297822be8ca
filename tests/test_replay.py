"""Fidelity of ER and DER++ against hand-computed steps."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_forget.buffers import ReservoirBuffer
from lightning_forget.callbacks import DarkExperienceReplay, ExperienceReplay
from lightning_forget.distributed import rank_generator
from tests.helpers.data import BlobStream
from tests.helpers.harness import quiet_trainer, tiny_classifier


class StepProbe(pl.Callback):
    """Snapshots the model and a method's buffer before each step; keeps the step's loss."""

    def __init__(self, method: Any) -> None:
        self.method = method
        self.steps: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        buffer = copy.deepcopy(self.method.buffer)
        self.steps.append(
            {"model": copy.deepcopy(pl_module), "buffer": buffer, "batch": batch, "idx": batch_idx, "step": trainer.global_step}
        )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.steps[-1]["loss"] = outputs["loss"].detach()


def test_er_joins_replay_samples_drawn_from_the_buffer(tmp_path: Any) -> None:
    dm = BlobStream(num_tasks=2, epochs_per_task=1, batch_size=6)
    model = tiny_classifier(dm)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = type(model).training_step

    def record(self: Any, batch: Any, batch_idx: int) -> torch.Tensor:
        seen.append((batch[0].clone(), batch[1].clone()))
        return original(self, batch, batch_idx)

    model.training_step = record.__get__(model)  # type: ignore[method-assign]
    er = ExperienceReplay(buffer_size=10, replay_batch_size=4, seed=7, update="reservoir", draw="step")
    probe = StepProbe(er)
    quiet_trainer(tmp_path, [er, probe], max_epochs=dm.max_epochs).fit(model, dm)
    assert seen[0][0].shape[0] == 6  # empty buffer: stream only
    for (x, y), step in list(zip(seen, probe.steps))[1:]:
        stream_x, stream_y = step["batch"]
        n = stream_x.shape[0]
        assert x.shape[0] == n + min(4, len(step["buffer"]))
        assert torch.equal(x[:n], stream_x) and torch.equal(y[:n], stream_y)
        expected = step["buffer"].sample(4, generator=rank_generator(7, step["step"], step["idx"], 0, 0))
        assert torch.equal(x[n:], expected["x"]) and torch.equal(y[n:], expected["y"])
    # The loss of a step is the module's own loss over the joint batch (Mammoth's ER).
    step = probe.steps[5]
    x, y = seen[5]
    assert torch.allclose(step["loss"], nn.functional.cross_entropy(step["model"](x), y), atol=1e-6)
    assert er.buffer.num_seen == len(dm.train_dataset(0)) + len(dm.train_dataset(1))


@pytest.mark.parametrize("alpha, beta", [(0.1, 0.5), (0.3, 0.0)])
def test_derpp_loss_matches_the_formula(tmp_path: Any, alpha: float, beta: float) -> None:
    dm = BlobStream(num_tasks=2, epochs_per_task=1, batch_size=5)
    model = tiny_classifier(dm)
    der = DarkExperienceReplay(buffer_size=12, alpha=alpha, beta=beta, replay_batch_size=3, seed=11)
    probe = StepProbe(der)
    quiet_trainer(tmp_path, [der, probe], max_epochs=dm.max_epochs).fit(model, dm)
    checked = 0
    for step in probe.steps[1:]:
        before, buffer = step["model"], step["buffer"]
        x, y = step["batch"]
        draw = lambda salt: buffer.sample(3, generator=rank_generator(11, step["step"], step["idx"], 0, salt))  # noqa: E731
        first, second = draw(1), draw(2)
        expected = (
            nn.functional.cross_entropy(before(x), y)
            + alpha * nn.functional.mse_loss(before(first["x"]), first["logits"])
            + beta * nn.functional.cross_entropy(before(second["x"]), second["y"])
        )
        assert torch.allclose(step["loss"], expected, atol=1e-6)
        checked += 1
    assert checked > 5
    # Stored logits are the network's outputs for those samples when they were seen.
    first_step = probe.steps[0]
    stored = der.buffer.contents()
    logits_then = first_step["model"](first_step["batch"][0])
    for row, x_row in enumerate(first_step["batch"][0]):
        match = (stored["x"] == x_row).all(dim=1).nonzero().flatten()
        if match.numel():
            assert torch.allclose(stored["logits"][match[0]], logits_then[row], atol=1e-6)


def test_derpp_needs_the_forward_call(tmp_path: Any) -> None:
    dm = BlobStream(num_tasks=1)
    model = tiny_classifier(dm)

    def no_forward(self: Any, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.backbone(x)), y)

    model.training_step = no_forward.__get__(model)  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="did not call its logits function"):
        quiet_trainer(tmp_path, [DarkExperienceReplay(buffer_size=4)], max_epochs=1).fit(model, dm)


def test_replay_rejects_unknown_batch_layouts() -> None:
    er = ExperienceReplay(buffer_size=4)
    with pytest.raises(TypeError, match="Batches must be a tuple, list, namedtuple or dict of tensors, got Tensor"):
        er.to_fields(torch.zeros(3))
    fields = er.to_fields({"x": torch.zeros(3, 2), "y": torch.zeros(3), "meta": "text"})
    assert set(fields) == {"x", "y"}


def test_dict_batches_keep_every_per_sample_field() -> None:
    er = ExperienceReplay(buffer_size=4)
    batch = {"input_ids": torch.ones(2, 5, dtype=torch.long), "y": torch.tensor([1, 2]), "mask": torch.ones(2, 5)}
    er.buffer = ReservoirBuffer(4)
    er.buffer.add(er.to_fields(batch))
    joined = er.from_fields(batch, {k: torch.cat([v, v]) for k, v in er.to_fields(batch).items()})
    assert joined["input_ids"].shape == (4, 5) and joined["mask"].shape == (4, 5)
