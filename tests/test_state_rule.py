"""The one checkpoint-state rule of ContinualCallback: {version, protocol, method}, strict loads."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lightning_forget.tasks import ContinualCallback


class Counter(ContinualCallback):
    STATE_VERSION = 2

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def method_state(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])

    def migrate_state(self, state: dict[str, Any], version: int) -> dict[str, Any]:
        if version == 1:  # version 1 called it "n"
            return {"count": state["n"]}
        return super().migrate_state(state, version)


def test_layout_and_round_trip() -> None:
    cb = Counter()
    cb.count, cb.task, cb._started, cb._ended, cb._reported_task = 5, 2, 2, 1, 1
    state = cb.state_dict()
    assert state == {
        "version": 2, "protocol": {"task": 2, "started": 2, "ended": 1, "reported": 1}, "arguments": {}, "method": {"count": 5},
    }
    fresh = Counter()
    fresh.load_state_dict(state)
    assert (fresh.count, fresh.task, fresh._started, fresh._ended) == (5, 2, 2, 1)


def test_older_version_is_migrated() -> None:
    fresh = Counter()
    fresh.load_state_dict({"version": 1, "protocol": {"task": 1, "started": 1, "ended": 0}, "method": {"n": 7}})
    assert fresh.count == 7 and fresh.task == 1


def test_flat_checkpoint_of_release_0_1_0_reads_as_version_1() -> None:
    fresh = Counter()
    fresh.load_state_dict({"version": 1, "task": 3, "started": 3, "ended": 2, "n": 4})
    assert fresh.count == 4 and (fresh.task, fresh._started, fresh._ended) == (3, 3, 2)


def test_newer_version_and_renamed_key_are_refused() -> None:
    with pytest.raises(RuntimeError, match="newer than this library's 2"):
        Counter().load_state_dict({"version": 3, "protocol": {"task": 0, "started": -1, "ended": -1}, "method": {}})
    with pytest.raises(RuntimeError, match="lacks the key 'count'"):
        Counter().load_state_dict({"version": 2, "protocol": {"task": 0, "started": -1, "ended": -1}, "method": {"cnt": 1}})
    with pytest.raises(RuntimeError, match="cannot read checkpoint state of version 0"):
        Counter().load_state_dict({"version": 0, "protocol": {"task": 0, "started": -1, "ended": -1}, "method": {}})


def test_base_class_refuses_unexpected_method_state() -> None:
    with pytest.raises(RuntimeError, match="keeps no method state"):
        ContinualCallback().load_state_dict(
            {"version": 1, "protocol": {"task": 0, "started": -1, "ended": -1}, "method": {"x": torch.zeros(1)}}
        )
