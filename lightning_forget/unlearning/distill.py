"""Score identity distillation losses (no Lightning), as score forgetting distillation (SFD) uses them.

Zhou et al., "Score identity Distillation" (ICML 2024) and Chen et al., "Score Forgetting
Distillation" (ICLR 2025), ``DDPM/functions/losses.py`` (``sid_sg_loss_conditional``,
``sid_g_loss_conditional``): with ``x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε`` of a generated ``x₀``,

- the fake-score network's denoising loss ``Σ_pixels (ε − ε_s(x_t, t, c))²``, mean over the batch;
- the generator's loss, per sample
  ``Σ_pixels (x̂_p − x̂_s)·((x̂_p − x₀) − α(x̂_p − x̂_s)) / ω``, ``ω = mean|x̂_p − x₀|`` (detached,
  at least 1e-5), mean over the batch, where ``x̂_p`` and ``x̂_s`` are the teacher's and the fake
  score's ``x₀``-predictions.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["fake_score_loss", "sid_generator_loss"]


def fake_score_loss(noise: Tensor, eps_fake: Tensor) -> Tensor:
    """``mean_batch Σ_pixels (ε − ε_s)²``."""
    return (noise.float() - eps_fake.float()).square().flatten(1).sum(dim=1).mean()


def sid_generator_loss(x0: Tensor, x0_teacher: Tensor, x0_fake: Tensor, alpha: float = 1.2) -> Tensor:
    """SiD's generator loss (the SFD code's ``sid_g_loss_conditional`` without ``use_diffinst``)."""
    x0, p, s = x0.float(), x0_teacher.float(), x0_fake.float()
    with torch.no_grad():
        omega = (p - x0).abs().flatten(1).mean(dim=1).clamp(min=1e-5).view(-1, *([1] * (x0.dim() - 1)))
    per_sample = ((p - s) * ((p - x0) - alpha * (p - s)) / omega).flatten(1).sum(dim=1)
    return per_sample.mean()
