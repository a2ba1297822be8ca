"""Unlearning losses as plain functions (no Lightning): classifier- and token-level.

Every function takes logits and labels in one of two layouts:

- classifier: ``logits`` ``(N, C)``, ``target`` ``(N,)`` class ids;
- token-level (causal LMs): ``logits`` ``(B, L, V)``, ``target`` ``(B, L)`` token ids already
  aligned with the logits (shift them first with :func:`shift_for_next_token`), ``-100`` at
  positions to ignore, as Hugging Face models do.

The cross-entropy is the mean over the positions that count (Hugging Face's token mean), so
:func:`gradient_ascent_loss` is open-unlearning's ``−NLL(forget)`` for LMs and Unlearn-Sparse's
``−CE(forget)`` for classifiers. Sources and defaults: ``UNLEARNING.md`` §2.1 and §2.3.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "IGNORE_INDEX",
    "cross_entropy",
    "distill_kl",
    "gradient_ascent_loss",
    "graddiff_loss",
    "kl_to_reference",
    "l1_alpha",
    "l1_norm",
    "random_labels",
    "scrub_max_loss",
    "scrub_min_loss",
    "shift_for_next_token",
]

#: Label of positions that do not count (Hugging Face's convention).
IGNORE_INDEX = -100


def shift_for_next_token(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Align a causal LM's ``(B, L, V)`` logits with its ``(B, L)`` labels: position ``t`` predicts ``t + 1``."""
    return logits[:, :-1, :], labels[:, 1:]


def _flat(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    if logits.dim() == target.dim() + 1 and logits.shape[:-1] == target.shape:
        return logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
    raise ValueError(
        f"logits of shape {tuple(logits.shape)} and labels of shape {tuple(target.shape)} do not match: pass "
        "(N, C) logits with (N,) labels, or (B, L, V) logits with (B, L) labels (shift causal-LM labels first)."
    )


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean cross-entropy over the samples (or tokens) whose label is not ``ignore_index``; in float32."""
    flat_logits, flat_target = _flat(logits, target)
    return F.cross_entropy(flat_logits.float(), flat_target.long(), ignore_index=ignore_index)


def gradient_ascent_loss(logits: Tensor, target: Tensor, bound: Optional[float] = None) -> Tensor:
    """Gradient ascent (NegGrad): ``−CE(forget)``; with ``bound``, GS-LoRA's ``ReLU(bound − CE)``
    (no gradient once the forget CE passes ``bound``)."""
    ce = cross_entropy(logits, target)
    return F.relu(bound - ce) if bound is not None else -ce


def graddiff_loss(forget_logits: Tensor, forget_target: Tensor, retain_loss: Tensor, gamma: float = 1.0,
                  alpha: float = 1.0) -> Tensor:
    """GradDiff: ``γ·(−CE(forget)) + α·retain_loss`` (open-unlearning's defaults ``γ = α = 1``)."""
    return gamma * gradient_ascent_loss(forget_logits, forget_target) + alpha * retain_loss


def kl_to_reference(logits: Tensor, reference_logits: Tensor) -> Tensor:
    """``KL(p_ref ‖ p_θ)`` summed over classes (and positions) and divided by the batch size (``batchmean``).

    open-unlearning's GradDiff/NPO ``KL`` retain loss: every position counts (no label mask);
    ``reference_logits`` are detached.
    """
    log_p = F.log_softmax(logits.float(), dim=-1)
    log_ref = F.log_softmax(reference_logits.detach().float(), dim=-1)
    return (log_ref.exp() * (log_ref - log_p)).sum() / logits.shape[0]


def distill_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """SCRUB's ``DistillKL``: ``KL(softmax(t/T) ‖ softmax(s/T))·T²`` summed, divided by the batch size.

    For token-level logits the batch size is ``B`` (the first dimension), as the original divides
    by its first dimension; the teacher is detached.
    """
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum() * temperature**2 / student_logits.shape[0]


def scrub_max_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """SCRUB's max step on forget data: ``−KL_T(teacher ‖ student)`` (move away from the teacher)."""
    return -distill_kl(student_logits, teacher_logits, temperature)


def scrub_min_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: float = 4.0,
                   gamma: float = 0.99, alpha: float = 0.001) -> Tensor:
    """SCRUB's min step on retained data: ``γ·CE + α·KL_T(teacher ‖ student)`` (large-scale defaults)."""
    return gamma * cross_entropy(student_logits, target) + alpha * distill_kl(student_logits, teacher_logits, temperature)


def random_labels(target: Tensor, num_classes: int, generator: Optional[torch.Generator] = None,
                  exclude_true: bool = False) -> Tensor:
    """Uniformly random labels for ``target`` (drawn on the CPU from ``generator``).

    ``exclude_true=False`` draws from all ``num_classes`` (SalUn's ``RL.py``); ``True`` draws from
    the other ``num_classes − 1`` classes only. Ignored positions (``-100``) stay ignored.
    """
    if num_classes < 2:
        raise ValueError(f"random_labels needs num_classes >= 2, got {num_classes}.")
    cpu = target.detach().cpu().long()
    if exclude_true:
        offset = torch.randint(1, num_classes, cpu.shape, generator=generator)
        drawn = (cpu.clamp_min(0) + offset) % num_classes
    else:
        drawn = torch.randint(0, num_classes, cpu.shape, generator=generator)
    drawn = torch.where(cpu == IGNORE_INDEX, cpu, drawn)
    return drawn.to(target.device)


def l1_norm(parameters: Iterable[Tensor]) -> Tensor:
    """``‖θ‖₁`` over all ``parameters`` (the ℓ1-sparse penalty, unweighted)."""
    total: Optional[Tensor] = None
    for p in parameters:
        value = p.abs().sum()
        total = value if total is None else total + value
    return total if total is not None else torch.zeros(())


def l1_alpha(alpha: float, epoch: int, epochs: int, no_l1_epochs: int = 0) -> float:
    """The ℓ1-sparse weight of ``epoch`` (0-based): ``α·(1 − epoch/(epochs − no_l1_epochs))``, 0 after.

    Unlearn-Sparse's linear decay; the last ``no_l1_epochs`` epochs have no penalty.
    """
    active = epochs - no_l1_epochs
    if active <= 0 or epoch >= active:
        return 0.0
    return float(alpha) * (1.0 - epoch / active)
