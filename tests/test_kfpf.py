"""FPF / k-FPF: module selection, the inner fine-tuning loop, the schedule, resume and DDP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_forget.callbacks import FPF, KFPF, ExperienceReplay
from lightning_forget.fpf_selection import ModuleSensitivity, parameters_of, select_modules
from lightning_forget.modules import ContinualClassifier
from lightning_forget.nn.backbones import ResNet
from tests.helpers.data import BlobStream
from tests.helpers.harness import flat_tensors, params_vector, quiet_trainer, run_ddp_pair, run_stream, tiny_classifier


class ImageBlobs(BlobStream):
    """BlobStream with 1×4×4 "images" (dim 16), for the ResNet backbone."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("dim", 16)
        kwargs.setdefault("num_tasks", 2)
        kwargs.setdefault("samples_per_class", 8)
        super().__init__(**kwargs)
        self.input_shape = (1, 4, 4)
        self._data = {k: (x.view(-1, 1, 4, 4), y) for k, (x, y) in self._data.items()}


def tiny_resnet(dm: Any) -> ContinualClassifier:
    return ContinualClassifier(
        backbone="resnet", resnet_width=4, num_classes=dm.num_classes, input_shape=dm.input_shape,
        num_tasks=dm.num_tasks, report=False,
    )


# ---------------------------------------------------------------------- selection
def test_default_selection_on_resnet_is_every_batchnorm_and_the_head() -> None:
    model = nn.Sequential()
    model.add_module("backbone", ResNet((1, 4, 4), width=4))
    model.add_module("head", nn.Linear(32, 6))
    names = select_modules(model)
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert names == bns + ["head"]
    assert len(bns) == 1 + 8 * 2 + 3  # stem, two per block, three shortcut projections
    with_conv = select_modules(model, ("batchnorm", "last_linear", "first_conv"))
    assert with_conv[0] == "backbone.conv1"
    params = parameters_of(model, names)
    assert "head.weight" in params and "backbone.bn1.weight" in params
    assert not any("conv" in name for name in params)


def test_selection_on_mlp_patterns_and_errors() -> None:
    dm = BlobStream()
    model = tiny_classifier(dm)
    assert select_modules(model) == ["head"]  # no BatchNorm in the MLP: only the classifier
    assert select_modules(model, (), (r"layers\.1$",)) == ["backbone.layers.1"]
    with pytest.raises(ValueError, match="module_types"):
        select_modules(model, ("dropout",))
    with pytest.raises(ValueError, match="No module matched"):
        select_modules(model, ("batchnorm",))
    with pytest.raises(ValueError, match="module_patterns"):
        select_modules(model, (), ("(",))


def test_sensitivity_ranks_first_the_module_forced_to_change_most() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 64), nn.Linear(64, 2), nn.Linear(2, 2))
    tracker = ModuleSensitivity(model)
    tracker.observe(model)
    with torch.no_grad():
        for step in range(3):
            model[0].weight.add_(0.01)  # large module, small change per parameter
            model[1].weight.add_(0.001)
            model[2].bias.add_(1.0)  # tiny module, big change: size normalisation must rank it first
            tracker.observe(model)
    assert tracker.top(1) == ["2"]
    scores = tracker.scores()
    # hand-computed: module 2 has 4 weights + 2 biases, only the biases move by 1 → 2/6 per step
    assert scores["2"] == pytest.approx(2 / 6)
    assert scores["0"] == pytest.approx(0.01 * 256 / (256 + 64))
    assert tracker.top(3) == ["2", "0", "1"]


