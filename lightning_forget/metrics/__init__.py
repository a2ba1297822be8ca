"""Continual-learning metrics: pure functions of an accuracy matrix or of evaluation curves
(stability gap), the ``AccuracyMatrix`` torchmetric, and the unlearning metrics (forget/retain
accuracy, H-mean, membership inference)."""

from lightning_forget.metrics.accuracy_matrix import AccuracyMatrix
from lightning_forget.metrics.unlearning import (
    ForgetRetainAccuracy,
    MembershipInference,
    avg_gap,
    h_mean,
    membership_scores,
    mia_auc,
    mia_efficacy,
    mia_efficacy_svc,
    roc_auc,
)
from lightning_forget.metrics.functional import (
    as_accuracy_matrix,
    average_accuracy,
    average_incremental_accuracy,
    backward_transfer,
    bwt,
    forgetting,
    forward_transfer,
    fwt,
    last_measured_row,
    learning_accuracy,
)
from lightning_forget.metrics.stability import (
    EvalCurves,
    as_curves,
    min_acc,
    stability_metrics,
    wc_acc,
    windowed_forgetting,
    windowed_plasticity,
)

__all__ = [
    "AccuracyMatrix",
    "ForgetRetainAccuracy",
    "MembershipInference",
    "h_mean",
    "membership_scores",
    "mia_auc",
    "mia_efficacy",
    "mia_efficacy_svc",
    "avg_gap",
    "roc_auc",
    "EvalCurves",
    "as_curves",
    "min_acc",
    "stability_metrics",
    "wc_acc",
    "windowed_forgetting",
    "windowed_plasticity",
    "as_accuracy_matrix",
    "average_accuracy",
    "average_incremental_accuracy",
    "backward_transfer",
    "bwt",
    "forgetting",
    "forward_transfer",
    "fwt",
    "last_measured_row",
    "learning_accuracy",
]
