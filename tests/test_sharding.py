"""``lightning_forget.sharding`` on 2 gloo processes against the same helpers on full tensors."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch

from lightning_forget import sharding as sh


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("sharding") / "ranks.json"
    subprocess.run([sys.executable, "-m", "tests.helpers.sharding_check", _free_port(), str(out)], check=True, timeout=300)
    return json.loads(out.read_text())


def test_local_shards_and_their_place_in_the_full_tensor(ranks) -> None:
    for result in ranks:
        assert result["is_sharded"] == [True, False]
        assert result["slices_match"] and result["shard_like"]
        assert result["full_tensor"] and result["full_from_local"]
        assert result["as_layout"]  # a kept local shard seen as a DTensor: full value and norm of the whole


def test_norms_and_dots_over_shards_equal_the_full_tensors(ranks) -> None:
    for result in ranks:
        assert result["norms"] < 1e-12 and result["dots"] < 1e-12


def test_global_topk_selects_the_unsharded_set_with_ties(ranks) -> None:
    assert ranks[0]["topk_has_ties"]
    for result in ranks:
        assert all(result["topk"]), result["topk"]


def test_draws_and_edits_equal_the_unsharded_run(ranks) -> None:
    for result in ranks:
        assert result["draws"] and result["edit"]


def test_merging_on_sharded_state_dicts_equals_full_ones(ranks) -> None:
    for result in ranks:
        assert set(result["merging"]) == {"task_arithmetic", "ties_official", "ties_ceil", "lines_scale"}
        assert all(diff < 1e-6 for diff in result["merging"].values()), result["merging"]


def test_gradient_outside_the_step_is_refused_for_sharded_parameters(ranks) -> None:
    # autograd.grad with allow_unused would give zeros: the sharded weights are not in the graph.
    for result in ranks:
        assert "are sharded (FSDP2 DTensors)" in result["gradients_refused"]
        assert "strategy='ddp'" in result["gradients_refused"]


def test_local_state_is_about_half_of_a_replicated_copy(ranks) -> None:
    local = [r["bytes"][0] for r in ranks]
    full = ranks[0]["bytes"][1]
    assert sum(local) == full
    assert max(local) <= full / 2 + 4 * 4 * 2  # chunks of ceil(rows / 2): at most one extra row per tensor


def test_plain_tensors_pass_through() -> None:
    t = torch.arange(6.0).reshape(3, 2)
    assert sh.local_view(t) is t and sh.full_tensor(t) is t and sh.shard_like(t, t) is t
    assert sh.global_slice(t) == (slice(0, 3), slice(0, 2))
    masks = sh.topk_mask({"x": torch.tensor([1.0, 3.0, 3.0, 2.0]), "y": torch.tensor([3.0])}, 2)
    assert masks["x"].tolist() == [False, True, True, False] and masks["y"].tolist() == [False]
    with pytest.raises(ValueError, match="k=9"):
        sh.topk_mask({"x": t}, 9)
