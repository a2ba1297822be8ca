"""DoCo's concept-preserving gradient (`lightning_forget.unlearning.surgery`) and its use by any unlearning callback."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_forget.callbacks import GradDiff
from lightning_forget.unlearning.surgery import GradientSurgery, concept_preserving_gradient, whole_tensor_products
from tests.helpers.harness import quiet_trainer
from tests.test_unlearning import W0, XF, UserNet, _ce_grad


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------------- the maths, by hand
def test_project_removes_the_conflicting_component_and_keeps_the_rest() -> None:
    unlearn = {"conflict": _t(1.0, 0.0), "agree": _t(1.0, 0.0), "zero_p": _t(3.0, -1.0), "only_u": _t(1.0, 2.0)}
    preserve = {"conflict": _t(-1.0, 1.0), "agree": _t(1.0, 1.0), "zero_p": _t(0.0, 0.0)}
    out = concept_preserving_gradient(unlearn, preserve, mode="project")
    # g_u − (g_u·g_p/‖g_p‖²) g_p = (1, 0) − (−1/2)(−1, 1) = (½, ½), orthogonal to g_p
    assert torch.allclose(out.gradients["conflict"], _t(0.5, 0.5))
    assert torch.equal(out.gradients["agree"], unlearn["agree"])  # cos = 1/√2 ≥ 0: kept
    assert torch.equal(out.gradients["zero_p"], unlearn["zero_p"])  # nothing to preserve
    assert torch.equal(out.gradients["only_u"], unlearn["only_u"])
    assert float(out.cosines["conflict"]) == pytest.approx(-1 / math.sqrt(2))
    assert float(out.cosines["zero_p"]) == 0.0
    assert out.conflict_fraction == pytest.approx(1 / 3)
    half = concept_preserving_gradient(unlearn, preserve, mode="project", strength=0.5)
    assert torch.allclose(half.gradients["conflict"], _t(0.75, 0.25))
    assert torch.equal(unlearn["conflict"], _t(1.0, 0.0))  # inputs untouched


def test_doco_rule_subtracts_cosine_times_the_unit_preservation_gradient() -> None:
    # ‖g_u‖ = 2: cos = −2/(2·√2) = −1/√2, ĝ_p = (−1, 1)/√2, g_u − cos·ĝ_p = (2, 0) + ½(−1, 1) = (1.5, 0.5)
    out = concept_preserving_gradient({"w": _t(2.0, 0.0)}, {"w": _t(-1.0, 1.0)}, mode="doco")
    assert torch.allclose(out.gradients["w"], _t(1.5, 0.5), atol=1e-7)
    # project differs here (only a unit-norm g_u gives the same): (2, 0) + 1·(−1, 1) = (1, 1)
    project = concept_preserving_gradient({"w": _t(2.0, 0.0)}, {"w": _t(-1.0, 1.0)}, mode="project")
    assert torch.allclose(project.gradients["w"], _t(1.0, 1.0))
    unit = concept_preserving_gradient({"w": _t(1.0, 0.0)}, {"w": _t(-1.0, 1.0)}, mode="doco")
    assert torch.allclose(unit.gradients["w"], _t(0.5, 0.5), atol=1e-7)
    kept = concept_preserving_gradient({"w": _t(2.0, 0.0)}, {"w": _t(1.0, 1.0)}, mode="doco")
    assert torch.equal(kept.gradients["w"], _t(2.0, 0.0))
    zero = concept_preserving_gradient({"w": _t(2.0, 0.0)}, {"w": _t(0.0, 0.0)}, mode="doco")
    assert torch.equal(zero.gradients["w"], _t(2.0, 0.0))


def test_surgery_is_per_tensor_not_on_the_concatenation() -> None:
    # globally g_u·g_p = −1 + 5 > 0, but the first tensor conflicts: only it is adjusted
    unlearn = {"a": _t(1.0, 0.0), "b": _t(5.0)}
    preserve = {"a": _t(-1.0, 1.0), "b": _t(1.0)}
    out = concept_preserving_gradient(unlearn, preserve)
    assert torch.allclose(out.gradients["a"], _t(0.5, 0.5)) and torch.equal(out.gradients["b"], _t(5.0))
    products = whole_tensor_products(unlearn, preserve)
    assert [float(v) for v in products["a"]] == [-1.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="mode"):
        concept_preserving_gradient(unlearn, preserve, mode="pcgrad")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="entries"):
        whole_tensor_products({"a": _t(1.0)}, {"a": _t(1.0, 2.0)})


def test_gradient_surgery_combines_with_grad_and_skips_when_nothing_was_collected() -> None:
    w = nn.Parameter(_t(0.0, 0.0))
    surgery = GradientSurgery("project", add_preservation=True)

    class OneRank:
        world_size = 1

    assert surgery.apply(OneRank(), [("w", w)]) is None  # nothing collected: .grad untouched
    surgery.add((w * _t(1.0, 0.0)).sum(), {"w": w}, scale=0.5)
    surgery.add((w * _t(1.0, 0.0)).sum(), {"w": w}, scale=0.5)  # accumulated micro-batches: g_u = (1, 0)
    w.grad = _t(-1.0, 1.0)  # the reduced preservation gradient
    result = surgery.apply(OneRank(), [("w", w)])
    assert result is not None and torch.allclose(w.grad, _t(0.5, 0.5) + _t(-1.0, 1.0))
    only = GradientSurgery("project", add_preservation=False)
    only.add((w * _t(1.0, 0.0)).sum(), {"w": w})
    w.grad = _t(-1.0, 1.0)
    only.apply(OneRank(), [("w", w)])
    assert torch.allclose(w.grad, _t(0.5, 0.5))


# ---------------------------------------------------------------------- on the unlearning callbacks
def _by_hand(g_u: torch.Tensor, g_p: torch.Tensor) -> torch.Tensor:
    """Per-tensor projection, written out with plain sums."""
    dot = float((g_u * g_p).sum())
    if dot >= 0:
        return g_u
    return g_u - dot / float((g_p * g_p).sum()) * g_p


class _ConflictingStreams(pl.LightningDataModule):
    """One forget row and one retained row of the same class: their gradients conflict."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader([{"forget": (XF[0], 0), "retain": (XR2, 0)}], batch_size=1)


