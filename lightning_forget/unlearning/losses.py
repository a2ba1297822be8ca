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
    "activation_mse",
    "answer_lengths",
    "cross_entropy",
    "dpo_loss",
    "distill_kl",
    "gradient_ascent_loss",
    "graddiff_loss",
    "kl_to_reference",
    "l1_alpha",
    "l1_norm",
    "npo_loss",
    "preference_loss",
    "random_labels",
    "rmu_control_vector",
    "rmu_loss",
    "scrub_max_loss",
    "scrub_min_loss",
    "sequence_log_prob",
    "shift_for_next_token",
    "simnpo_loss",
    "token_log_probs",
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


# ---------------------------------------------------------------------------------- token level
# The language-model losses of open-unlearning (``UNLEARNING.md`` §2.1). Logits and labels are
# aligned (shift causal-LM outputs with :func:`shift_for_next_token` first); a sample's answer is
# its positions whose label is not ``-100``.


def _at_least_float32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def token_log_probs(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """Per-token ``log p(label)`` of aligned ``(B, L, V)`` logits and ``(B, L)`` labels (float32 or wider).

    Returns:
        ``(log_probs, mask)``: ``(B, L)`` log-probabilities (0 where the label is ``ignore_index``)
        and the boolean mask of the positions that count.
    """
    _flat(logits, labels)  # shape check with the shared message
    if logits.dim() != 3:
        raise ValueError(f"token-level losses need (B, L, V) logits, got shape {tuple(logits.shape)}.")
    mask = labels != ignore_index
    log_probs = F.log_softmax(_at_least_float32(logits), dim=-1)
    picked = log_probs.gather(-1, labels.long().clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def sequence_log_prob(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``(B,)`` log-probability of each sample's answer: the **sum** over its non-ignored tokens.

    open-unlearning's ``compute_batch_nll`` (negated); NPO, SimNPO and DPO compare these sums.
    """
    log_probs, _ = token_log_probs(logits, labels, ignore_index)
    return log_probs.sum(-1)


def answer_lengths(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``(B,)`` number of positions of each sample whose label counts (``|y|``)."""
    return (labels != ignore_index).sum(-1)


def _check_beta(beta: float) -> float:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}. Fix: pass a positive inverse temperature, e.g. beta=0.1.")
    return float(beta)


def preference_loss(margin: Tensor, beta: float) -> Tensor:
    """``−(2/β)·mean(log σ(β·margin))``: the shared form of NPO, SimNPO and DPO."""
    beta = _check_beta(beta)
    return -F.logsigmoid(beta * margin).mean() * 2.0 / beta


def npo_loss(log_prob: Tensor, reference_log_prob: Tensor, beta: float = 0.1) -> Tensor:
    """NPO: ``−(2/β)·mean(log σ(−β·[log π_θ(y|x) − log π_ref(y|x)]))`` over the forget samples.

    Zhang et al., "Negative Preference Optimization: From Catastrophic Collapse to Effective
    Unlearning" (COLM 2024); open-unlearning ``NPO`` (β = 0.1). ``log_prob`` and
    ``reference_log_prob`` are the ``(B,)`` answer log-probabilities **summed** over tokens
    (:func:`sequence_log_prob`); the reference's are detached. As ``β → 0`` the loss tends to
    ``(2/β)·log 2 + mean(log π_θ)``, so its gradient tends to that of gradient ascent on the
    summed NLL (the token-mean GA times the answer length).
    """
    return preference_loss(-(log_prob - reference_log_prob.detach()), beta)


def simnpo_loss(log_prob: Tensor, lengths: Tensor, beta: float = 4.5, delta: float = 0.0) -> Tensor:
    """SimNPO: ``−(2/β)·mean(log σ(β·(NLL_sum/|y| − δ)))``, length-normalised, no reference model.

    Fan et al., "Simplicity Prevails: Rethinking Negative Preference Optimization for LLM
    Unlearning" (2024); open-unlearning ``SimNPO`` (β = 4.5, δ = 0; its forget weight γ = 0.125
    multiplies this loss outside). ``lengths`` are the answers' token counts
    (:func:`answer_lengths`).
    """
    if bool((lengths <= 0).any()):
        raise ValueError(f"simnpo_loss: every sample needs an answer token, got lengths {lengths.tolist()}. "
                         "Fix: drop samples whose labels are all -100.")
    return preference_loss(-log_prob / lengths.to(log_prob.dtype) - delta, beta)


def dpo_loss(chosen_log_prob: Tensor, rejected_log_prob: Tensor, reference_chosen_log_prob: Tensor,
             reference_rejected_log_prob: Tensor, beta: float = 0.1) -> Tensor:
    """DPO: ``−(2/β)·mean(log σ(β·[(log π_θ − log π_ref)(chosen) − (log π_θ − log π_ref)(rejected)]))``.

    Rafailov et al., "Direct Preference Optimization" (NeurIPS 2023); open-unlearning ``DPO``
    (β = 0.1), which for IdkPO prefers an "I don't know" answer (chosen) to the forget answer
    (rejected). All log-probabilities are ``(B,)`` token sums; the reference's are detached.
    """
    chosen = chosen_log_prob - reference_chosen_log_prob.detach()
    rejected = rejected_log_prob - reference_rejected_log_prob.detach()
    return preference_loss(chosen - rejected, beta)


def rmu_control_vector(hidden_size: int, steering_coeff: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """RMU's fixed target ``c·u``: ``u`` uniform in ``[0, 1)^d`` scaled to unit length, shape ``(1, 1, d)``.

    Drawn on the CPU from ``generator`` (seed it identically on every rank); the official code
    draws ``torch.rand(1, 1, d)`` (uniform, not Gaussian) once per run.
    """
    if hidden_size < 1:
        raise ValueError(f"hidden_size must be >= 1, got {hidden_size!r}.")
    u = torch.rand(1, 1, int(hidden_size), generator=generator)
    return u / u.norm() * float(steering_coeff)


def activation_mse(activations: Tensor, target: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """RMU's masked MSE: per sample, the squared error meaned over the hidden dimension, summed over
    the positions whose label counts, divided by their number; then meaned over the batch.

    ``activations`` ``(B, L, d)``; ``target`` broadcastable to it (the control vector, or the
    reference model's activations, detached); ``labels`` ``(B, L)`` **unshifted** (aligned with
    the activations), as open-unlearning's ``compute_activation_loss``.
    """
    if activations.dim() != 3 or tuple(labels.shape) != tuple(activations.shape[:2]):
        raise ValueError(f"activation_mse needs (B, L, d) activations and (B, L) labels, got "
                         f"{tuple(activations.shape)} and {tuple(labels.shape)}.")
    activations = _at_least_float32(activations)
    squared = (activations - target.detach().to(activations.dtype).expand_as(activations)) ** 2
    mask = (labels != ignore_index).to(activations.dtype)
    per_sample = (squared.mean(-1) * mask).sum(-1) / mask.sum(-1)
    return per_sample.mean()


def rmu_loss(forget_activations: Tensor, control: Tensor, forget_labels: Tensor, retain_activations: Tensor,
             reference_retain_activations: Tensor, retain_labels: Tensor, gamma: float = 1.0,
             alpha: float = 1.0) -> Tensor:
    """RMU: ``γ·MSE(h_f, c·u) + α·MSE(h_r, h_r^ref)`` with :func:`activation_mse` on one layer's outputs.

    Li et al., "The WMDP Benchmark" (ICML 2024); open-unlearning ``RMU`` (``EMBED_DIFF`` retain
    loss, γ = α = 1, ``steering_coeff`` 2 in the TOFU config). ``control`` is from
    :func:`rmu_control_vector`.
    """
    forget = activation_mse(forget_activations, control, forget_labels)
    retain = activation_mse(retain_activations, reference_retain_activations, retain_labels)
    return gamma * forget + alpha * retain
