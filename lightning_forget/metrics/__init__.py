"""Continual-learning metrics: pure functions of an accuracy matrix and the ``AccuracyMatrix`` torchmetric."""

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

__all__ = [
    "AccuracyMatrix",
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
