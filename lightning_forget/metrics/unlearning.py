"""Unlearning metrics: forget / retain / old-class accuracy, H-mean, membership inference.

Pure functions first (no Lightning, no torchmetrics state), then two thin DDP-synced torchmetrics:

- :func:`h_mean` — GS-LoRA's harmonic mean of the forgetting achieved and the accuracy kept:
  ``H = 2·Drop·Acc_r / (Drop + Acc_r)`` with ``Drop = Acc_f(before) − Acc_f(after)`` (Zhao et al.,
  "Continual Forgetting for Pre-trained Vision Models", CVPR 2024). ``H = 0`` when both are 0.
- :func:`roc_auc` — area under the ROC curve of a score separating positives from negatives,
  computed exactly from ranks (the Mann–Whitney statistic, ties counted one half), the same value
  as ``sklearn.metrics.roc_auc_score``.
- :func:`membership_scores` — a per-sample membership score of a classifier's outputs: the
  negative cross-entropy loss (``"loss"``) or the probability of the true class
  (``"confidence"``). Members (training samples) tend to score higher.
- :func:`mia_auc` — the loss/confidence-threshold attack's AUC between forget samples (treated as
  "members") and held-out samples (non-members): 0.5 means the attacker cannot tell the forget
  set from data the model never saw (the goal of unlearning); 1.0 means it still can.
- :func:`mia_efficacy` — "MIA-efficacy" (Jia et al., "Model Sparsity Can Simplify Machine
  Unlearning", NeurIPS 2023): a threshold attack is fitted on retain samples (members) against
  held-out samples (non-members) — the threshold maximising the attack's balanced accuracy — and
  the metric is the fraction of forget samples it classifies as non-members (higher = more
  forgotten). The original uses a confidence-based SVM attack; a single threshold on the same
  score is the one-feature case.

Metric classes:

- :class:`ForgetRetainAccuracy` — per-class correct/total counters (``dist_reduce_fx="sum"``),
  so the accuracy on any class subset (forget, retain, previously forgotten) is exact under DDP;
  :meth:`ForgetRetainAccuracy.compute` returns ``acc_f``, ``acc_r``, ``acc_o`` and ``h_mean``
  for the class sets and the pre-task forget accuracy set on it.
- :class:`MembershipInference` — gathers membership scores of ``"forget"``, ``"retain"`` and
  ``"heldout"`` samples (``dist_reduce_fx="cat"``) and computes :func:`mia_auc` and
  :func:`mia_efficacy`. Usable with any classifier.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_forget.validation import check_choice, check_int

__all__ = [
    "ForgetRetainAccuracy",
    "MembershipInference",
    "avg_gap",
    "h_mean",
    "mia_efficacy_svc",
    "membership_scores",
    "mia_auc",
    "mia_efficacy",
    "roc_auc",
]

ScoreKind = Literal["loss", "confidence"]
_SPLITS = ("forget", "retain", "heldout")


def h_mean(acc_f_before: float, acc_f: float, acc_r: float) -> float:
    """GS-LoRA's H-mean of the forgetting ``Drop = acc_f_before − acc_f`` and ``acc_r``.

    Args:
        acc_f_before: accuracy on the forget classes before the forgetting task.
        acc_f: accuracy on the forget classes after it.
        acc_r: accuracy on the retained classes after it.

    Returns:
        ``2·Drop·acc_r / (Drop + acc_r)``; ``0.0`` when ``Drop + acc_r == 0``. A negative
        ``Drop`` (the forget accuracy went *up*) is kept as is, as the formula has it.
    """
    drop = float(acc_f_before) - float(acc_f)
    denominator = drop + float(acc_r)
    if denominator == 0:
        return 0.0
    return 2.0 * drop * float(acc_r) / denominator


def roc_auc(positive: Tensor, negative: Tensor) -> float:
    """Area under the ROC curve of scores ``positive`` (label 1) against ``negative`` (label 0).

    Exact: ``P(score_pos > score_neg) + ½·P(equal)`` over all pairs, from average ranks.

    Raises:
        ValueError: either set is empty.
    """
    positive = torch.as_tensor(positive, dtype=torch.float64).flatten()
    negative = torch.as_tensor(negative, dtype=torch.float64).flatten()
    if positive.numel() == 0 or negative.numel() == 0:
        raise ValueError(
            f"roc_auc needs at least one positive and one negative score, got {positive.numel()} and "
            f"{negative.numel()}. Fix: evaluate both sample sets before computing the AUC."
        )
    scores = torch.cat([positive, negative])
    order = torch.argsort(scores, stable=True)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    # average ranks (1-based) over runs of equal scores
    unique, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    average = ends - (counts.to(torch.float64) - 1) / 2
    ranks[order] = average[inverse]
    n_pos, n_neg = positive.numel(), negative.numel()
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def membership_scores(logits: Tensor, target: Tensor, kind: ScoreKind = "loss") -> Tensor:
    """Per-sample membership score of a classifier's ``logits`` for labels ``target``.

    Args:
        logits: ``(N, C)`` outputs.
        target: ``(N,)`` class ids.
        kind: ``"loss"`` (negative cross-entropy) or ``"confidence"`` (softmax probability of the
            true class). Both are higher for samples the model fits better.
    """
    check_choice("kind", kind, ("loss", "confidence"))
    logits = logits.detach().float()
    if kind == "loss":
        return -F.cross_entropy(logits, target.long(), reduction="none")
    return torch.softmax(logits, dim=-1).gather(1, target.long().view(-1, 1)).squeeze(1)


def mia_auc(forget_scores: Tensor, heldout_scores: Tensor) -> float:
    """AUC of the threshold attack telling forget samples (as members) from held-out ones."""
    return roc_auc(forget_scores, heldout_scores)


def _best_threshold(members: Tensor, non_members: Tensor) -> float:
    """The threshold ``t`` (score ``>= t`` means member) with the best balanced accuracy."""
    members = members.double().flatten()
    non_members = non_members.double().flatten()
    candidates = torch.unique(torch.cat([members, non_members]))
    candidates = torch.cat([candidates, candidates[-1:] + 1])  # "nobody is a member"
    tpr = (members.view(1, -1) >= candidates.view(-1, 1)).double().mean(1)
    tnr = (non_members.view(1, -1) < candidates.view(-1, 1)).double().mean(1)
    return float(candidates[torch.argmax(tpr + tnr)])


def mia_efficacy(forget_scores: Tensor, retain_scores: Tensor, heldout_scores: Tensor) -> float:
    """Fraction of forget samples a retain-vs-held-out threshold attack calls non-members.

    Raises:
        ValueError: any of the three sets is empty.
    """
    for name, value in (("forget_scores", forget_scores), ("retain_scores", retain_scores), ("heldout_scores", heldout_scores)):
        if torch.as_tensor(value).numel() == 0:
            raise ValueError(f"mia_efficacy needs a non-empty `{name}`. Fix: evaluate that sample set first.")
    threshold = _best_threshold(torch.as_tensor(retain_scores), torch.as_tensor(heldout_scores))
    return float((torch.as_tensor(forget_scores).double() < threshold).double().mean())


def mia_efficacy_svc(forget_scores: Tensor, member_scores: Tensor, nonmember_scores: Tensor, C: float = 3.0,
                     kernel: str = "rbf", gamma: str = "auto") -> float:
    """MIA-efficacy as SalUn's and Unlearn-Sparse's ``evaluation/SVC_MIA.py`` compute it.

    An ``sklearn.svm.SVC(C=3, kernel="rbf", gamma="auto")`` is trained on one feature, the score
    (the official code uses the true-class softmax confidence), of ``member_scores`` (label 1; the
    official code takes the first ``|test|`` retained training samples) and ``nonmember_scores``
    (label 0; the test set), then applied to ``forget_scores``. Returns the fraction of forget
    samples predicted non-members (the official number is this × 100; higher = more forgotten).

    Raises:
        ValueError: any of the three sets is empty.
    """
    from sklearn.svm import SVC

    sets = {"forget_scores": forget_scores, "member_scores": member_scores, "nonmember_scores": nonmember_scores}
    arrays = {}
    for name, value in sets.items():
        array = torch.as_tensor(value).detach().double().flatten().cpu().numpy()
        if array.size == 0:
            raise ValueError(f"mia_efficacy_svc needs a non-empty `{name}`. Fix: evaluate that sample set first.")
        arrays[name] = array.reshape(-1, 1)
    import numpy as np

    features = np.concatenate([arrays["member_scores"], arrays["nonmember_scores"]])
    labels = np.concatenate([np.ones(len(arrays["member_scores"])), np.zeros(len(arrays["nonmember_scores"]))])
    classifier = SVC(C=C, kernel=kernel, gamma=gamma)
    classifier.fit(features, labels)
    return float(1.0 - classifier.predict(arrays["forget_scores"]).mean())


#: The metrics SalUn's "Avg. Gap" averages.
GAP_KEYS = ("ua", "ra", "ta", "mia_efficacy")


def avg_gap(metrics: dict[str, float], retrained: dict[str, float], keys: Sequence[str] = GAP_KEYS) -> float:
    """SalUn's "Avg. Gap": the mean of ``|metric − retrained metric|`` over UA, RA, TA and MIA-efficacy.

    Values in the units given (fractions here; × 100 for the papers' points).

    Raises:
        KeyError: a key missing from either mapping (the message names it).
    """
    missing = [k for k in keys if k not in metrics or k not in retrained]
    if missing:
        raise KeyError(f"avg_gap needs {list(keys)} in both the metrics and the retrained model's; missing {missing}.")
    return float(sum(abs(float(metrics[k]) - float(retrained[k])) for k in keys) / len(keys))


class ForgetRetainAccuracy(Metric):
    """Accuracy on the forget, retained and previously forgotten classes, and the H-mean.

    Mechanism: per-class ``correct``/``total`` counters summed across processes, so each class
    subset's accuracy is the global one under DDP (and the counters are restored from checkpoints).
    Set :attr:`forget_classes`, :attr:`old_classes` (and optionally :attr:`retain_classes`; by
    default every class seen that is neither) and :attr:`acc_f_before` before :meth:`compute`.

    Args:
        num_classes: number of classes of the classifier.

    Example::

        metric = ForgetRetainAccuracy(num_classes=10)
        metric.update(logits, y)
        metric.forget_classes, metric.old_classes, metric.acc_f_before = [2, 3], [0, 1], 0.98
        metric.compute()  # {"acc_f": ..., "acc_r": ..., "acc_o": ..., "h_mean": ...}
    """

    full_state_update = False
    higher_is_better = None

    def __init__(self, num_classes: int, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.num_classes = check_int("num_classes", num_classes, min=1)
        self.add_state("correct", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum", persistent=True)
        self.add_state("total", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum", persistent=True)
        self.forget_classes: list[int] = []
        self.old_classes: list[int] = []
        self.retain_classes: Optional[list[int]] = None
        self.acc_f_before: Optional[float] = None

    def update(self, logits: Tensor, target: Tensor) -> None:  # type: ignore[override]
        preds = logits.argmax(-1) if logits.dim() > 1 else logits
        target = target.long()
        self.total += torch.bincount(target, minlength=self.num_classes)[: self.num_classes]
        self.correct += torch.bincount(target[preds == target], minlength=self.num_classes)[: self.num_classes]

    def accuracy_of(self, classes: Sequence[int]) -> float:
        """Accuracy over the samples of ``classes`` (NaN when none was seen)."""
        if not classes:
            return float("nan")
        index = torch.as_tensor(list(classes), dtype=torch.long, device=self.total.device)
        total = int(self.total[index].sum())
        return float("nan") if total == 0 else int(self.correct[index].sum()) / total

    def compute(self) -> dict[str, float]:  # type: ignore[override]
        forget, old = set(self.forget_classes), set(self.old_classes)
        if self.retain_classes is not None:
            retain = list(self.retain_classes)
        else:
            seen = (self.total > 0).nonzero().flatten().tolist()
            retain = [c for c in seen if c not in forget and c not in old]
        acc_f = self.accuracy_of(sorted(forget))
        acc_r = self.accuracy_of(retain)
        result = {"acc_f": acc_f, "acc_r": acc_r, "acc_o": self.accuracy_of(sorted(old))}
        before = self.acc_f_before
        result["h_mean"] = float("nan") if before is None else h_mean(before, acc_f, acc_r)
        return result


class MembershipInference(Metric):
    """Loss/confidence-threshold membership inference: AUC forget vs held-out, MIA-efficacy.

    Mechanism: ``update(logits, target, split)`` stores the per-sample score
    (:func:`membership_scores`) of a batch of ``split`` ∈ {``"forget"``, ``"retain"``,
    ``"heldout"``}; scores are concatenated across processes. :meth:`compute` returns
    ``{"auc": mia_auc(forget, heldout), "efficacy": mia_efficacy(forget, retain, heldout)}``
    (``efficacy`` is NaN without retain scores).

    Args:
        score: ``"loss"`` (negative cross-entropy, the default: the usual loss-threshold attack of
            Yeom et al., CSF 2018) or ``"confidence"``.
    """

    full_state_update = False
    higher_is_better = None

    def __init__(self, score: ScoreKind = "loss", **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.score = check_choice("score", score, ("loss", "confidence"))
        for split in _SPLITS:
            self.add_state(f"{split}_scores", [], dist_reduce_fx="cat")

    def update(self, logits: Tensor, target: Tensor, split: str) -> None:  # type: ignore[override]
        check_choice("split", split, _SPLITS)
        getattr(self, f"{split}_scores").append(membership_scores(logits, target, self.score))

    def _scores(self, split: str) -> Tensor:
        value = getattr(self, f"{split}_scores")
        if isinstance(value, list):
            return dim_zero_cat(value) if value else torch.zeros(0)
        return value

    def compute(self) -> dict[str, float]:  # type: ignore[override]
        forget, retain, heldout = (self._scores(s) for s in _SPLITS)
        auc = mia_auc(forget, heldout)
        efficacy = mia_efficacy(forget, retain, heldout) if retain.numel() else float("nan")
        return {"auc": auc, "efficacy": efficacy}
