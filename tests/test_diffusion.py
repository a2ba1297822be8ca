"""DiffusionModule: training draws, sampling, EMA, save/load, the DDIM sampler."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_forget.modules import DiffusionModule
from lightning_forget.modules.diffusion import ddim_sample, digits_data, guided_eps
from tests.helpers.diffusion import TINY_UNET, tiny_diffusion


def _fit(module: DiffusionModule, tmp_path: Any, steps: int = 2, **kwargs: Any) -> pl.Trainer:
    x, y = digits_data()
    loader = DataLoader(TensorDataset(x[:32], y[:32] % module.num_classes), batch_size=8)
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path), **kwargs)
    trainer.fit(module, loader)
    return trainer


@pytest.mark.parametrize("unet", ["conditional", "class"])
def test_sampling_is_deterministic_for_a_seed_and_batching(unet: str) -> None:
    torch.manual_seed(0)
    module = tiny_diffusion(unet=unet)
    labels = torch.tensor([0, 1, 2, 3])
    a = module.sample(labels, seed=5)
    torch.rand(10)  # the global RNG does not matter
    b = module.sample([0, 1, "2", "3"], seed=5, batch_size=3)
    c = module.sample(labels, seed=6)
    assert a.shape == (4, 1, 8, 8)
    assert torch.equal(a, module.sample(labels, seed=5))
    assert torch.allclose(a, b, atol=1e-5)  # batches of 3 + 1: the same samples up to float reassociation
    assert not torch.allclose(a, c)
    # per-sample noise by index does not depend on which other samples are drawn with it
    assert torch.equal(module.initial_noise(2, 3, indices=[4, 7])[1], module.initial_noise(1, 3, indices=[7])[0])


def test_ddim_sampler_matches_a_hand_written_ddim_loop() -> None:
    torch.manual_seed(0)
    module = tiny_diffusion().eval()
    labels = torch.tensor([1, 4])
    noise = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        x, t = ddim_sample(module.eps, module.noise_scheduler, labels, noise, module.null_label, num_steps=3, guidance_scale=2.0)
    # by hand: timesteps 49//... with "leading" spacing (50 train steps / 3 = 16): 32, 16, 0
    abar = module.noise_scheduler.alphas_cumprod
    y = noise
    steps = [32, 16, 0]
    with torch.no_grad():
        for i, step in enumerate(steps):
            tt = torch.full((2,), step)
            cond = module.eps(y, tt, labels)
            uncond = module.eps(y, tt, torch.full_like(labels, module.null_label))
            eps = uncond + 2.0 * (cond - uncond)
            x0 = ((y - (1 - abar[step]).sqrt() * eps) / abar[step].sqrt()).clamp(-1, 1)  # clip_sample (diffusers default)
            prev = abar[steps[i + 1]] if i + 1 < len(steps) else torch.tensor(1.0)
            y = prev.sqrt() * x0 + (1 - prev).sqrt() * eps
    assert torch.allclose(x, y, atol=1e-5)
    assert t.tolist() == [-1, -1]
    partial, t_partial = ddim_sample(module.eps, module.noise_scheduler, labels, noise, module.null_label, 3, 2.0, stop_after=1)
    assert t_partial.tolist() == [16, 16]
    assert guided_eps(module.eps, noise, torch.full((2,), 32), labels, module.null_label, 1.0).shape == noise.shape


def test_training_draws_do_not_depend_on_the_global_rng_and_label_dropout_uses_the_null(tmp_path: Any) -> None:
    finals = []
    for global_seed in (0, 1):
        torch.manual_seed(3)
        module = tiny_diffusion(label_dropout=0.5)
        pl.seed_everything(global_seed)
        _fit(module, tmp_path, steps=2)
        finals.append(torch.cat([p.detach().flatten() for p in module.parameters()]))
    assert torch.equal(finals[0], finals[1])
    seen = []
    module = tiny_diffusion(label_dropout=0.5)
    original = module.eps
    module.eps = lambda x, t, labels: (seen.append(labels.clone()), original(x, t, labels))[1]  # type: ignore[method-assign]
    _fit(module, tmp_path, steps=1)
    assert (seen[0] == module.null_label).any() and (seen[0] != module.null_label).any()


def test_ema_is_checkpointed_swapped_in_and_applied(tmp_path: Any) -> None:
    torch.manual_seed(0)
    module = tiny_diffusion(ema_decay=0.5)
    trainer = _fit(module, tmp_path, steps=3)
    live = {n: p.detach().clone() for n, p in module.named_parameters()}
    ema = {n: v.clone() for n, v in module._ema.items()}
    assert any(not torch.equal(live[n], ema[n]) for n in live)
    with module.ema_weights():
        assert all(torch.equal(p, ema[n]) for n, p in module.named_parameters())
    assert all(torch.equal(p, live[n]) for n, p in module.named_parameters())
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    restored = DiffusionModule.load_from_checkpoint(path)
    assert all(torch.equal(restored._ema[n], ema[n]) for n in ema)
    module.apply_ema()
    assert all(torch.equal(p, ema[n]) for n, p in module.named_parameters()) and module._ema is None


@pytest.mark.parametrize("unet", ["conditional", "class"])
def test_save_pretrained_round_trip_gives_the_same_model(unet: str, tmp_path: Any) -> None:
    torch.manual_seed(0)
    module = tiny_diffusion(unet=unet, concepts=["a", "b", "c", "d", "e", "f"])
    module.save_pretrained(str(tmp_path / "model"))
    loaded = DiffusionModule(unet=unet, preset=None, pretrained_path=str(tmp_path / "model"))
    assert loaded.concepts == module.concepts and loaded.concept_index("c") == 2
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 40]), torch.tensor([2, 6])
    with torch.no_grad():
        assert torch.allclose(module.eps(x, t, y), loaded.eps(x, t, y))


def test_bad_arguments_name_the_argument(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="unet"):
        DiffusionModule(unet="transformer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="preset"):
        DiffusionModule(preset=None)
    with pytest.raises(ValueError, match="label_dropout"):
        DiffusionModule(label_dropout=1.0)
    with pytest.raises(ValueError, match="block_out_channels"):
        DiffusionModule(block_out_channels=(10, 20))
    with pytest.raises(ValueError, match="concepts"):
        DiffusionModule(concepts=["a", "a"] + [str(i) for i in range(8)])
    with pytest.raises(ValueError, match="pretrained_path"):
        DiffusionModule(pretrained_path=str(tmp_path / "missing"))
    module = tiny_diffusion()
    with pytest.raises(ValueError, match="concept"):
        module.concept_index(9)
    with pytest.raises(TypeError, match="DiffusionModule expects batches"):
        module.split_batch(torch.zeros(3))
    assert TINY_UNET["sample_size"] == 8
