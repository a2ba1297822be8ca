"""Language-model unlearning metrics as pure functions, as open-unlearning computes them.

Sources and exact definitions: ``UNLEARNING.md`` §2.2 (open-unlearning ``src/evals/metrics``).
Nothing here knows Lightning; the per-sample statistics are plain tensors, so a distributed
evaluation gathers them (and drops the samples a ``DistributedSampler`` repeats, with
:func:`deduplicate_by_index`) before any global statistic (KS test, ROC AUC).

Conventions: ``logits`` ``(B, L, V)`` and ``labels`` ``(B, L)`` are aligned (shift a causal LM's
outputs with :func:`~lightning_forget.unlearning.losses.shift_for_next_token` first); a sample's
answer is its positions whose label is not ``-100``. The answer length ``|y|`` is the number of
those positions (open-unlearning counts the unshifted labels, the same number whenever the first
label is masked, as a question's is).

Token-wise statistics (exact memorisation, extraction strength, Min-K, Min-K++, GradNorm) are
computed by open-unlearning on every answer position **but the last** (``tokenwise_logprobs``
drops "the EOS prediction"): pass them :func:`tokenwise_labels` ``(labels)`` for that; the
probability, LOSS and ZLib use every answer position.

Per sample: :func:`average_nll`, :func:`answer_probability`, :func:`exact_memorization`,
:func:`extraction_strength`, :func:`rouge_l_recall`, the MIA scores (:func:`loss_score`,
:func:`zlib_score`, :func:`min_k_score`, :func:`min_k_plus_plus_score`,
:func:`reference_score`). Across samples: :func:`truth_ratio` with its aggregators,
:func:`normalised_probability`, :func:`forget_quality`, :func:`model_utility`,
:func:`membership_auc`, :func:`privacy_leakage`.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Sequence
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_forget.metrics.unlearning import roc_auc
from lightning_forget.unlearning.losses import IGNORE_INDEX, answer_lengths, token_log_probs

__all__ = [
    "answer_probability",
    "average_nll",
    "deduplicate_by_index",
    "exact_memorization",
    "extraction_strength",
    "forget_quality",
    "gradnorm_score",
    "loss_score",
    "membership_auc",
    "min_k_plus_plus_score",
    "min_k_score",
    "model_utility",
    "normalised_probability",
    "privacy_leakage",
    "reference_score",
    "rouge_l_recall",
    "tokenwise_labels",
    "truth_ratio",
    "truth_ratio_score",
    "zlib_score",
]

_EPS = 1e-10  # open-unlearning's guard in every ratio


def _lengths(labels: Tensor) -> Tensor:
    lengths = answer_lengths(labels)
    if bool((lengths == 0).any()):
        raise ValueError(
            f"every sample needs at least one answer token (label != -100), got answer lengths {lengths.tolist()}. "
            "Fix: drop samples whose labels are all -100 (a question cut off by the block size)."
        )
    return lengths


# ---------------------------------------------------------------------------------- per sample
def average_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """``(B,)`` mean negative log-likelihood of each answer's tokens (open-unlearning's ``avg_loss``)."""
    log_probs, _ = token_log_probs(logits.detach(), labels)
    return -log_probs.sum(-1) / _lengths(labels)


def answer_probability(logits: Tensor, labels: Tensor) -> Tensor:
    """``(B,)`` ``exp(−avg_loss)``: the geometric mean of the answer tokens' probabilities (``probability``)."""
    return torch.exp(-average_nll(logits, labels))


