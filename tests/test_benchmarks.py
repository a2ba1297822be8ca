"""Each benchmark's --quick mode runs (seconds), so the scripts cannot rot. No timing asserted."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_er_split_mnist_quick() -> None:
    summary = load("er_split_mnist").main(["--quick"])
    assert set(summary) == {"finetune", "er200", "er500", "joint"}
    for method in summary.values():
        assert 0.0 <= method["average_accuracy"][0] <= 1.0


def test_continual_pretraining_quick() -> None:
    module = load("continual_pretraining")
    results = module.main(["--quick"])
    assert set(results) == set(module.RUNS)
    assert results["a_no_rewarm"]["gap_closed_mean"] == 0.0 and results["d_union"]["gap_closed_mean"] == 1.0
    assert results["c_rewarm_replay25"]["replayed_blocks_task1"] > results["c_rewarm_replay5"]["replayed_blocks_task1"] > 0
    assert all(row["steps"] == results["d_union"]["steps"] for row in results.values())  # same compute
