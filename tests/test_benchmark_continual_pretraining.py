"""The continual pre-training benchmark's --quick mode: result structure and LR schedules. No timing asserted."""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import pytest

from tests.helpers.benchmarks import load_benchmark

MAX_LR, MIN_LR = 1e-3, 1e-4  # the benchmark's defaults
QUICK_STEPS = 6  # steps per task in --quick mode


@pytest.fixture(scope="module")
def quick() -> tuple[ModuleType, dict[str, dict[str, Any]]]:
    module = load_benchmark("continual_pretraining")
    return module, module.main(["--quick", "--threads", "1"])


def test_structure_and_gap(quick: tuple[ModuleType, dict[str, dict[str, Any]]]) -> None:
    module, results = quick
    assert list(results) == list(module.RUNS)
    for row in results.values():
        for key in ("prose", "code", "mean", "seconds", "time_vs_a"):
            assert math.isfinite(row[key]) and row[key] > 0.0
        assert row["mean"] == pytest.approx((row["prose"] + row["code"]) / 2)
        assert row["steps"] == 2 * QUICK_STEPS == len(row["lr_trace"])  # same compute everywhere
    a, d = results["a_no_rewarm"], results["d_union"]
    for key in ("prose", "code", "mean"):
        assert a[f"gap_closed_{key}"] == 0.0 and d[f"gap_closed_{key}"] == 1.0
        for row in results.values():
            assert row[f"gap_closed_{key}"] == pytest.approx((a[key] - row[key]) / (a[key] - d[key]))
    assert results["c_rewarm_replay25"]["replayed_blocks_task1"] > results["c_rewarm_replay5"]["replayed_blocks_task1"] > 0
    assert a["replayed_blocks_task1"] == results["b_rewarm"]["replayed_blocks_task1"] == 0


def test_schedules(quick: tuple[ModuleType, dict[str, dict[str, Any]]]) -> None:
    _, results = quick
    a = results["a_no_rewarm"]["lr_trace"]
    # (a): one decay to min_lr over the prose task, then constant min_lr through the code task.
    assert max(a) == pytest.approx(MAX_LR) and a[QUICK_STEPS - 1] == pytest.approx(MIN_LR)
    assert a[QUICK_STEPS:] == pytest.approx([MIN_LR] * QUICK_STEPS)
    # (b), (c): the same warm-up + cosine restarted at the code task.
    for run in ("b_rewarm", "c_rewarm_replay5", "c_rewarm_replay25"):
        lrs = results[run]["lr_trace"]
        assert lrs[:QUICK_STEPS] == pytest.approx(lrs[QUICK_STEPS:])
        assert lrs[QUICK_STEPS - 1] == pytest.approx(MIN_LR) and max(lrs[QUICK_STEPS:]) == pytest.approx(MAX_LR)
    # (d): one warm-up + cosine over the whole budget, monotone after the peak.
    d = results["d_union"]["lr_trace"]
    peak = d.index(max(d))
    assert max(d) == pytest.approx(MAX_LR) and d[-1] == pytest.approx(MIN_LR)
    assert all(x >= y for x, y in zip(d[peak:], d[peak + 1 :]))


def test_bad_arguments_are_rejected() -> None:
    module = load_benchmark("continual_pretraining")
    with pytest.raises(SystemExit):
        module.main(["--quick", "--threads", "0"])
    with pytest.raises(SystemExit):
        module.main(["--min-lr", "1e-2", "--max-lr", "1e-3"])
