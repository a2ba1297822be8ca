"""Each benchmark's --quick mode runs (seconds), so the scripts cannot rot. No timing asserted."""

from __future__ import annotations

import pytest

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


def test_unlearning_quick(tmp_path) -> None:
    results = load_benchmark("unlearning").main(["--quick", "--out", str(tmp_path)])
    summary = {row["method"]: row for row in results["digits/random"]["summary"]}
    assert {"Original", "Retrain", "FT", "GA", "GradDiff", "RL", "l1-sparse", "SCRUB", "SalUn", "GS-LoRA"} <= set(summary)
    for row in summary.values():
        assert row["seeds"] == 1
        assert row["diverged"] == 1 or 0.0 <= row["ra"] <= 1.0
    assert (tmp_path / "unlearning_benchmark.csv").is_file() and (tmp_path / "unlearning_gap_digits_random.png").is_file()


def test_unlearning_lm_quick(tmp_path) -> None:
    result = load_benchmark("unlearning_lm").main(["--quick", "--out", str(tmp_path)])
    summary = {row["method"]: row for row in result["summary"]}
    assert {"Target", "Retain", "GA", "GradDiff", "GradDiff-KL", "NPO", "SimNPO", "IdkPO", "RMU"} <= set(summary)
    for row in summary.values():
        assert row["diverged"] == 0 and 0.0 <= row["model_utility"] <= 1.0 and 0.0 <= row["mia_min_k"] <= 1.0
    assert {(r["method"], r["variant"]) for r in result["lora"]} == {
        ("NPO", "full"), ("NPO+LoRA", "lora"), ("GradDiff", "full"), ("GradDiff+LoRA", "lora")}
    lora = {r["method"]: r for r in result["lora"]}
    assert lora["NPO+LoRA"]["trainable"] < lora["NPO"]["trainable"]
    assert lora["NPO+LoRA"]["state_mb"] < lora["NPO"]["state_mb"]  # no reference copy, no full-size moments
    assert (tmp_path / "unlearning_lm.csv").is_file() and (tmp_path / "models" / "target" / "config.json").is_file()


def test_unlearning_lm_eval_quick() -> None:
    summary = load_benchmark("unlearning_lm_eval").main(["--quick"])
    assert set(summary["samples_per_second"]) == {"batched", "per_sample"}  # --quick: 1 process
    assert all(v > 0 for v in summary["samples_per_second"].values())
    assert summary["max_metric_difference"]["per_sample_vs_batched"] < 1e-4
    assert len(summary["runs"]) == 1 and set(summary["ratios"]) == {"batched / per_sample"}
    assert all(summary["cpu_ms_per_sample"][w]["median"] > 0 for w in ("batched", "per_sample"))


def test_sharded_memory_quick() -> None:
    (row,) = load_benchmark("sharded_memory").main(["--quick"])
    assert row["world"] == 2 and row["exact"]
    assert sum(row["local_bytes"]) == row["full_bytes"]
    assert row["largest_share"] <= 0.5 + 0.01  # dim-0 chunks: at most one row more than half


def test_device_check_dry_run_and_quick_on_cpu(tmp_path) -> None:
    bench = load_benchmark("device_check")
    plan = bench.main(["--dry-run", "--out", str(tmp_path / "plan")])
    assert {row["callback"] for row in plan["contract"]} == set(bench.CALLBACK_CONFIGS)
    assert all(row["status"] == "planned" for row in plan["contract"] + plan["ratios"])
    report = bench.main(["--quick", "--out", str(tmp_path / "quick")])
    assert report["settings"] == ["cpu_32"] and "no CUDA device" in report["notes"][0]  # CUDA parts skipped, said so
    assert {row["status"] for row in report["contract"]} == {"ok"}, report["contract"]
    (ratio,) = report["ratios"]
    assert ratio["status"] == "ok" and ratio["ratio"] > 0
    assert (tmp_path / "quick" / "device_check.json").is_file() and "| ER vs fine-tuning |" in (tmp_path / "quick" / "device_check.md").read_text()
    # A config whose module does not shard itself (no configure_model) is skipped under ModelParallelStrategy, with why.
    skipped = bench.contract_run("ESD", "cpu_model_parallel", 1)
    assert skipped["status"] == "skipped" and "configure_model" in skipped["message"]
    assert bench._shards_itself(bench.CALLBACK_CONFIGS["ExperienceReplay"])  # the library's classifier does
    with pytest.raises(SystemExit):
        bench.main(["--callbacks", "ESD,NoSuchCallback", "--dry-run", "--out", str(tmp_path / "bad")])


def test_diffusion_erasure_quick(tmp_path) -> None:
    bench = load_benchmark("diffusion_erasure")
    rows = bench.main(["--quick", "--out", str(tmp_path)])
    assert list(rows) == ["original", *bench.METHODS]  # every method of issue 27, DoCo with and without surgery
    assert {"esd-x", "esd-u", "esd-x-lora", "ca", "uce", "salun", "sfd", "doco", "doco-no-surgery"} <= set(rows)
    for method in bench.METHODS:
        row = rows[method]
        assert 0.0 <= row["retained_acc"][0] <= 1.0 and row["time_ratio"][0] > 0
        # the method itself ran: it changed parameters, and only those of its set (ESD-x: attn2; UCE, CA: attn2.to_k/to_v;
        # ESD-u: outside attn2; DoCo "all": the UNet's Linear/Conv layers)
        assert row["changed_tensors"][0] > 0 and row["changed_only_allowed"][0] == 1.0, method
    assert 0 < rows["salun"]["changed_share"][0] <= 0.5  # SalUn: only its saliency mask (half the weights) moves
    assert (tmp_path / "results.json").is_file() and "| doco-no-surgery |" in (tmp_path / "results.md").read_text()