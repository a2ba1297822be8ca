"""Replay buffers: bounded memory, reservoir statistics, class balance, exact state."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lightning_forget.buffers import (
    TASK_KEY,
    ClassBalancedBuffer,
    ReservoirBuffer,
    TaskBalancedBuffer,
    equal_shares,
    make_buffer,
)


def _batch(start: int, n: int, num_classes: int = 10) -> dict[str, torch.Tensor]:
    ids = torch.arange(start, start + n)
    return {"x": ids.float().unsqueeze(1).repeat(1, 3), "y": ids % num_classes}


def test_reservoir_fills_then_keeps_capacity_and_memory_fixed() -> None:
    buffer = ReservoirBuffer(20, seed=0)
    buffer.add(_batch(0, 15))
    assert len(buffer) == 15 and torch.equal(buffer.contents()["y"], torch.arange(15) % 10)
    nbytes = buffer.nbytes()
    for start in range(15, 500, 15):
        buffer.add(_batch(start, 15))
        assert len(buffer) == 20
        assert buffer.nbytes() == nbytes  # allocated once
    assert buffer.num_seen == 510


def test_reservoir_keeps_each_sample_with_equal_probability() -> None:
    # After 100 samples into a buffer of 10, every sample is kept with probability 0.1.
    counts = torch.zeros(100)
    for seed in range(400):
        buffer = ReservoirBuffer(10, seed=seed)
        for start in range(0, 100, 10):
            buffer.add(_batch(start, 10, num_classes=1000))
        counts[buffer.contents()["x"][:, 0].long()] += 1
    frequency = counts / 400
    # The mean is 0.1 whatever the rule; each sample's own frequency is what can go wrong.
    # Binomial sd of one frequency is sqrt(0.1 * 0.9 / 400) = 0.015; 5 sd bounds all 100.
    assert (frequency - 0.1).abs().max().item() < 0.075, frequency
    # Early and late samples are kept equally often (binomial sd of a 10-sample mean ≈ 0.005).
    assert abs(frequency[:10].mean().item() - frequency[-10:].mean().item()) < 0.03


@pytest.mark.parametrize("capacity", [1, 2])
def test_reservoir_keeps_the_sample_after_a_full_buffer_with_probability_capacity_over_its_count(capacity: int) -> None:
    # The smallest exact case: a full buffer of `capacity` and one more sample, the
    # (capacity + 1)-th, kept with probability capacity / (capacity + 1) (1/2 for capacity 1, 2/3
    # for 2). A rule of capacity / i (i 0-based) would always keep it.
    trials, kept = 1000, 0
    for seed in range(trials):
        buffer = ReservoirBuffer(capacity, seed=seed)
        buffer.add(_batch(0, capacity + 1, num_classes=1000))
        kept += int(capacity in buffer.contents()["x"][:, 0].long().tolist())
    expected = capacity / (capacity + 1)
    sd = (expected * (1 - expected) / trials) ** 0.5  # about 0.016
    assert abs(kept / trials - expected) < 5 * sd, kept / trials


def test_duplicate_slots_in_one_batch_keep_the_later_sample() -> None:
    buffer = ReservoirBuffer(2, seed=3)
    buffer.add(_batch(0, 2))
    slots = buffer.add(_batch(2, 200))
    kept = slots[slots >= 0]
    assert kept.unique().numel() == kept.numel()  # each slot reported once
    for offset, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert buffer.contents()["x"][slot, 0] == 2 + offset


def test_same_seed_same_contents_and_exact_state_round_trip() -> None:
    a, b = ReservoirBuffer(16, seed=5), ReservoirBuffer(16, seed=5)
    for start in range(0, 200, 8):
        a.add(_batch(start, 8))
        b.add(_batch(start, 8))
    assert torch.equal(a.contents()["x"], b.contents()["x"])
    restored = ReservoirBuffer(16, seed=0)
    restored.load_state_dict(a.state_dict())
    for start in range(200, 300, 8):  # future decisions identical too (generator restored)
        a.add(_batch(start, 8))
        restored.add(_batch(start, 8))
    assert torch.equal(a.contents()["x"], restored.contents()["x"])
    assert torch.equal(a.sample(5)["x"], restored.sample(5)["x"])


def test_state_of_wrong_capacity_is_refused() -> None:
    a = ReservoirBuffer(8)
    a.add(_batch(0, 4))
    with pytest.raises(ValueError, match="capacity"):
        ReservoirBuffer(9).load_state_dict(a.state_dict())


def test_class_balanced_buffer_balances_an_imbalanced_stream() -> None:
    buffer = ClassBalancedBuffer(40, seed=0)
    # Class 0 arrives 10× more often than classes 1..4.
    for step in range(60):
        labels = torch.tensor([0] * 10 + [1 + step % 4])
        buffer.add({"x": torch.randn(11, 2), "y": labels})
    counts = buffer.class_counts()
    assert len(buffer) == 40
    assert set(counts) == {0, 1, 2, 3, 4}
    assert max(counts.values()) - min(counts.values()) <= 1
    restored = ClassBalancedBuffer(40)
    restored.load_state_dict(buffer.state_dict())
    assert restored.class_counts() == counts and restored.seen_per_class == buffer.seen_per_class


def test_class_balanced_needs_integer_labels() -> None:
    with pytest.raises(ValueError, match="integer class labels"):
        ClassBalancedBuffer(4).add({"x": torch.randn(2, 2), "y": torch.randn(2)})
    with pytest.raises(KeyError, match="label_key"):
        ClassBalancedBuffer(4).add({"x": torch.randn(2, 2)})


@pytest.mark.parametrize(
    "kwargs, match",
    [({"kind": "fifo", "capacity": 3}, "buffer"), ({"kind": "reservoir", "capacity": 0}, "capacity")],
)
def test_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_buffer(**kwargs)


def test_batches_must_be_consistent() -> None:
    buffer = ReservoirBuffer(4)
    with pytest.raises(ValueError, match="same length"):
        buffer.add({"x": torch.zeros(2, 1), "y": torch.zeros(3)})
    buffer.add({"x": torch.zeros(2, 1), "y": torch.zeros(2)})
    with pytest.raises(ValueError, match="fields"):
        buffer.add({"x": torch.zeros(2, 1)})
    with pytest.raises(RuntimeError, match="empty"):
        ReservoirBuffer(3).sample(2)


@pytest.mark.parametrize("kind", ["reservoir", "class_balanced"])
def test_pickled_buffer_continues_with_the_same_random_stream(kind: str) -> None:
    """The generator travels as bytes (ddp_spawn pickling cannot carry a torch.Generator)."""
    import pickle

    buffer = make_buffer(kind, 8, seed=3)
    buffer.add({"x": torch.randn(20, 2), "y": torch.arange(20) % 4})
    copy = pickle.loads(pickle.dumps(buffer))
    assert isinstance(copy.generator, torch.Generator)
    assert torch.equal(copy.generator.get_state(), buffer.generator.get_state())
    batch = {"x": torch.randn(30, 2), "y": torch.arange(30) % 4}
    buffer.add(batch)
    copy.add(batch)
    for key, value in buffer.contents().items():
        assert torch.equal(value, copy.contents()[key])


# ---------------------------------------------------------------- task-end policy, metadata


def _task_batch(task: int, n: int = 30) -> dict[str, torch.Tensor]:
    ids = torch.arange(task * 1000, task * 1000 + n)
    return {"x": ids.float().unsqueeze(1), "y": ids % 7}


def test_equal_shares_give_the_remainder_to_the_first_tasks() -> None:
    assert equal_shares(10, 3) == [4, 3, 3]
    assert equal_shares(200, 5) == [40] * 5
    assert equal_shares(7, 7) == [1] * 7


def test_task_end_buffer_keeps_equal_shares_and_each_sample_at_most_once() -> None:
    buffer = TaskBalancedBuffer(10, seed=0)
    expected = {0: [10], 1: [5, 5], 2: [4, 3, 3]}
    previous: dict[int, set[float]] = {}
    for task in range(3):
        before = buffer.contents()["x"].clone() if len(buffer) else None
        batch = _task_batch(task)
        for part in range(3):  # the task's samples arrive in three batches: staged, none stored yet
            buffer.add({k: v[part * 10 : (part + 1) * 10] for k, v in batch.items()}, task=task)
            if before is not None:
                assert torch.equal(buffer.contents()["x"], before)  # no draw sees the open task
        buffer.end_task(task)
        ids = buffer.task_ids()
        assert torch.bincount(ids).tolist() == expected[task]
        xs = buffer.contents()["x"].flatten()
        assert xs.unique().numel() == xs.numel()  # each sample at most once
        for t in range(task + 1):
            rows = set(xs[ids == t].tolist())
            assert all(t * 1000 <= v < t * 1000 + 30 for v in rows)  # task ids match the rows
            if t in previous:
                assert rows <= previous[t]  # re-balancing only drops rows of an old task
            previous[t] = rows
    assert buffer.stored_tasks() == [0, 1, 2]


def test_each_task_is_staged_with_its_own_random_stream() -> None:
    # The same 100 samples offered as task 0 and as task 1 (each to a fresh buffer, so both get
    # the whole capacity) keep different subsets: the staging reservoir is seeded with the task.
    kept = []
    for task in (0, 1):
        buffer = TaskBalancedBuffer(5, seed=0)
        buffer.add(_task_batch(0, 100), task=task)
        buffer.end_task(task)
        kept.append(sorted(buffer.contents()["x"].flatten().tolist()))
    assert kept[0] != kept[1], kept


def test_task_end_shrinking_keeps_a_random_subset() -> None:
    # Over seeds, every sample of task 0 survives the shrink from 10 to 5 slots about equally often.
    counts = torch.zeros(10)
    for seed in range(300):
        buffer = TaskBalancedBuffer(10, seed=seed)
        buffer.add(_task_batch(0, 10), task=0)
        buffer.end_task(0)
        buffer.add(_task_batch(1, 10), task=1)
        buffer.end_task(1)
        kept = buffer.contents()["x"].flatten()[buffer.task_ids() == 0].long()
        assert kept.numel() == 5 and kept.unique().numel() == 5  # its share, no row twice
        counts[kept] += 1
    frequency = counts / 300
    # (The mean frequency is 0.5 under any rule that keeps 5 of 10; each sample's own is what can go wrong.)
    assert float(frequency.min()) > 0.35 and float(frequency.max()) < 0.65  # binomial sd ≈ 0.03


def test_task_end_state_round_trip_in_the_middle_of_a_task() -> None:
    a = TaskBalancedBuffer(12, seed=4)
    a.add(_task_batch(0), task=0)
    a.end_task(0)
    a.add(_task_batch(1, 12), task=1)  # staged, not yet stored
    restored = TaskBalancedBuffer(12, seed=0)
    restored.load_state_dict(a.state_dict())
    for buffer in (a, restored):
        buffer.add({k: v[12:] for k, v in _task_batch(1).items()}, task=1)
        buffer.end_task(1)
    for key, value in a.contents().items():
        assert torch.equal(value, restored.contents()[key])


def test_task_end_refuses_a_new_task_while_one_is_open_and_needs_the_task() -> None:
    buffer = TaskBalancedBuffer(8)
    buffer.add(_task_batch(0), task=0)
    with pytest.raises(RuntimeError, match="end_task"):
        buffer.add(_task_batch(1), task=1)
    with pytest.raises(ValueError, match="task="):
        buffer.add(_task_batch(0))


def test_task_ids_are_stored_with_each_row_and_sampled() -> None:
    buffer = ReservoirBuffer(50, seed=0)
    for task in range(3):
        buffer.add(_task_batch(task, 10), task=task)
    drawn = buffer.sample(20)
    assert torch.equal(drawn[TASK_KEY], (drawn["x"].flatten() // 1000).long())
    with pytest.raises(ValueError, match=TASK_KEY):
        ReservoirBuffer(4).add({**_task_batch(0, 2), TASK_KEY: torch.zeros(2)}, task=0)


def test_variable_length_sequences_are_re_padded_per_draw() -> None:
    pads = {"input_ids": 0, "attention_mask": 0, "labels": -100}
    buffer = ReservoirBuffer(8, pad_values=pads, seed=0)
    short = {"input_ids": torch.full((2, 3), 5), "attention_mask": torch.ones(2, 3, dtype=torch.long),
             "labels": torch.full((2, 3), 5), "y": torch.zeros(2)}
    long = {"input_ids": torch.full((2, 6), 7), "attention_mask": torch.ones(2, 6, dtype=torch.long),
            "labels": torch.full((2, 6), 7), "y": torch.ones(2)}
    buffer.add(short, task=0)
    buffer.add(long, task=1)
    only_short = buffer.take(torch.tensor([0, 1]))
    assert only_short["input_ids"].shape == (2, 3)  # cut to the longest drawn row
    mixed = buffer.take(torch.tensor([1, 2]))
    assert mixed["input_ids"].shape == (2, 6)
    assert mixed["labels"][0].tolist() == [5, 5, 5, -100, -100, -100]
    assert mixed["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0]
    assert mixed["input_ids"][0].tolist() == [5, 5, 5, 0, 0, 0]
    assert mixed["labels"][1].tolist() == [7] * 6
    restored = ReservoirBuffer(8, pad_values=pads)
    restored.load_state_dict(buffer.state_dict())
    assert torch.equal(restored.take(torch.tensor([0]))["labels"], buffer.take(torch.tensor([0]))["labels"])
    assert restored.take(torch.tensor([0]))["labels"].shape == (1, 3)
    with pytest.raises(ValueError, match="pad_values"):
        ReservoirBuffer(4, pad_values={"y": 0}).add({"y": torch.zeros(2)})
