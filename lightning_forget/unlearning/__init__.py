"""The shared machinery of the unlearning methods, usable without Lightning.

- :mod:`~lightning_forget.unlearning.losses`: every method's loss as a plain function of logits
  (classifier ``(N, C)`` logits with ``(N,)`` labels, or token-level ``(B, L, V)`` logits with
  ``(B, L)`` labels where ``-100`` marks positions to ignore).
- :mod:`~lightning_forget.unlearning.reference`: the frozen reference (teacher) model: the module
  with its PEFT adapters disabled when it has LoRA adapters, otherwise a frozen copy (optionally
  kept on the CPU).
- :mod:`~lightning_forget.unlearning.saliency`: SalUn's weight-saliency mask as a composable piece.
- :mod:`~lightning_forget.unlearning.surgery`: DoCo's concept-preserving gradient (per-tensor
  gradient surgery between an unlearning and a preservation gradient), DDP- and accumulation-safe.
- :mod:`~lightning_forget.unlearning.sweep`: a small grid search that picks the setting closest
  to retraining.
"""

from lightning_forget.unlearning.losses import (
    activation_mse,
    answer_lengths,
    cross_entropy,
    dpo_loss,
    distill_kl,
    gradient_ascent_loss,
    graddiff_loss,
    kl_to_reference,
    l1_alpha,
    l1_norm,
    npo_loss,
    random_labels,
    rmu_control_vector,
    rmu_loss,
    scrub_max_loss,
    scrub_min_loss,
    sequence_log_prob,
    simnpo_loss,
    token_log_probs,
)
from lightning_forget.unlearning.reference import ReferenceModel
from lightning_forget.unlearning.saliency import SaliencyMask
from lightning_forget.unlearning.surgery import GradientSurgery, concept_preserving_gradient

__all__ = [
    "GradientSurgery",
    "ReferenceModel",
    "SaliencyMask",
    "activation_mse",
    "answer_lengths",
    "concept_preserving_gradient",
    "cross_entropy",
    "dpo_loss",
    "distill_kl",
    "gradient_ascent_loss",
    "graddiff_loss",
    "kl_to_reference",
    "l1_alpha",
    "l1_norm",
    "npo_loss",
    "random_labels",
    "rmu_control_vector",
    "rmu_loss",
    "scrub_max_loss",
    "scrub_min_loss",
    "sequence_log_prob",
    "simnpo_loss",
    "token_log_probs",
]