# ---------------------------------------------------------------------- inner loop
class Probe(Callback):
    """Records, around each fine-tuning, parameters, the main optimizer's state and grads."""

    def __init__(self, kfpf: KFPF) -> None:
        self.records: list[dict[str, Any]] = []
        original = kfpf.finetune

        def wrapped(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            opt = trainer.optimizers[0]
            before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
            grads = {n: None if p.grad is None else p.grad.clone() for n, p in pl_module.named_parameters()}
            flags = {n: p.requires_grad for n, p in pl_module.named_parameters()}
            opt_state = flat_tensors(opt.state_dict()["state"])
            bn = {n: b.clone() for n, b in pl_module.named_buffers()}
            original(trainer, pl_module)
            self.records.append(
                {
                    "step": kfpf.optimizer_steps,
                    "global_step": trainer.global_step,
                    "changed": sorted(n for n, p in pl_module.named_parameters() if not torch.equal(p, before[n])),
                    "grads_same": all(
                        (g is None and p.grad is None) or (g is not None and torch.equal(g, p.grad))
                        for (n, p), g in zip(pl_module.named_parameters(), grads.values())
                    ),
                    "flags_same": flags == {n: p.requires_grad for n, p in pl_module.named_parameters()},
                    "opt_same": torch.equal(opt_state, flat_tensors(opt.state_dict()["state"])),
                    "bn_changed": any(not torch.equal(b, bn[n]) for n, b in pl_module.named_buffers() if "running" in n),
                }
            )

        kfpf.finetune = wrapped  # type: ignore[method-assign]




def test_inner_loop_changes_only_selected_params_and_leaves_the_main_optimizer(tmp_path: Path) -> None:
    pl.seed_everything(0)
    dm = ImageBlobs(epochs_per_task=1)
    model = ContinualClassifier(
        backbone="resnet", resnet_width=4, num_classes=dm.num_classes, input_shape=dm.input_shape,
        num_tasks=dm.num_tasks, report=False,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    )
    kfpf = KFPF(interval=1, finetune_steps=2, finetune_batch_size=8, buffer_size=32)
    probe = Probe(kfpf)
    trainer = quiet_trainer(tmp_path, [kfpf, probe], max_epochs=dm.max_epochs, accumulate_grad_batches=2)
    trainer.fit(model, dm)
    assert probe.records, "no fine-tuning ran"
    selected = set(parameters_of(model, kfpf.selected))
    assert {n for n, _ in model.named_parameters() if "bn" in n or n.startswith("head")} <= selected
    assert not any("conv" in n for n in selected)
    for record in probe.records:
        assert record["changed"], record
        assert set(record["changed"]) <= selected, record
        assert record["grads_same"] and record["flags_same"] and record["opt_same"], record
        assert record["bn_changed"]  # BatchNorm statistics are refit in train mode
    assert kfpf.samples == 2 * 8 * kfpf.finetunes


# ---------------------------------------------------------------------- schedule
@pytest.mark.parametrize(("accumulate", "at_end"), [(1, True), (2, True), (2, False)])
def test_k_evenly_spaced_finetunes_over_a_known_run(tmp_path: Path, accumulate: int, at_end: bool) -> None:
    # BlobStream: 3 tasks × 48 samples / batch 8 = 6 batches per epoch, 2 epochs per task → 36 batches.
    pl.seed_everything(0)
    dm = BlobStream(epochs_per_task=2)
    model = tiny_classifier(dm)
    kfpf = KFPF(k=4, finetune_steps=1, finetune_batch_size=4, buffer_size=16, finetune_at_end=at_end)
    probe = Probe(kfpf)
    trainer = quiet_trainer(tmp_path, [kfpf, probe], max_epochs=dm.max_epochs, accumulate_grad_batches=accumulate)
    trainer.fit(model, dm)
    steps = 36 // accumulate
    assert trainer.global_step == steps
    interval = steps // 4
    assert kfpf._resolved_interval == interval
    if at_end:
        # defect 20: the k-th fine-tuning at the stream's end (18 steps: after 4, 8, 12 and 18, not 16)
        assert [r["step"] for r in probe.records] == [interval * i for i in range(1, 4)] + [steps]
    else:
        assert [r["step"] for r in probe.records] == [interval * i for i in range(1, 5)]
    # each fine-tuning ran right after a real optimizer step, never after an accumulation batch
    assert [r["global_step"] for r in probe.records] == [r["step"] for r in probe.records]
    assert kfpf.optimizer_steps == steps and kfpf.finetunes == 4


def test_given_interval_counts_real_optimizer_steps_under_accumulation(tmp_path: Path) -> None:
    # 36 batches, accumulate 3 → 12 optimizer steps; interval 5 → after steps 5 and 10, and at the
    # stream's end (step 12, finetune_at_end).
    pl.seed_everything(0)
    dm = BlobStream(epochs_per_task=2)
    kfpf = KFPF(k=None, interval=5, finetune_steps=1, finetune_batch_size=4, buffer_size=16)
    probe = Probe(kfpf)
    trainer = quiet_trainer(tmp_path, [kfpf, probe], max_epochs=dm.max_epochs, accumulate_grad_batches=3)
    trainer.fit(tiny_classifier(dm), dm)
    assert trainer.global_step == 12
    assert [(r["step"], r["global_step"]) for r in probe.records] == [(5, 5), (10, 10), (12, 12)]


def test_fpf_runs_once_at_the_end_on_top_of_er(tmp_path: Path) -> None:
    pl.seed_everything(0)
    dm = BlobStream(epochs_per_task=1)
    model = tiny_classifier(dm)
    fpf = FPF(finetune_steps=3, finetune_batch_size=4, buffer_size=16)
    probe = Probe(fpf)
    trainer = quiet_trainer(tmp_path, [ExperienceReplay(buffer_size=16), fpf, probe], max_epochs=dm.max_epochs)
    trainer.fit(model, dm)
    assert [r["step"] for r in probe.records] == [trainer.global_step]
    assert fpf.finetunes == 1 and fpf.samples == 12
    every = FPF(every_task=True, finetune_steps=1)
    probe2 = Probe(every)
    quiet_trainer(tmp_path, [every, probe2], max_epochs=dm.max_epochs).fit(tiny_classifier(dm), dm)
    assert len(probe2.records) == dm.num_tasks


@pytest.mark.parametrize("lr", [0.3, None])
def test_inner_step_is_one_sgd_step_on_the_drawn_batch(tmp_path: Path, lr: Any) -> None:
    """Defects 18 and 19: the inner update equals an independent SGD descent step of the selected
    parameters on the drawn buffer batch, at ``lr`` or by default at the main optimizer's rate."""
    pl.seed_everything(0)
    dm = BlobStream(epochs_per_task=1)
    model = tiny_classifier(dm, optimizer=lambda params: torch.optim.SGD(params, lr=0.05))
    kfpf = KFPF(interval=7, finetune_steps=1, finetune_batch_size=6, buffer_size=16, lr=lr, finetune_at_end=False)
    checks: list[tuple[float, float]] = []
    original = kfpf.finetune

    def independent(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        copy = __import__("copy").deepcopy(pl_module)
        drawn: list[dict[str, torch.Tensor]] = []
        sample = kfpf.buffer.sample
        kfpf.buffer.sample = lambda *a, **k: drawn.append(sample(*a, **k)) or drawn[-1]  # type: ignore[method-assign]
        try:
            original(trainer, pl_module)
        finally:
            kfpf.buffer.sample = sample  # type: ignore[method-assign]
        step = torch.optim.SGD(copy.head.parameters(), lr=0.05 if lr is None else lr)
        loss = nn.functional.cross_entropy(copy(drawn[0]["x"]), drawn[0]["y"])
        loss.backward()
        step.step()
        live = dict(pl_module.named_parameters())
        for name, p in copy.named_parameters():
            assert torch.allclose(live[name], p, atol=1e-6), name  # the head moved as SGD moves it
        after = nn.functional.cross_entropy(pl_module(drawn[0]["x"]), drawn[0]["y"])
        checks.append((float(loss), float(after)))

    kfpf.finetune = independent  # type: ignore[method-assign]
    quiet_trainer(tmp_path, [kfpf], max_epochs=dm.max_epochs).fit(model, dm)
    assert len(checks) == 2 and kfpf.selected == ["head"]
    assert all(after < before for before, after in checks)  # descent on the drawn batch


def test_auto_top_selecting_every_module_warns(tmp_path: Path) -> None:
    pl.seed_everything(0)
    dm = BlobStream(num_tasks=1)
    kfpf = KFPF(interval=3, auto_top=5, finetune_steps=1, buffer_size=16)
    with pytest.warns(UserWarning, match="selects every one of the model's 2 modules"):
        quiet_trainer(tmp_path, [kfpf], max_epochs=1).fit(tiny_classifier(dm), dm)
    assert len(kfpf.selected) == 2 and "head" in kfpf.selected


def test_kd_stores_logits_and_adds_the_mse_term(tmp_path: Path) -> None:
    pl.seed_everything(0)
    dm = BlobStream(epochs_per_task=1)
    model = tiny_classifier(dm)
    kfpf = KFPF(k=2, kd=True, finetune_steps=1, finetune_batch_size=4, buffer_size=16)
    quiet_trainer(tmp_path, [kfpf], max_epochs=dm.max_epochs).fit(model, dm)
    stored = kfpf.buffer.contents()
    assert stored["logits"].shape == (16, dm.num_classes)
    assert kfpf.forward_samples == 3 * 48
    logits = torch.zeros(2, dm.num_classes)
    drawn = {"y": torch.tensor([0, 1]), "logits": torch.ones(2, dm.num_classes)}
    ce = nn.functional.cross_entropy(logits, drawn["y"])
    assert float(kfpf.finetune_loss(logits, drawn)) == pytest.approx(float(ce) + 1.0)


def test_auto_selection_fixes_the_top_modules_at_the_first_finetune(tmp_path: Path) -> None:
    pl.seed_everything(0)
    dm = BlobStream(epochs_per_task=1)
    model = tiny_classifier(dm, hidden_sizes=[16, 16])
    kfpf = KFPF(interval=5, auto_top=2, finetune_steps=1, buffer_size=16)
    quiet_trainer(tmp_path, [kfpf], max_epochs=dm.max_epochs).fit(model, dm)
    assert kfpf.selected is not None and len(kfpf.selected) == 2
    state = kfpf.state_dict()["method"]
    assert state["selected"] == kfpf.selected and state["sensitivity"]["steps"] == 5


class ShakeOne(Callback):
    """After every batch, moves one small module's bias a lot (as if it were task-specific)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            pl_module.get_submodule(self.name).bias.add_(0.5)


@pytest.mark.parametrize("forced", ["backbone.layers.3", "backbone.layers.1"])
def test_auto_selection_in_a_fit_ranks_first_the_module_forced_to_change_most(tmp_path: Path, forced: str) -> None:
    pl.seed_everything(0)
    dm = BlobStream(epochs_per_task=1)
    model = tiny_classifier(dm, hidden_sizes=[16, 16])
    kfpf = KFPF(interval=6, auto_top=1, finetune_steps=1, buffer_size=16)
    # ShakeOne runs before KFPF's hook, so every sensitivity observation sees the push.
    quiet_trainer(tmp_path, [ShakeOne(forced), kfpf], max_epochs=dm.max_epochs).fit(model, dm)
    assert kfpf.selected == [forced]
    assert kfpf.state_dict()["method"]["sensitivity"]["steps"] == 6


def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match="`k` and `interval`"):
        KFPF(k=None)
    with pytest.raises(ValueError, match="lr"):
        KFPF(lr=0.0)
    with pytest.raises(TypeError, match="finetune_at_end"):
        KFPF(finetune_at_end=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="module_types"):
        KFPF(module_types=["dropout"])
    with pytest.raises(TypeError, match="module_types"):
        KFPF(module_types="batchnorm")
    with pytest.raises(ValueError, match="nothing would be"):
        KFPF(module_types=[])


# ---------------------------------------------------------------------- resume and DDP
def _kfpf_auto() -> KFPF:
    return KFPF(k=5, auto_top=2, finetune_steps=2, finetune_batch_size=4, buffer_size=16, kd=True)


def test_resume_mid_epoch_and_at_epoch_end(tmp_path: Path) -> None:
    make = lambda dm: tiny_classifier(dm, hidden_sizes=[16, 16])  # noqa: E731
    full_model, full_cb = run_stream(tmp_path / "full", _kfpf_auto, make_model=make)
    resumed_model, resumed_cb = run_stream(tmp_path / "epoch", _kfpf_auto, resume_after_epoch=1, make_model=make)
    assert torch.allclose(params_vector(full_model), params_vector(resumed_model), atol=1e-6)
    assert torch.allclose(flat_tensors(full_cb.state_dict()), flat_tensors(resumed_cb.state_dict()), atol=1e-6)
    assert resumed_cb.selected == full_cb.selected

    # mid-epoch: checkpoint after step 9 (epoch 1, batch 3 of 6); interval 36 // 5 = 7, so the
    # selection is fixed and one fine-tuning has run before it, the next one after the resume.
    pl.seed_everything(0)
    dm = BlobStream(epochs_per_task=2)
    model, cb = make(dm), _kfpf_auto()
    saver = ModelCheckpoint(dirpath=tmp_path / "mid", every_n_train_steps=9, save_top_k=-1, filename="{step}")
    trainer = quiet_trainer(tmp_path / "m1", [cb, saver], max_steps=9, max_epochs=dm.max_epochs, enable_checkpointing=True)
    trainer.fit(model, dm)
    pl.seed_everything(1)
    dm2 = BlobStream(epochs_per_task=2)
    model2, cb2 = make(dm2), _kfpf_auto()
    quiet_trainer(tmp_path / "m2", [cb2], max_epochs=dm2.max_epochs).fit(model2, dm2, ckpt_path=str(tmp_path / "mid" / "step=9.ckpt"))
    assert torch.allclose(params_vector(full_model), params_vector(model2), atol=1e-6)
    assert torch.allclose(flat_tensors(full_cb.state_dict()), flat_tensors(cb2.state_dict()), atol=1e-6)


@pytest.mark.slow  # about 80 s here (ddp_spawn start-up); the contract row covers DDP with the MLP
@pytest.mark.ddp
def test_ddp_ranks_identical_with_resnet(tmp_path: Path) -> None:
    make = lambda: KFPF(k=3, finetune_steps=2, finetune_batch_size=4, buffer_size=16, kd=True)  # noqa: E731
    result = run_ddp_pair(tmp_path, make, make_data=ImageBlobs, make_model=tiny_resnet)
    assert result["equal_length"], result
    assert result["world_size"] == 2 and result["global_step"] > 0
    assert result["max_param_diff"] == 0.0, result
    assert result["max_state_diff"] == 0.0, result