XR2 = torch.tensor([2.0, 1.0])


def test_graddiff_with_surgery_steps_on_the_projected_forget_gradient(tmp_path: Any) -> None:
    g_u = -2.0 * _ce_grad(W0, XF[0], 0)
    g_p = 0.5 * _ce_grad(W0, XR2, 0)
    assert float((g_u * g_p).sum()) < 0  # the two conflict: the surgery has work to do
    model = UserNet()
    callback = GradDiff(gamma=2.0, alpha=0.5, gradient_surgery="project", save_original=False)
    trainer = quiet_trainer(tmp_path, [callback], max_steps=1, max_epochs=1, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=_ConflictingStreams())
    expected = W0 - (_by_hand(g_u, g_p) + g_p)  # SGD, lr 1
    assert torch.allclose(model.net.weight.detach(), expected, atol=1e-5)
    assert not torch.allclose(expected, W0 - (g_u + g_p), atol=1e-3)  # without the surgery it would differ
    assert float(trainer.callback_metrics["graddiff/surgery_conflicts"]) == 1.0


class _GradRecorder(Callback):
    """Listed after the method: keeps ``.grad`` as the optimizer is about to see it."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}


def test_lm_graddiff_with_surgery_matches_per_tensor_projection(tmp_path: Any) -> None:
    from lightning_forget.modules.causal_lm import causal_lm_loss
    from tests.test_unlearning_lm import _data, _first_batch, _model

    dm = _data()
    module = _model(dm)
    batch = _first_batch(dm)
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}

    def grads(sub: dict[str, torch.Tensor], sign: float) -> dict[str, torch.Tensor]:
        loss = sign * causal_lm_loss(module(sub["input_ids"], sub["attention_mask"]), sub["labels"])
        return dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))

    g_u, g_p = grads(batch["forget"], -1.0), grads(batch["retain"], 1.0)
    recorder = _GradRecorder()
    trainer = quiet_trainer(tmp_path, [GradDiff(gradient_surgery="project", save_original=False), recorder],
                            max_steps=1, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    conflicted = 0
    for name in params:
        u = g_u[name] if g_u[name] is not None else torch.zeros_like(params[name])
        p = g_p[name] if g_p[name] is not None else torch.zeros_like(params[name])
        conflicted += int(float((u * p).sum()) < 0)
        assert torch.allclose(recorder.grads[name], _by_hand(u, p) + p, atol=1e-5, rtol=1e-4), name
    assert conflicted > 0
    assert 0 < float(trainer.callback_metrics["graddiff/surgery_conflicts"]) <= 1


# ---------------------------------------------------------------------- DDP: reduced before the surgery
class _PairData(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(3)
        self.xf, self.xr = torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)
        self.yf, self.yr = torch.randint(0, 3, (8,), generator=g), torch.randint(0, 3, (8,), generator=g)

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"forget": (self.xf[i], self.yf[i]), "retain": (self.xr[i], self.yr[i])}


class _Net(UserNet):
    """UserNet with a two-layer MLP (four parameter tensors) and SGD lr 0.5."""

    def __init__(self) -> None:
        super().__init__(lr=0.5)
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


class _SaveWeights(Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank == 0:
            weights = {n: p.detach().flatten().tolist() for n, p in pl_module.named_parameters()}
            conflicts = float(trainer.callback_metrics.get("graddiff/surgery_conflicts", -1.0))
            Path(self.out).write_text(json.dumps({"weights": weights, "conflicts": conflicts}))


def _fit_pair(tmp_path: Path, devices: int, surgery: Any = "project", accumulate: int = 1) -> dict[str, Any]:
    out = tmp_path / f"weights{devices}{surgery}{accumulate}.json"
    callback = GradDiff(gradient_surgery=surgery, save_original=False, forget_passes=None)
    kwargs: dict[str, Any] = {"devices": devices, "strategy": "ddp_spawn"} if devices > 1 else {}
    trainer = quiet_trainer(tmp_path / str(devices), [callback, _SaveWeights(str(out))], max_steps=2, max_epochs=1,
                            num_sanity_val_steps=0, accumulate_grad_batches=accumulate, **kwargs)
    if devices == 1:  # the global batches of 2 ranks: Lightning's DistributedSampler shuffles with seed PL_GLOBAL_SEED
        order = torch.randperm(8, generator=torch.Generator().manual_seed(int(os.getenv("PL_GLOBAL_SEED", 0)))).tolist()
        loader = DataLoader(_PairData(), batch_size=4 // accumulate, sampler=order)
    else:
        loader = DataLoader(_PairData(), batch_size=2)
    trainer.fit(_Net(), loader)
    return json.loads(out.read_text())


def test_ddp_two_processes_and_accumulation_equal_one_process_with_the_global_batch(tmp_path: Path) -> None:
    one, two = _fit_pair(tmp_path, 1), _fit_pair(tmp_path, 2)
    assert one["conflicts"] > 0  # some tensors conflicted, so the surgery changed the step
    for name, values in one["weights"].items():
        assert torch.allclose(torch.tensor(two["weights"][name]), torch.tensor(values), atol=1e-6), name
    accumulated = _fit_pair(tmp_path, 1, accumulate=2)  # two micro-batches of 2: the same optimizer steps
    for name, values in one["weights"].items():
        assert torch.allclose(torch.tensor(accumulated["weights"][name]), torch.tensor(values), atol=1e-6), name
    plain = _fit_pair(tmp_path, 1, surgery=None)
    assert any(not torch.allclose(torch.tensor(plain["weights"][n]), torch.tensor(v), atol=1e-4)
               for n, v in one["weights"].items())
