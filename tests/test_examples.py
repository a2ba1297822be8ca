"""The examples run (fast mode), so they cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


def test_existing_trainer_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the example writes its report under the working directory
    import existing_trainer

    metrics = existing_trainer.main(["--fast"])
    assert metrics.matrix.shape == (5, 5)
    assert not torch.isnan(metrics.matrix.diagonal()).any()


def test_one_fit_per_task_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    import one_fit_per_task

    metrics = one_fit_per_task.main(["--fast"])
    assert metrics.matrix.shape == (5, 5)
    assert not torch.isnan(metrics.matrix[4]).any()


@pytest.mark.ddp
def test_ddp_example_keeps_ranks_identical(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "ddp.py"), "--fast"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ranks=2" in out.stdout and "identical_across_ranks=True" in out.stdout, out.stdout[-2000:]


def test_continual_pretraining_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    import continual_pretraining

    losses = continual_pretraining.main(["--fast"])
    assert {"val/loss/task_0", "val/loss/task_1"} <= set(losses)


def test_lines_finetune_example(tmp_path: Path) -> None:
    import lines_finetune

    results = lines_finetune.main(["--fast", "--out", str(tmp_path)])
    assert set(results) >= {"pre-trained", "fine-tuned (unscaled)"} and len(results) == 3
    assert (tmp_path / "pretrained.ckpt").exists()
