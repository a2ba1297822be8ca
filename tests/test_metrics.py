"""Continual-learning metrics: functional maths against hand-computed values, and AccuracyMatrix."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_forget.metrics import (
    AccuracyMatrix,
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

NAN = float("nan")

# R[i, j] = accuracy on task j after training task i; three tasks, fully measured.
R3 = [
    [0.90, 0.10, 0.20],
    [0.60, 0.80, 0.30],
    [0.50, 0.70, 0.95],
]

# Same stream stopped after task 1: row 2 not measured, above-diagonal entries not measured.
R_PARTIAL = [
    [0.90, None, None],
    [0.60, 0.80, None],
    [None, None, None],
]

# Four tasks where the best earlier accuracy of task 0 is not the diagonal one.
R4 = [
    [0.50, NAN, NAN, NAN],
    [0.70, 0.90, NAN, NAN],
    [0.40, 0.60, 0.80, NAN],
    [0.30, 0.85, 0.70, 1.00],
]


def close(value: float, expected: float) -> bool:
    return math.isclose(value, expected, rel_tol=0, abs_tol=1e-12)


# ---------------------------------------------------------------------- functional
def test_average_accuracy_hand_computed() -> None:
    # last row t=2: (0.50 + 0.70 + 0.95) / 3 = 2.15 / 3
    assert close(average_accuracy(R3), 2.15 / 3)
    # after task 0: R[0, 0] = 0.90 (future tasks ignored)
    assert close(average_accuracy(R3, after_task=0), 0.90)
    # after task 1: (0.60 + 0.80) / 2 = 0.70
    assert close(average_accuracy(R3, after_task=1), 0.70)
    # partial: last measured row is 1 -> 0.70
    assert close(average_accuracy(R_PARTIAL), 0.70)


def test_average_incremental_accuracy_hand_computed() -> None:
    # (0.90 + 0.70 + 2.15/3) / 3
    assert close(average_incremental_accuracy(R3), (0.90 + 0.70 + 2.15 / 3) / 3)
    # partial: rows 0 and 1 only: (0.90 + 0.70) / 2 = 0.80
    assert close(average_incremental_accuracy(R_PARTIAL), 0.80)


def test_forgetting_hand_computed() -> None:
    # t=2. task 0: max(0.90, 0.60) - 0.50 = 0.40; task 1: max(0.10, 0.80) - 0.70 = 0.10.
    # mean = 0.25
    assert close(forgetting(R3), 0.25)
    # partial, t=1: task 0: 0.90 - 0.60 = 0.30
    assert close(forgetting(R_PARTIAL), 0.30)
    # R4, t=3: task 0: max(0.5, 0.7, 0.4) - 0.3 = 0.4; task 1: max(0.9, 0.6) - 0.85 = 0.05;
    # task 2: max(0.8) - 0.7 = 0.1 -> (0.4 + 0.05 + 0.1) / 3 = 0.55 / 3
    assert close(forgetting(R4), 0.55 / 3)


def test_backward_transfer_hand_computed() -> None:
    # (0.50 - 0.90) + (0.70 - 0.80) = -0.40 - 0.10 = -0.50; / 2 = -0.25
    assert close(backward_transfer(R3), -0.25)
    # R4: (0.3-0.5) + (0.85-0.9) + (0.7-0.8) = -0.2 - 0.05 - 0.1 = -0.35; / 3
    assert close(bwt(R4), -0.35 / 3)
    # forgetting differs from -BWT in R4 because task 0 peaked after task 1.
    assert not close(forgetting(R4), -bwt(R4))
    assert bwt is backward_transfer and fwt is forward_transfer


def test_forward_transfer_hand_computed() -> None:
    baseline = [0.05, 0.10, 0.15]
    # j=1: R[0, 1] - b1 = 0.10 - 0.10 = 0.00; j=2: R[1, 2] - b2 = 0.30 - 0.15 = 0.15 -> 0.075
    assert close(forward_transfer(R3, baseline), 0.075)
    # scalar baseline 0.1: (0.10 - 0.1) + (0.30 - 0.1) = 0.2 -> 0.1
    assert close(fwt(R3, 0.1), 0.1)
    assert close(fwt(torch.tensor(R3, dtype=torch.float64), torch.tensor(baseline, dtype=torch.float64)), 0.075)
    # no entries above the diagonal -> undefined
    assert math.isnan(fwt(R4, [0.0] * 4))
    with pytest.raises(ValueError, match="baseline"):
        fwt(R3, [0.1, 0.2])


def test_learning_accuracy_hand_computed() -> None:
    # (0.90 + 0.80 + 0.95) / 3 = 2.65 / 3
    assert close(learning_accuracy(R3), 2.65 / 3)
    # partial: (0.90 + 0.80) / 2
    assert close(learning_accuracy(R_PARTIAL), 0.85)


def test_undefined_metrics_are_nan() -> None:
    one_task = [[0.9]]
    assert close(average_accuracy(one_task), 0.9)
    assert math.isnan(forgetting(one_task))
    assert math.isnan(bwt(one_task))
    empty = [[None, None], [None, None]]
    assert last_measured_row(empty) is None
    for metric in (average_accuracy, average_incremental_accuracy, forgetting, bwt, learning_accuracy):
        assert math.isnan(metric(empty))
    # a task never measured after its own training is skipped, not propagated as NaN
    gap = [[0.8, NAN], [NAN, 0.9]]
    assert math.isnan(forgetting(gap)) and math.isnan(bwt(gap))
    assert close(average_accuracy(gap), 0.9)


def test_inputs_tensor_numpy_lists_agree() -> None:
    for R in (torch.tensor(R3), np.array(R3), R3, torch.tensor(R3, dtype=torch.float16)):
        assert math.isclose(forgetting(R), 0.25, abs_tol=1e-3)
    assert as_accuracy_matrix(R_PARTIAL).dtype == torch.float64
    with pytest.raises(ValueError, match="2-D"):
        forgetting([0.1, 0.2])
    with pytest.raises(TypeError, match="R"):
        forgetting([["a", "b"], ["c", "d"]])
    with pytest.raises(ValueError, match="after_task"):
        average_accuracy(R3, after_task=3)


# ---------------------------------------------------------------------- AccuracyMatrix
def test_accuracy_matrix_hand_computed() -> None:
    metric = AccuracyMatrix(num_tasks=3)
    # after task 0, on task 0: logits -> argmax [1, 0, 1, 1] vs [1, 0, 0, 1] -> 3/4
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.0, 1.0]])
    metric.update(logits, torch.tensor([1, 0, 0, 1]), train_task=0, eval_task=0)
    # after task 1, on task 0 (labels): [1, 1] vs [1, 0] -> 1/2; on task 1: [2, 3, 3] vs [2, 3, 2] -> 2/3
    metric.update(torch.tensor([1, 1]), torch.tensor([1, 0]), train_task=1, eval_task=0)
    metric.update(torch.tensor([2, 3, 3]), torch.tensor([2, 3, 2]), train_task=1, eval_task=1)
    # a second batch of the same cell accumulates: [2] vs [2] -> (2 + 1) / (3 + 1) = 3/4
    metric.update(torch.tensor([2]), torch.tensor([2]), train_task=1, eval_task=1)
    R = metric.compute()
    expected = torch.tensor([[0.75, NAN, NAN], [0.5, 0.75, NAN], [NAN, NAN, NAN]])
    torch.testing.assert_close(R, expected, equal_nan=True)
    assert metric.correct.tolist() == [[3, 0, 0], [1, 3, 0], [0, 0, 0]]
    assert metric.total.tolist() == [[4, 0, 0], [2, 4, 0], [0, 0, 0]]
    # re-evaluating after task 1 replaces row 1 only
    metric.reset_row(1)
    metric.update(torch.tensor([0]), torch.tensor([0]), train_task=1, eval_task=0)
    R = metric.compute()
    assert R[0, 0] == 0.75 and R[1, 0] == 1.0 and math.isnan(R[1, 1])
    assert close(forgetting(R), 0.75 - 1.0)


def test_accuracy_matrix_validation() -> None:
    with pytest.raises(ValueError, match="num_tasks"):
        AccuracyMatrix(num_tasks=0)
    metric = AccuracyMatrix(num_tasks=2)
    with pytest.raises(ValueError, match="eval_task"):
        metric.update(torch.tensor([0]), torch.tensor([0]), train_task=0, eval_task=2)
    with pytest.raises(ValueError, match="train_task"):
        metric.update(torch.tensor([0]), torch.tensor([0]), train_task=-1, eval_task=0)
    with pytest.raises(ValueError, match="preds"):
        metric.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1]), train_task=0, eval_task=0)
    with pytest.raises(ValueError, match="train_task"):
        metric.reset_row(5)
    metric.update(torch.tensor([0]), torch.tensor([0]), train_task=torch.tensor(1), eval_task=torch.tensor(0))
    assert metric.total[1, 0] == 1


def test_accuracy_matrix_state_dict_round_trip() -> None:
    metric = AccuracyMatrix(num_tasks=2)
    metric.update(torch.tensor([1, 0, 1]), torch.tensor([1, 1, 1]), train_task=0, eval_task=1)
    state = metric.state_dict()
    assert set(state) == {"correct", "total"}
    restored = AccuracyMatrix(num_tasks=2)
    restored.load_state_dict(state)
    assert restored.correct.tolist() == [[0, 2], [0, 0]] and restored.total.tolist() == [[0, 3], [0, 0]]
    torch.testing.assert_close(restored.compute(), metric.compute(), equal_nan=True)
    # also as part of a module's state (what a Lightning checkpoint stores)
    module = torch.nn.Module()
    module.matrix = metric
    assert {"matrix.correct", "matrix.total"} <= set(module.state_dict())


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        metric = AccuracyMatrix(num_tasks=2)
        if rank == 0:
            # cell (0, 0): 2 of 2 correct; cell (1, 0): 0 of 1
            metric.update(torch.tensor([1, 0]), torch.tensor([1, 0]), train_task=0, eval_task=0)
            metric.update(torch.tensor([1]), torch.tensor([0]), train_task=1, eval_task=0)
        else:
            # cell (0, 0): 1 of 2 correct; cell (1, 1): 3 of 4
            metric.update(torch.tensor([1, 1]), torch.tensor([1, 0]), train_task=0, eval_task=0)
            logits = torch.tensor([[0.0, 1.0]] * 3 + [[1.0, 0.0]])
            metric.update(logits, torch.tensor([1, 1, 1, 1]), train_task=1, eval_task=1)
        result = metric.compute()
        torch.save(
            {"R": result, "local_total": metric.total.clone(), "local_correct": metric.correct.clone()},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_accuracy_matrix_ddp_sums_counts(tmp_path: Path) -> None:
    # fork: the children inherit the imports, so the test takes about a second, not a re-import.
    args = (2, str(tmp_path / "init"), str(tmp_path))
    mp.start_processes(_ddp_worker, args=args, nprocs=2, join=True, start_method="spawn")
    # global: (0,0) = 3/4; (1,0) = 0/1; (1,1) = 3/4; (0,1) never measured
    expected = torch.tensor([[0.75, NAN], [0.0, 0.75]])
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for result in results:
        torch.testing.assert_close(result["R"], expected, equal_nan=True)
    # after compute() the local counts are restored (unsynced)
    assert results[0]["local_total"].tolist() == [[2, 0], [1, 0]]
    assert results[1]["local_total"].tolist() == [[2, 0], [0, 4]]
    assert results[1]["local_correct"].tolist() == [[1, 0], [0, 3]]


def test_accuracy_matrix_with_one_task_stays_square() -> None:
    # torchmetrics squeezes one-element results; R[0, 0] must still index (issue 8 A1).
    metric = AccuracyMatrix(num_tasks=1)
    metric.update(torch.tensor([0, 1]), torch.tensor([0, 0]), train_task=0, eval_task=0)
    result = metric.compute()
    assert result.shape == (1, 1)
    assert float(result[0, 0]) == 0.5
    assert metric.compute().shape == (1, 1)  # the cached value too


def _ddp_checkpoint_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        metric = AccuracyMatrix(num_tasks=2)
        # rank 0: 1 of 2 correct on cell (0, 0); rank 1: 4 of 4. Global: 5 / 6.
        n = 2 if rank == 0 else 4
        target = torch.zeros(n, dtype=torch.long)
        if rank == 0:
            target[0] = 1
        metric.update(torch.zeros(n, dtype=torch.long), target, train_task=0, eval_task=0)
        before = metric.compute()
        box = [metric.state_dict()]
        dist.broadcast_object_list(box, src=0)  # every rank resumes from rank 0's checkpoint
        resumed = AccuracyMatrix(num_tasks=2)
        resumed.load_state_dict(box[0])
        after = resumed.compute()
        torch.save(
            {"before": before, "after": after, "saved_total": box[0]["total"], "local_total": metric.total.clone()},
            os.path.join(out_dir, f"ckpt{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_accuracy_matrix_checkpoint_holds_the_synced_counts(tmp_path: Path) -> None:
    # Rank 0 writes the checkpoint: it must hold the global counts, and a resume on 2 ranks
    # must compute the global matrix again, not rank 0's local one (issue 8 A9).
    args = (2, str(tmp_path / "init"), str(tmp_path))
    mp.start_processes(_ddp_checkpoint_worker, args=args, nprocs=2, join=True, start_method="spawn")
    results = [torch.load(tmp_path / f"ckpt{rank}.pt") for rank in range(2)]
    for result in results:
        assert math.isclose(float(result["before"][0, 0]), 5 / 6, rel_tol=1e-6)
        assert math.isclose(float(result["after"][0, 0]), 5 / 6, rel_tol=1e-6)
    assert results[0]["saved_total"].tolist() == [[6, 0], [0, 0]]
    assert results[0]["local_total"].tolist() == [[2, 0], [0, 0]]  # live counts stay local
