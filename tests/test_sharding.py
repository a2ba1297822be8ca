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
        assert result["norms"] < 1e-12 and result["dots"] < 1e-12 and result["pnorms"] < 1e-12


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


def test_merging_a_sharded_gpt2_state_dict_equals_the_unsharded_merge(ranks) -> None:
    """A sharded model's state dict (DTensors: no storage of their own, ``data_ptr()`` 0) with parameters of
    equal shapes (GPT-2's blocks) and a tied weight (``lm_head``/``wte``): each parameter merged as its own,
    the tied pair as one, as for the unsharded model; passed as state dicts or as the modules."""
    for result in ranks:
        merged = result["merging_gpt2"]
        assert len(merged) == 6 and all(diff < 1e-6 for diff in merged.values()), merged


def test_gradient_outside_the_step_is_the_ranks_mean_and_leaves_grad_alone(ranks) -> None:
    # autograd.grad does not reach FSDP2's sharded weights (it sees the gathered copies); the helper
    # takes backward() with .grad stashed: the sharded gradient equals the mean DDP computes.
    for result in ranks:
        assert result["gradients"] < 1e-6 and result["gradients_sharded"]
        assert result["grad_untouched"]


def test_reshard_after_an_evaluation_forward(ranks) -> None:
    for result in ranks:
        gathered_after_eval, sharded_again, gradient_error = result["reshard"]
        assert gathered_after_eval and sharded_again and gradient_error < 1e-6
        assert "collect the parameters before the forward" in result["gathered_refused"]


def test_adab2n_refuses_a_module_sharded_before_its_conversion(ranks) -> None:
    for result in ranks:
        assert "already sharded" in result["adab2n_refused"] and "configure_model" in result["adab2n_refused"]


def test_global_sums_of_shards_and_buffer_broadcast(ranks) -> None:
    for result in ranks:
        assert result["sums"] < 1e-12
        assert result["buffers"] == [[1.0, 1.0, 1.0], 5]  # rank 0's running mean and counter


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
    assert [float(sh.global_norms({"x": -t}, p)["x"]) for p in (1, float("inf"))] == [15.0, 5.0]
    with pytest.raises(ValueError, match="p must be 1, 2 or inf, got 3"):
        sh.global_norms({"x": t}, 3)


def test_batches_per_rank_is_the_busiest_ranks_count() -> None:
    for size in range(0, 12):
        for world in (1, 2, 3):
            for batch in (1, 2, 4):
                busiest = max(len(range(r, size, world)) for r in range(world))
                assert sh.batches_per_rank(size, world, batch) == -(-busiest // batch), (size, world, batch)
    with pytest.raises(ValueError, match="batch_size=0"):
        sh.batches_per_rank(3, 2, 0)
