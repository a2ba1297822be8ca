"""Replay buffers: bounded memory, reservoir statistics, class balance, exact state."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lightning_forget.buffers import ClassBalancedBuffer, ReservoirBuffer, make_buffer


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
