"""Tests of ``run_continual``: the matrix it returns is the run's, whatever the strategy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_forget.callbacks import ExperienceReplay
from lightning_forget.experiment import run_continual
from tests.helpers.data import BlobStream
from tests.helpers.harness import tiny_classifier


def _run(tmp_path: Path, made: list[pl.Trainer], **trainer_kwargs: Any) -> Any:
    dm = BlobStream(num_tasks=2)

    def make_trainer(**kwargs: Any) -> pl.Trainer:
        made.append(pl.Trainer(**kwargs))
        return made[-1]

    return run_continual(
        "er", dm, tiny_classifier(dm), callbacks=[ExperienceReplay(buffer_size=8)], progress_bar=False,
        default_root_dir=str(tmp_path), trainer_kwargs=trainer_kwargs, make_trainer=make_trainer,
    )


def _check_result(result: Any) -> None:
    assert result.matrix.shape == (2, 2) and result.matrix.dtype == torch.float64
    assert torch.isfinite(result.matrix.tril()).all()  # every task evaluated after every task so far
    assert result.summary["tasks_trained"] == 2 and result.summary["average_accuracy"] is not None
    assert len(result.rss_after_task_mb) == 2 and all(mb > 0 for mb in result.rss_after_task_mb)
    assert result.peak_rss_mb > 0


def test_run_continual_returns_the_matrix_and_leaves_no_keys_behind(tmp_path: Path) -> None:
    made: list[pl.Trainer] = []
    result = _run(tmp_path, made)
    _check_result(result)
    assert not any(key.startswith("lightning_forget/") for key in made[0].callback_metrics)


@pytest.mark.ddp
def test_run_continual_under_ddp_spawn_returns_the_real_matrix(tmp_path: Path) -> None:
    # the fit runs in two worker processes; the calling process's callbacks never see the rows,
    # so this used to return an empty (0, 0) matrix without a word
    made: list[pl.Trainer] = []
    result = _run(tmp_path, made, strategy="ddp_spawn", devices=2)
    _check_result(result)
    assert not any(key.startswith("lightning_forget/") for key in made[0].callback_metrics)
