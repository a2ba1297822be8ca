"""The examples run (fast mode), so they cannot rot; each writes into its run's results folder
(the logger's directory, else ``default_root_dir``) and says so on its last line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


def _example(name: str) -> Any:
    """``examples/<name>.py`` as a module of its own name (``example_<name>``): a benchmark of the same
    file name (``benchmarks/continual_pretraining.py``, ``benchmarks/diffusion_erasure.py``) can be
    first on ``sys.path`` when the two test files share a worker."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
REPORT = {"metrics.json", "accuracy_matrix.csv", "accuracy_matrix.png"}


def written(out: str, owner: str, folder: Path) -> set[str]:
    """The file names of ``owner``'s "results written to <folder>: ..." line in ``out``."""
    marker = f"{owner}: results written to {folder.resolve()}: "
    lines = [line for line in out.splitlines() if line.startswith(marker)]
    assert lines, f"no {marker!r} line in:\n{out[-2000:]}"
    names = set(lines[-1][len(marker):].split(", "))
    assert all((folder / name).is_file() for name in names), names
    return names


def test_demo_writes_its_tables_into_one_results_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    demo = _example("demo")

    results = demo.main(["--limit-train-batches", "0.05", "--no-progress"])
    folder = tmp_path / "lightning_logs" / "version_0"  # the folder Lightning's logger gives a first run
    names = written(capsys.readouterr().out, "demo", folder)
    per_method = {f"{slug}_{name}" for slug in ("finetune", "er", "joint") for name in REPORT}
    assert names == {"comparison.csv", "comparison.json"} | per_method
    rows = json.loads((folder / "comparison.json").read_text())
    assert [row["method"] for row in rows] == [result.name for result in results]
    assert rows[1]["average_accuracy"] == results[1].summary["average_accuracy"]
    assert (folder / "comparison.csv").read_text().splitlines()[0] == ",".join(demo.COMPARISON_COLUMNS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lightning_logs"]  # nothing anywhere else


def test_existing_trainer_example(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # the example writes its report under the working directory
    existing_trainer = _example("existing_trainer")

    metrics = existing_trainer.main(["--fast"])
    assert metrics.matrix.shape == (5, 5)  # the default key found val_acc/dataloader_idx_{t}
    assert not torch.isnan(metrics.matrix.diagonal()).any()
    assert written(capsys.readouterr().out, "ContinualMetrics", tmp_path / "lightning_logs" / "version_0") == REPORT


def test_one_fit_per_task_example(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    one_fit_per_task = _example("one_fit_per_task")

    metrics = one_fit_per_task.main(["--fast"])
    assert metrics.matrix.shape == (5, 5)
    assert not torch.isnan(metrics.matrix[4]).any()
    # one logger for the five fits: one folder, whose report is the last task's
    assert [p.name for p in (tmp_path / "lightning_logs").iterdir()] == ["version_0"]
    folder = tmp_path / "lightning_logs" / "version_0"
    assert written(capsys.readouterr().out, "ContinualMetrics", folder) == REPORT
    assert json.loads((folder / "metrics.json").read_text())["summary"]["tasks_trained"] == 5


@pytest.mark.ddp
def test_ddp_example_keeps_ranks_identical(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "ddp.py"), "--fast"],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ranks=2" in out.stdout and "identical_across_ranks=True" in out.stdout, out.stdout[-2000:]
    assert written(out.stdout, "ContinualMetrics", tmp_path / "lightning_logs" / "version_0") == REPORT


def test_continual_pretraining_example(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    continual_pretraining = _example("continual_pretraining")

    losses = continual_pretraining.main(["--fast"])
    assert {"val/loss/task_0", "val/loss/task_1"} <= set(losses)
    folder = tmp_path / "lightning_logs" / "version_0"
    assert written(capsys.readouterr().out, "continual_pretraining", folder) == {"metrics.csv", "val_losses.json"}
    assert json.loads((folder / "val_losses.json").read_text()) == pytest.approx(losses)


def test_lines_finetune_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    lines_finetune = _example("lines_finetune")

    results = lines_finetune.main(["--fast"])
    assert set(results) >= {"pre-trained", "fine-tuned (unscaled)"} and len(results) == 3
    folder = tmp_path / "lightning_logs" / "version_0"  # one folder for both fits
    names = written(capsys.readouterr().out, "lines_finetune", folder)
    assert {"pretrained.ckpt", "accuracies.json"} <= names and any(name.endswith(".pt") for name in names)
    assert set(json.loads((folder / "accuracies.json").read_text())) == set(results)


def test_lines_finetune_example_out_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines_finetune = _example("lines_finetune")

    lines_finetune.main(["--fast", "--out", str(tmp_path / "out")])  # --out: default_root_dir, no logger
    assert {"pretrained.ckpt", "accuracies.json"} <= written(capsys.readouterr().out, "lines_finetune", tmp_path / "out")


def test_gs_lora_forget_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    gs_lora_forget = _example("gs_lora_forget")

    rows = gs_lora_forget.main(["--fast"])
    assert [row["task"] for row in rows] == [0.0, 1.0]
    folder = tmp_path / "lightning_logs" / "version_0"  # one folder for both fits
    assert written(capsys.readouterr().out, "gs_lora_forget", folder) == {"original.ckpt", "unlearning.csv", "unlearning.png"}


def test_diffusion_erasure_example(tmp_path: Path) -> None:
    diffusion_erasure = _example("diffusion_erasure")

    results = diffusion_erasure.main(["--fast", "--out", str(tmp_path)])
    assert {"esd-x", "ca", "uce"} <= set(results)
    for name in ("esd-x", "ca", "uce"):
        assert results[name]["before"]["tag"] == "before" and results[name]["after"]["tag"] == "task0"
        assert (tmp_path / name / "erasure_samples_task0.png").is_file()
    assert (tmp_path / "model" / "concepts.json").is_file()
