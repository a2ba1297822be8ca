"""Continual-learning metrics: pure functions of an accuracy matrix or of evaluation curves
(stability gap), and the ``AccuracyMatrix`` torchmetric."""

from lightning_forget.metrics.accuracy_matrix import AccuracyMatrix
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
