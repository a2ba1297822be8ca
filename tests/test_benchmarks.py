"""Each benchmark's --quick mode runs (seconds), so the scripts cannot rot. No timing asserted."""

from __future__ import annotations

from tests.helpers.benchmarks import load_benchmark


def test_er_split_mnist_quick() -> None:
    summary = load_benchmark("er_split_mnist").main(["--quick"])
    assert set(summary) == {"finetune", "er200", "er500", "joint"}
    for method in summary.values():
        assert 0.0 <= method["average_accuracy"][0] <= 1.0


def test_er_policy_quick() -> None:
    summary = load_benchmark("er_policy").main(["--quick", "--streams", "digits"])
    assert set(summary["digits"]) == {"finetune", "reservoir", "stream", "task_end", "task_end_pass", "peer"}
    for method in summary["digits"].values():
        assert 0.0 <= method["old_task_accuracy"][0] <= 1.0


def test_er_policy_online_quick_skips_an_absent_peer(capsys) -> None:  # type: ignore[no-untyped-def]
    summary = load_benchmark("er_policy").main(
        ["--quick", "--streams", "online", "--online-methods", "default", "--peer-python", "/nonexistent/python"]
    )
    assert set(summary["online"]) == {"finetune", "default"}
    assert "peer skipped" in capsys.readouterr().out
    assert summary["online"]["default"]["steps"] == [3] * 5  # one fit per task, 3 batches each
def test_refresh_profile_quick() -> None:
    out = load_benchmark("refresh").main(["--profile", "--quick"])
    assert out["samples"] > 0 and 0.0 < out["refresh_share"] < 1.0
    assert set(out["parts_ms"]) == {"forward", "backward", "noise", "rest", "total"}
    assert len(out["max_cF"]) == 5 and all(v >= 0 for v in out["max_cF"])
