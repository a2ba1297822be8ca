"""DoCo and SalUn's generative variant on tiny diffusion UNets: targets by hand, the teacher frozen, only the intended parameters change
(2-process DDP: the DoCo, SalUnDiffusion and SFD rows of tests/test_callback_contract.py)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lightning_forget.callbacks import DoCo, SalUnDiffusion
from lightning_forget.callbacks.doco import predicted_x0
from lightning_forget.modules.diffusion import DiffusionModule, digits_data
from lightning_forget.nn.discriminator import PatchGANDiscriminator, patchgan_blocks
from tests.helpers.harness import quiet_trainer

TINY = {"preset": None, "sample_size": 8, "in_channels": 1, "block_out_channels": [8], "norm_num_groups": 4,
        "cross_attention_dim": 8, "attention_head_dim": 4, "num_train_timesteps": 50, "sample_steps": 3}


class Digits(pl.LightningDataModule):
    """The retained digits 0, 2, 3 of scikit-learn's set (8×8), 32 images, batches of 8."""

    max_epochs = 1
    num_classes = 4

    def __init__(self, **_: Any) -> None:
        super().__init__()
        x, y = digits_data()
        keep = (y < 4) & (y != 1)
        self.x, self.y = x[keep][:32], y[keep][:32]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=8)


def tiny(dm: Any = None, unet: str = "conditional") -> DiffusionModule:
    torch.manual_seed(0)
    return DiffusionModule(unet=unet, num_classes=4, **TINY)


def _fit(tmp_path: Path, module: DiffusionModule, callbacks: list[Callback], steps: int) -> pl.Trainer:
    trainer = quiet_trainer(tmp_path, callbacks, max_steps=steps, max_epochs=1, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=Digits())
    return trainer


def _doco(**kwargs: Any) -> DoCo:
    base = dict(erase=[1], num_anchor_samples=8, sample_steps=2, batch_size=4, discriminator_width=8)
    return DoCo(**{**base, **kwargs})


