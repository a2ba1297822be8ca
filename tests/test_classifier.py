"""ContinualClassifier: plain fits, its report callback across fits, and bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_forget.modules import ContinualClassifier
from tests.helpers.data import BlobStream
from tests.helpers.harness import quiet_trainer


def test_default_single_task_fit_validates(tmp_path: Path) -> None:
    # num_tasks=1 (the default): the 1x1 accuracy matrix is indexed at every validation end.
    stream = BlobStream(num_tasks=3)
    model = ContinualClassifier(num_classes=6, input_shape=(8,), hidden_sizes=[8], report=False)
    trainer = quiet_trainer(tmp_path, [], max_epochs=1)
    trainer.fit(model, DataLoader(stream.train_dataset(0), batch_size=8), DataLoader(stream.val_dataset(0), batch_size=8))
    assert "val/acc/task_0" in trainer.callback_metrics
    assert model.val_matrix.compute().shape == (1, 1)