def _answer_predictions(logits: Tensor, labels: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Per sample, the teacher-forced argmax and the labels at the answer positions."""
    predictions = logits.detach().argmax(-1)
    mask = labels != IGNORE_INDEX
    return [(predictions[i][mask[i]], labels[i][mask[i]]) for i in range(labels.shape[0])]


def exact_memorization(logits: Tensor, labels: Tensor) -> Tensor:
    """``(B,)`` share of answer positions where the teacher-forced argmax is the label (``exact_memorization``)."""
    _lengths(labels)
    return torch.tensor([float((p == y).float().mean()) for p, y in _answer_predictions(logits, labels)])


def extraction_strength(logits: Tensor, labels: Tensor) -> Tensor:
    """``(B,)`` ``1 − k/n``, ``k`` the first answer position from which every argmax prediction matches.

    As open-unlearning's loop: ``k`` runs over ``0..n−1`` and stops at the first matching suffix;
    when none matches (not even the last token) ``k`` stays ``n − 1``, so the score is at least
    ``1/n`` (the official code's value, kept).
    """
    _lengths(labels)
    scores = []
    for predictions, target in _answer_predictions(logits, labels):
        n = int(target.numel())
        k = n - 1
        for start in range(n):
            if torch.equal(predictions[start:], target[start:]):
                k = start
                break
        scores.append(1.0 - k / n)
    return torch.tensor(scores)


_ROUGE_TOKEN = re.compile(r"[^a-z0-9]+")


def _rouge_tokens(text: str) -> list[str]:
    return [t for t in _ROUGE_TOKEN.sub(" ", text.lower()).split() if t]


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_recall(prediction: str, reference: str) -> float:
    """ROUGE-L recall: ``LCS(prediction, reference) / |reference|`` in tokens (TOFU's ``rougeL_recall``).

    Tokens as ``rouge_score``'s default tokenizer makes them: lower-cased, split on every
    character outside ``[a-z0-9]``. Deviation: open-unlearning passes ``use_stemmer=True``
    (Porter stemming of tokens longer than three characters), which needs ``nltk``/``rouge_score``
    that this library does not depend on; here tokens are not stemmed (``docs/fidelity.md``).
    An empty reference scores 0.
    """
    ref = _rouge_tokens(reference)
    if not ref:
        return 0.0
    return _lcs_length(_rouge_tokens(prediction), ref) / len(ref)


def tokenwise_labels(labels: Tensor) -> Tensor:
    """``labels`` with each sample's **last** answer position set to ``-100``.

    open-unlearning's ``tokenwise_logprobs``/``tokenwise_vocab_logprobs`` (used by exact
    memorisation, extraction strength, Min-K, Min-K++ and GradNorm) keep the answer positions
    but the last one ("-1 to ignore eos prediction"); with aligned (shifted) labels this mask
    gives the same positions.
    """
    mask = labels != IGNORE_INDEX
    positions = torch.arange(labels.shape[-1], device=labels.device).expand_as(labels)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).max(-1, keepdim=True).values
    return labels.masked_fill(positions == last, IGNORE_INDEX)


# ---------------------------------------------------------------------------------- MIA scores
# Every score is signed like a loss: higher means "less likely a member".
def loss_score(avg_nll: Tensor) -> Tensor:
    """LOSS attack: the sample's ``avg_loss``."""
    return avg_nll


def zlib_score(avg_nll: Tensor, texts: Sequence[str]) -> Tensor:
    """ZLib attack: ``avg_loss / len(zlib.compress(answer_text.encode("utf-8")))``."""
    if len(texts) != int(avg_nll.numel()):
        raise ValueError(f"zlib_score needs one text per sample, got {len(texts)} texts for {avg_nll.numel()} losses.")
    sizes = torch.tensor([len(zlib.compress(t.encode("utf-8"))) for t in texts], dtype=avg_nll.dtype)
    return avg_nll / sizes.to(avg_nll.device)


def _check_k(k: float) -> float:
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k!r}. Fix: pass the share of lowest tokens, e.g. k=0.4.")
    return float(k)


def _lowest_k_mean(values: Tensor, k: float) -> float:
    count = max(1, int(values.numel() * k))
    return float(torch.sort(values).values[:count].mean())


def min_k_score(logits: Tensor, labels: Tensor, k: float = 0.4) -> Tensor:
    """Min-K% Prob: ``−mean`` of the lowest ``max(1, ⌊k·n⌋)`` answer-token log-probabilities (k = 0.4 in TOFU)."""
    k = _check_k(k)
    _lengths(labels)
    log_probs, mask = token_log_probs(logits.detach(), labels)
    return torch.tensor([-_lowest_k_mean(log_probs[i][mask[i]], k) for i in range(labels.shape[0])])


def min_k_plus_plus_score(logits: Tensor, labels: Tensor, k: float = 0.4) -> Tensor:
    """Min-K%++: Min-K% of the token log-probabilities standardised by the model's own distribution.

    At each answer position, ``z = (log p(y) − μ)/σ`` with ``μ = Σ_v p_v log p_v`` and
    ``σ² = Σ_v p_v (log p_v)² − μ²`` (clamped at 1e-6, as open-unlearning); the score is
    ``−mean`` of the lowest ``max(1, ⌊k·n⌋)`` values of ``z``.
    """
    k = _check_k(k)
    _lengths(labels)
    vocab_log_probs = F.log_softmax(logits.detach().to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    probs = vocab_log_probs.exp()
    mu = (probs * vocab_log_probs).sum(-1)
    variance = ((probs * vocab_log_probs.square()).sum(-1) - mu.square()).clamp_min(1e-6)
    log_probs, mask = token_log_probs(logits.detach(), labels)
    z = (log_probs - mu) / variance.sqrt()
    return torch.tensor([-_lowest_k_mean(z[i][mask[i]], k) for i in range(labels.shape[0])])


def gradnorm_score(model: torch.nn.Module, input_ids: Tensor, labels: Tensor,
                   attention_mask: Optional[Tensor] = None, p: float = 2.0,
                   parameters: Optional[Sequence[Tensor]] = None) -> Tensor:
    """GradNorm attack: ``(B,)`` mean over parameter tensors of ``‖∇_θ loss_i‖_p`` for each sample ``i``.

    As open-unlearning's ``GradNormAttack``: ``loss_i`` is minus the mean of sample ``i``'s
    token log-probabilities over its answer positions but the last (pass **unshifted** labels;
    the causal shift and :func:`tokenwise_labels` are applied here), each sample's gradient is
    taken alone, and the score is the mean over the parameter tensors that get a gradient of
    their ``p``-norm (p = 2 in TOFU and MUSE; 1, 2 or ``inf``). Larger means "less likely a
    member", like a loss.

    The batch is forwarded **once** (the official code forwards one sample per batch) and each
    sample's gradient is taken from that graph with ``torch.autograd.grad``, which gives the
    same per-sample gradient (padding is masked) and, unlike the official code, leaves the
    model's ``.grad`` untouched. ``model`` runs in the mode it is in (the official code switches
    to train mode, which only matters with dropout); call it in eval mode for a deterministic
    score.

    Args:
        model: a causal LM called as ``model(input_ids=..., attention_mask=...)`` returning
            logits or an object with ``.logits``.
        input_ids: ``(B, L)`` token ids.
        labels: ``(B, L)`` unshifted labels, ``-100`` off the answer.
        attention_mask: ``(B, L)`` or ``None``.
        p: the norm, 1, 2 or ``float("inf")``.
        parameters: the tensors to differentiate (default: every parameter that requires grad).
    """
    if p not in (1, 2, float("inf")):
        raise ValueError(f"p must be 1, 2 or inf, got {p!r}. Fix: pass p=2 (TOFU, MUSE).")
    params = [q for q in (parameters if parameters is not None else model.parameters()) if q.requires_grad]
    if not params:
        raise ValueError(GRADNORM_NO_PARAMETERS)
    with torch.enable_grad():
        losses = gradnorm_losses(model, input_ids, labels, attention_mask)
        scores = []
        for i in range(losses.shape[0]):
            grads = torch.autograd.grad(losses[i], params, retain_graph=i + 1 < losses.shape[0], allow_unused=True)
            norms = [g.detach().to(torch.promote_types(g.dtype, torch.float32)).norm(p=p) for g in grads if g is not None]
            scores.append(torch.stack([n.double() for n in norms]).mean())
    return torch.stack(scores).detach()


GRADNORM_NO_PARAMETERS = ("gradnorm_score needs parameters that require grad, got none. "
                          "Fix: pass `parameters=` or unfreeze the model (or skip the GradNorm attack).")


def gradnorm_losses(model: torch.nn.Module, input_ids: Tensor, labels: Tensor,
                    attention_mask: Optional[Tensor] = None) -> Tensor:
    """The ``(B,)`` losses :func:`gradnorm_score` differentiates (one forward, with the graph)."""
    targets = tokenwise_labels(labels[:, 1:])
    _lengths(targets)
    output = model(input_ids=input_ids, attention_mask=attention_mask)
    logits = getattr(output, "logits", output)[:, :-1, :]
    log_probs, mask = token_log_probs(logits, targets)
    return -log_probs.sum(-1) / mask.sum(-1)


def reference_score(avg_nll: Tensor, reference_avg_nll: Tensor) -> Tensor:
    """Reference attack: ``avg_loss(target) − avg_loss(reference)`` (e.g. the retain model).

    In float64: two float32 losses of similar size subtract to values whose float32 rounding ties
    samples the attack should rank apart (an untrained reference gives ≈ ln V for every sample)."""
    return avg_nll.double() - reference_avg_nll.double()


def membership_auc(forget_scores: Tensor, holdout_scores: Tensor) -> float:
    """ROC AUC with labels forget = 0, holdout = 1 on loss-like scores (open-unlearning's ``mia_auc``).

    About 1 when the forget data are far more likely than the held-out data (still memorised),
    0.5 when the attack cannot tell them apart.
    """
    return roc_auc(holdout_scores, forget_scores)


def privacy_leakage(auc: float, retain_auc: float = 0.5) -> float:
    """``privleak``: ``((1 − auc) − (1 − retain_auc)) / (1 − retain_auc) × 100``; 0 is ideal.

    ``auc`` is the unlearned model's Min-K AUC (:func:`membership_auc`), ``retain_auc`` the retain
    model's (open-unlearning falls back to 0.5 without retain logs).
    """
    score, ref = 1.0 - float(auc), 1.0 - float(retain_auc)
    return (score - ref) / (ref + _EPS) * 100.0


# ---------------------------------------------------------------------------------- across samples
def normalised_probability(correct_probability: Tensor, wrong_probabilities: Tensor) -> Tensor:
    """``(N,)`` ``p_correct / (p_correct + Σ p_wrong)`` (``probability_w_options``).

    ``wrong_probabilities`` is ``(N,)`` or ``(N, K)`` (``K`` wrong answers per question).
    """
    wrong = wrong_probabilities.reshape(wrong_probabilities.shape[0], -1).sum(-1)
    return correct_probability / (correct_probability + wrong + _EPS)


def truth_ratio(correct_avg_nll: Tensor, wrong_avg_nll: Tensor) -> Tensor:
    """``(N,)`` Truth Ratio ``exp(−mean_k avg_loss_wrong) / exp(−avg_loss_correct)``.

    ``correct_avg_nll`` ``(N,)``: the paraphrased answers' ``avg_loss``; ``wrong_avg_nll`` ``(N,)``
    or ``(N, K)``: the perturbed answers', averaged over ``K`` first (a geometric mean of
    probabilities).
    """
    wrong = wrong_avg_nll.reshape(wrong_avg_nll.shape[0], -1).mean(-1)
    return torch.exp(-wrong) / (torch.exp(-correct_avg_nll) + _EPS)


def truth_ratio_score(ratios: Tensor, aggregator: Literal["closer_to_1_better", "true_better"]) -> float:
    """Aggregate Truth Ratios: ``"closer_to_1_better"`` (forget split) = ``mean(min(TR, 1/TR))``;
    ``"true_better"`` (retain, world facts) = ``mean(max(0, 1 − TR))``."""
    ratios = torch.as_tensor(ratios, dtype=torch.float64)
    if aggregator == "closer_to_1_better":
        return float(torch.minimum(ratios, 1.0 / (ratios + _EPS)).mean())
    if aggregator == "true_better":
        return float((1.0 - ratios).clamp_min(0.0).mean())
    raise ValueError(f"aggregator must be 'closer_to_1_better' or 'true_better', got {aggregator!r}.")


def forget_quality(ratios: Tensor, retain_model_ratios: Tensor) -> float:
    """Forget quality: the two-sample KS-test p-value of the forget-set Truth Ratios of the
    unlearned model against the retain model's (``ks_test``; ``scipy.stats.ks_2samp``)."""
    from scipy.stats import ks_2samp

    a = torch.as_tensor(ratios, dtype=torch.float64).flatten().cpu().numpy()
    b = torch.as_tensor(retain_model_ratios, dtype=torch.float64).flatten().cpu().numpy()
    if a.size == 0 or b.size == 0:
        raise ValueError(f"forget_quality needs Truth Ratios of both models, got {a.size} and {b.size} values.")
    return float(ks_2samp(a, b).pvalue)


def model_utility(values: Sequence[float]) -> float:
    """Model utility: the harmonic mean of the utility scores (``hm_aggregate``; TOFU has nine:
    probability, ROUGE and Truth Ratio on retain, real-author and world-fact data). 0 if any is 0."""
    scores = [float(v) for v in values]
    if not scores or any(not math.isfinite(v) or v < 0 for v in scores):
        raise ValueError(f"model_utility needs non-negative finite scores, got {scores}.")
    if any(v == 0 for v in scores):
        return 0.0
    return len(scores) / sum(1.0 / v for v in scores)


def deduplicate_by_index(indices: Tensor, *values: Tensor) -> tuple[Tensor, ...]:
    """Keep the first occurrence of each sample index (sorted by index) in ``indices`` and ``values``.

    A ``DistributedSampler`` pads the last batch by repeating samples; gather per-sample
    statistics with their dataset indices and call this before any global statistic.
    """
    indices = torch.as_tensor(indices).flatten()
    unique, inverse = torch.unique(indices, sorted=True, return_inverse=True)
    positions = torch.arange(indices.numel(), device=indices.device)
    first = torch.full((unique.numel(),), indices.numel(), dtype=torch.long, device=indices.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    for v in values:
        if v.shape[0] != indices.numel():
            raise ValueError(f"deduplicate_by_index: {v.shape[0]} values for {indices.numel()} indices.")
    return (unique, *(v[first] for v in values))