class _Grads(Callback):
    """Keeps ``.grad`` of the trainable parameters at ``on_before_optimizer_step`` (list it before or after the method)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.grads.append({n: None if p.grad is None else p.grad.detach().clone()
                           for n, p in pl_module.named_parameters() if p.requires_grad})


# ---------------------------------------------------------------------- pure pieces
def test_predicted_x0_and_the_discriminator_shapes() -> None:
    module = tiny()
    x_t, eps = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    t = torch.tensor([3, 40])
    abar = module.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    by_hand = ((x_t - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)  # DDPMScheduler clips x̂0 by default
    assert torch.allclose(predicted_x0(module, x_t, t, eps), by_hand, atol=1e-6)
    assert [patchgan_blocks(s) for s in (4, 8, 16, 32, 64)] == [1, 2, 3, 4, 4]
    assert PatchGANDiscriminator(1, patchgan_blocks(8), 8)(torch.randn(3, 1, 8, 8)).shape == (3, 1, 1, 1)
    with pytest.raises(ValueError, match="image_size"):
        patchgan_blocks(3)


# ---------------------------------------------------------------------- DoCo
def test_doco_step_is_the_doco_rule_on_the_clipped_correction_and_preservation_gradients(tmp_path: Path) -> None:
    captured: list[torch.Tensor] = []

    class Capture(DoCo):
        def erasure_loss(self, pl_module: Any, batch: Any, erase: list[int], keep: list[int]) -> Any:
            add = self._surgery.add

            def record(loss: torch.Tensor, params: Any, scale: float = 1.0) -> None:  # g_u by hand, then the real add
                captured.append(torch.autograd.grad(loss, list(params.values()), retain_graph=True))
                add(loss, params, scale=scale)

            self._surgery.add = record  # type: ignore[method-assign]
            try:
                return super().erasure_loss(pl_module, batch, erase, keep)
            finally:
                self._surgery.add = add  # type: ignore[method-assign]

    before, after = _Grads(), _Grads()
    module = tiny()
    callback = Capture(erase=[1], num_anchor_samples=8, sample_steps=2, batch_size=4, discriminator_width=8,
                       discriminator_warmup=0, retain_weight=0.5)
    trainer = _fit(tmp_path, module, [before, callback, after], steps=2)
    names = list(after.grads[1])
    g_u = dict(zip(names, captured[0]))
    g_p = before.grads[1]

    def clipped(g: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        norm = math.sqrt(sum(float((v * v).sum()) for v in g.values()))
        return {n: v * min(1.0, 1.0 / (norm + 1e-6)) for n, v in g.items()}

    u, p = clipped(g_u), clipped({n: v if v is not None else torch.zeros_like(g_u[n]) for n, v in g_p.items()})
    adjusted = 0
    for name in names:
        nu, np_ = float(u[name].norm()), float(p[name].norm())
        cos = float((u[name] * p[name]).sum()) / ((nu + 1e-8) * (np_ + 1e-8))
        expected = u[name] - cos * p[name] / (np_ + 1e-8) if cos < 0 else u[name]
        adjusted += int(cos < 0)
        assert torch.allclose(after.grads[1][name], expected, atol=1e-6), name  # g_p itself is not stepped on
    assert adjusted > 0 and after.grads[0] == {n: None for n in names}  # step 0: the discriminator's warm-up
    assert float(trainer.callback_metrics["doco/surgery_conflicts"]) == pytest.approx(adjusted / len(names))


def test_doco_warmup_trains_only_the_discriminator_then_only_cross_attention_keys_and_values_change(tmp_path: Path) -> None:
    module = tiny()
    start = {n: p.detach().clone() for n, p in module.named_parameters()}
    callback = _doco(discriminator_warmup=2)
    _fit(tmp_path, module, [callback], steps=2)
    assert all(torch.equal(p, start[n]) for n, p in module.named_parameters())  # warm-up: the model is untouched
    d_after_warmup = {k: v.clone() for k, v in callback.discriminator.state_dict().items()}
    trainer = quiet_trainer(tmp_path / "more", [callback], max_steps=5, max_epochs=1, num_sanity_val_steps=0)
    callback.discriminator_warmup = 0
    trainer.fit(module, datamodule=Digits())
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, start[n])}
    assert changed and all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in changed), changed
    assert any(not torch.equal(v, d_after_warmup[k]) for k, v in callback.discriminator.state_dict().items())
    teacher = callback._get_teacher(module)
    assert all(torch.equal(teacher.weights[n], start[n]) for n in teacher.weights if n in start)  # the teacher is frozen


def test_doco_warmup_lasts_warmup_plus_one_steps_as_the_reference_code(tmp_path: Path) -> None:
    """The reference code trains the model once ``global_step > doco_dlr_warmup_steps`` (its step count starts at
    0), so ``discriminator_warmup=1`` leaves steps 0 and 1 to the discriminator and step 2 moves the model."""

    class Moved(Callback):
        def __init__(self) -> None:
            self.moved: list[bool] = []

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            self.moved.append(any(not torch.equal(p, start[n]) for n, p in pl_module.named_parameters()))

    module = tiny()
    start = {n: p.detach().clone() for n, p in module.named_parameters()}
    moved = Moved()
    _fit(tmp_path, module, [_doco(discriminator_warmup=1), moved], steps=3)
    assert moved.moved == [False, False, True]


def test_doco_without_surgery_steps_on_the_summed_losses_and_saves_the_discriminator(tmp_path: Path) -> None:
    module = tiny(unet="class")
    callback = _doco(gradient_surgery=None, discriminator_warmup=0)
    trainer = _fit(tmp_path, module, [callback], steps=2)
    assert "doco/erasure_loss" in trainer.callback_metrics and "doco/surgery_conflicts" not in trainer.callback_metrics
    state = callback.state_dict()["method"]
    assert set(state["discriminator"]) == {"weights", "optimizer"}
    fresh = _doco(gradient_surgery=None, discriminator_warmup=0)
    fresh.load_state_dict(callback.state_dict())
    fresh._build_discriminator(module)
    assert all(torch.equal(v, state["discriminator"]["weights"][k].to(v.device))
               for k, v in fresh.discriminator.state_dict().items())


@pytest.mark.parametrize("kwargs, error, match", [
    ({"gradient_surgery": "pcgrad"}, ValueError, "gradient_surgery"), ({"gradient_surgery": True}, TypeError, "gradient_surgery"),
    ({"discriminator_lr": 0.0}, ValueError, "discriminator_lr"), ({"discriminator_warmup": -1}, ValueError, "discriminator_warmup"),
    ({"clip_norm": 0.0}, ValueError, "clip_norm"), ({"discriminator_blocks": 0}, ValueError, "discriminator_blocks"),
])
def test_doco_refuses_bad_arguments(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        DoCo(erase=[1], **kwargs)


# ---------------------------------------------------------------------- SalUn (generative)
def test_salun_diffusion_maps_the_forgotten_class_to_the_next_one_on_its_mask(tmp_path: Path) -> None:
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    class Capture(SalUnDiffusion):
        def erasure_loss(self, pl_module: Any, batch: Any, erase: list[int], keep: list[int]) -> Any:
            noised = self._noised

            def record(module: Any, x0: torch.Tensor, generator: torch.Generator) -> Any:
                out = noised(module, x0, generator)
                seen.append((out[0].detach().clone(), out[1].clone(), self._forget[1].clone()))
                return out

            self._noised = record  # type: ignore[method-assign]
            try:
                loss = super().erasure_loss(pl_module, batch, erase, keep)
            finally:
                self._noised = noised  # type: ignore[method-assign]
            seen.append(loss.detach())  # type: ignore[arg-type]
            return loss

    module = tiny()
    start = {n: p.detach().clone() for n, p in module.named_parameters()}
    reference = tiny()  # the same weights: the model before the step
    callback = Capture(erase=[1], num_forget_samples=8, sample_steps=2, batch_size=4, mask_batch_size=4)
    trainer = _fit(tmp_path, module, [callback], steps=2)
    assert callback.retain_weight == pytest.approx(1e-3 * 64)  # α = 1e-3 on a loss summed over the 8×8 pixels
    x_t, t, labels = seen[0]
    assert set(labels.tolist()) == {1}
    with torch.no_grad():
        c = torch.ones(4, dtype=torch.long)
        expected = F.mse_loss(reference.eps(x_t, t, c), reference.eps(x_t, t, torch.full_like(c, 2)))  # (1 + 1) mod 4
    assert float(seen[1]) == pytest.approx(float(expected), rel=1e-4)
    assert float(trainer.callback_metrics["salun_gen/erasure_loss"]) > 0
    mask = callback.mask
    assert mask is not None and mask.fraction == pytest.approx(0.5, abs=1e-3)
    for name, p in module.named_parameters():
        keep = mask.masks[name].to(p.device)
        assert torch.equal(p.detach()[~keep], start[name][~keep]), name  # masked-out weights never move
    assert any(not torch.equal(p, start[n]) for n, p in module.named_parameters())
    teacher = callback._get_teacher(module)
    assert all(torch.equal(teacher.weights[n], start[n]) for n in teacher.weights if n in start)


def test_salun_diffusion_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mask_fraction"):
        SalUnDiffusion(erase=[1], mask_fraction=0.0)
    with pytest.raises(TypeError, match="pseudo"):
        SalUnDiffusion(erase=[1], pseudo=[2])
    with pytest.raises(ValueError, match="num_forget_samples"):
        SalUnDiffusion(erase=[1], num_forget_samples=0)


# ---------------------------------------------------------------------- SFD
def test_sid_and_fake_score_losses_against_hand_values() -> None:
    from lightning_forget.unlearning.distill import fake_score_loss, sid_generator_loss

    x0, p, s = (torch.tensor([[[[1.0, 0.0]]]]), torch.tensor([[[[2.0, 1.0]]]]), torch.tensor([[[[1.0, 1.0]]]]))
    # ω = mean|p − x0| = 1; (p − s)·((p − x0) − 1.2(p − s)) = (1, 0)·(−0.2, 1) = −0.2
    assert float(sid_generator_loss(x0, p, s, alpha=1.2)) == pytest.approx(-0.2)
    assert float(sid_generator_loss(x0, p, s, alpha=0.0)) == pytest.approx(1.0)
    assert float(sid_generator_loss(2 * x0, 2 * p, 2 * s, alpha=1.2)) == pytest.approx(-0.4)  # ω scales too
    assert float(fake_score_loss(torch.tensor([[[[1.0, 2.0]]], [[[0.0, 1.0]]]]), torch.zeros(2, 1, 1, 2))) == pytest.approx(3.0)


def test_sfd_trains_the_generator_and_its_fake_score_with_the_teacher_frozen(tmp_path: Path) -> None:
    from lightning_forget.callbacks import SFD

    module = tiny()
    start = {n: p.detach().clone() for n, p in module.named_parameters()}
    callback = SFD(erase=[1], batch_size=4)
    trainer = _fit(tmp_path, module, [callback], steps=2)
    assert any(not torch.equal(p, start[n]) for n, p in module.named_parameters())  # G trained
    assert any(not torch.equal(v, start[n]) for n, v in callback.fake.items())  # s trained (its own optimizer)
    assert all(not v.is_set_to(start[n]) for n, v in callback.fake.items())
    teacher = callback._get_teacher(module)
    assert all(torch.equal(teacher.weights[n], start[n]) for n in teacher.weights if n in start)
    assert {"sfd/fake_loss", "sfd/remain_loss", "sfd/forget_loss"} <= set(trainer.callback_metrics)
    labels = torch.tensor([0, 1, 2, 3])
    assert torch.equal(callback.generate(module, labels, seed=5), callback.generate(module, labels, seed=5))
    assert callback._steps(module) == (22, 2, 36)  # 440/38/712 of 1,000 steps, on T = 50
    assert callback.override_ids(module, torch.tensor([1, 3]), [0, 2], torch.Generator()).tolist() == [2, 0]
    drawn = SFD(erase=[1], override="random").override_ids(module, torch.ones(20, dtype=torch.long), [0, 2],
                                                              torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {0, 2}
    x_t = torch.randn(2, 1, 8, 8, requires_grad=True)
    eps = callback.teacher_eps_with_input_grad(module, x_t, torch.tensor([5, 9]), torch.tensor([0, 2]))
    assert torch.autograd.grad(eps.sum(), x_t)[0].abs().sum() > 0  # SiD's gradient reaches G through the teacher's input
    restored = SFD(erase=[1], batch_size=4)
    restored.load_state_dict(callback.state_dict())
    assert all(torch.equal(restored._build_fake(module)[n], v.detach()) for n, v in callback.fake.items())


def test_sfd_sharded_path_on_one_process_equals_its_unsharded_path(tmp_path: Path) -> None:
    """SFD's FSDP2 code path (the fake swapped into the module's own weights, its backward inside the swap with every
    parameter made to require gradients; the generator's gradient through both networks' input VJPs) run on plain
    parameters gives the gradients and the fake step of the direct path (the 2-process check: the sharded launch)."""
    from lightning_forget.callbacks import SFD

    class Swapping(SFD):
        def _build_fake(self, pl_module: Any) -> dict[str, torch.Tensor]:
            fake = super()._build_fake(pl_module)
            self._layout = dict(pl_module.named_parameters())  # what the sharded build keeps: the module's parameters
            return fake

    runs = []
    for cls in (SFD, Swapping):
        module, grads = tiny(), _Grads()
        # "all": the norms and the concept table stay frozen in the generator, the fake trains them (lr sized to show)
        callback = cls(erase=[1], batch_size=2, parameters="all", forget_weight=0.5, fake_forget_weight=1.0, fake_lr=1e-2)
        # The swaps write into the parameters the step's graph saved: FSDP2 regathers them at the backward (the live
        # values by then); on one process autograd keeps the saved values instead of refusing the edit.
        with torch.autograd.graph.allow_mutation_on_saved_tensors():
            _fit(tmp_path / cls.__name__, module, [callback, grads], steps=1)
        runs.append((grads.grads, {n: v.detach().clone() for n, v in callback.fake.items()}))
    (direct, fake), (swapped, swapped_fake) = runs
    frozen = {n for n, g in direct[0].items() if g is None}
    assert len(direct) == len(swapped) == 1 and not frozen
    # The generator's gradient sums the teacher's and the fake's input terms, which nearly cancel while the fake is
    # still close to the teacher: one backward and two VJPs round differently, so the check is relative to each
    # tensor's norm (a term missing or counted twice is off by O(1)).
    errors = [float((swapped[0][n] - g).norm() / g.norm()) for n, g in direct[0].items()]
    assert max(errors) < 1e-3, max(errors)
    start = dict(tiny().named_parameters())
    for name, v in fake.items():
        torch.testing.assert_close(swapped_fake[name], v, atol=1e-5, rtol=1e-4)
    moved = {n for n, v in fake.items() if not torch.equal(v, start[n].detach())}
    # the fake trains weights the generator keeps frozen: the concept table, the norms
    assert "concept_embeddings" in moved and any("norm" in n for n in moved) and len(moved) > len(fake) // 2


def test_sfd_runs_under_model_parallel_but_refuses_lora_there() -> None:
    # SFD runs sharded (tests/test_sharded_contract.py, group "sfd"); the LoRA merge is not shard-wise: refused in setup.
    from types import SimpleNamespace

    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_forget.callbacks import SFD

    trainer = SimpleNamespace(strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    SFD(erase=[1]).setup(trainer, tiny(), "validate")
    with pytest.raises(RuntimeError, match=r"SFD\(lora_rank=2\) under ModelParallelStrategy.*Fix: lora_rank=None"):
        SFD(erase=[1], lora_rank=2, parameters="attn").setup(trainer, tiny(), "validate")
    sharded = SFD(erase=[1])
    sharded.teacher = SimpleNamespace(sharded=True)  # a teacher held as shards: a graph through it cannot be kept
    with pytest.raises(RuntimeError, match=r"teacher_eps_with_input_grad under ModelParallelStrategy.*Fix"):
        sharded.teacher_eps_with_input_grad(tiny(), torch.zeros(1, 1, 8, 8), torch.tensor([3]), torch.tensor([0]))


def test_sfd_refuses_bad_arguments() -> None:
    from lightning_forget.callbacks import SFD

    with pytest.raises(ValueError, match="t_min"):
        SFD(erase=[1], t_min=0.8, t_max=0.5)
    with pytest.raises(ValueError, match="t_init"):
        SFD(erase=[1], t_init=1.0)
    with pytest.raises(TypeError, match="override"):
        SFD(erase=[1], override=[2])
    with pytest.raises(ValueError, match="fake_lr"):
        SFD(erase=[1], fake_lr=0.0)
