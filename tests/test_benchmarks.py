"""Each benchmark's --quick mode runs (seconds), so the scripts cannot rot. No timing asserted."""

from __future__ import annotations

from tests.helpers.benchmarks import load_benchmark


def test_er_split_mnist_quick() -> None:
    summary = load_benchmark("er_split_mnist").main(["--quick"])
    assert set(summary) == {"finetune", "er200", "er500", "joint"}
    for method in summary.values():
        assert 0.0 <= method["average_accuracy"][0] <= 1.0
