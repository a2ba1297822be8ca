"""2-process gloo worker for tests/test_sharding.py: each helper of ``lightning_forget.sharding``
on DTensors sharded like ``fully_shard`` makes them, against the same helper on full tensors."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist


def _full(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # 5 rows over 2 ranks: uneven chunks (3, 2); 1 row: rank 1 holds nothing.
    return {"layers.0.weight": torch.randn(5, 3, generator=g), "layers.1.weight": torch.randn(1, 4, generator=g),
            "layers.2.weight": torch.randn(8, generator=g)}


def _merging_gpt2(mesh) -> dict[str, float]:
    """``lightning_forget.merging`` on the state dicts of a tiny GPT-2 sharded as ``fully_shard`` makes it
    (``Conv1D`` weights, ``lm_head`` tied to ``wte``, two blocks: parameters of equal shapes) against the
    same merges of the unsharded models' state dicts: the largest difference per merge."""
    import copy

    from torch.distributed.fsdp import fully_shard
    from transformers import GPT2Config, GPT2LMHeadModel

    from lightning_forget import sharding as sh
    from lightning_forget.merging import lines_scale, task_arithmetic, ties_merge

    config = GPT2Config(vocab_size=10, n_positions=6, n_embd=4, n_layer=2, n_head=2, n_inner=6)
    plain = []
    for seed in range(3):
        torch.manual_seed(seed)
        plain.append(GPT2LMHeadModel(config))
    models = [copy.deepcopy(m) for m in plain]
    for model in models:
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    merges = {
        "task_arithmetic": lambda b, fs: task_arithmetic(b, fs, scaling=0.3),
        "ties": lambda b, fs: ties_merge(b, fs, k=0.3),
        "lines_scale": lambda b, fs: lines_scale(b, fs[0], alpha=0.5, beta=0.5),
    }
    out: dict[str, float] = {}
    for label, merge in merges.items():
        expected = merge(plain[0].state_dict(), [m.state_dict() for m in plain[1:]])
        for kind, args in (("state_dict", [m.state_dict() for m in models]), ("module", models)):
            got = merge(args[0], args[1:])
            assert sorted(got) == sorted(expected), (label, kind)
            out[f"{label}/{kind}"] = max(float((sh.full_tensor(got[n]) - expected[n]).abs().max()) for n in expected)
    return out


def worker(rank: int, world: int, port: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lightning_forget import sharding as sh

    mesh = init_device_mesh("cpu", (world,))
    full, other = _full(0), _full(1)
    shard = {n: distribute_tensor(t, mesh, [Shard(0)]) for n, t in full.items()}
    shard_other = {n: distribute_tensor(t, mesh, [Shard(0)]) for n, t in other.items()}
    result: dict = {}
    result["is_sharded"] = [sh.is_sharded(shard["layers.0.weight"]), sh.is_sharded(full["layers.0.weight"])]
    result["slices_match"] = all(
        torch.equal(sh.local_view(shard[n]), full[n][sh.global_slice(shard[n])]) for n in full
    )
    result["shard_like"] = all(torch.equal(sh.shard_like(full[n], shard[n]), sh.local_view(shard[n])) for n in full)
    result["full_tensor"] = all(torch.equal(sh.full_tensor(shard[n]), full[n]) for n in full)
    result["full_from_local"] = all(
        torch.equal(sh.full_tensor(sh.local_clone(shard[n]), like=shard[n]), full[n]) for n in full
    )
    # as_layout: local shards kept aside seen as the parameter's layout (reduced over shards, equal DTensor).
    viewed = {n: sh.as_layout(sh.local_clone(shard[n]) * 2, shard[n]) for n in full}
    norms_v = sh.global_norms(viewed)
    result["as_layout"] = bool(
        all(torch.equal(sh.full_tensor(viewed[n]), 2 * full[n]) for n in full)
        and max(abs(float(norms_v[n] - 2 * full[n].double().norm())) for n in full) < 1e-12
        and sh.as_layout(full["layers.0.weight"], full["layers.0.weight"]) is full["layers.0.weight"]
    )
    norms_s, norms_f = sh.global_norms(shard), sh.global_norms(full)
    result["norms"] = max(abs(float(norms_s[n] - norms_f[n])) for n in full)
    # p = 1 and inf (GradNorm's norms) over the shards; rank 1 holds no row of layers.1.weight.
    result["pnorms"] = max(abs(float(sh.global_norms(shard, p)[n] - full[n].double().norm(p=p)))
                           for p in (1, float("inf")) for n in full)
    dots_s, dots_f = sh.global_dots(shard, shard_other), sh.global_dots(full, other)
    result["dots"] = max(abs(float(dots_s[n] - dots_f[n])) for n in full)
    # Top-k with exact ties: magnitudes rounded to one decimal repeat across tensors and ranks.
    scores_f = {n: (t.abs() * 2).round() / 2 for n, t in full.items()}
    scores_s = {n: distribute_tensor(t, mesh, [Shard(0)]) for n, t in scores_f.items()}
    total = sum(t.numel() for t in full.values())
    agree = []
    for k in (0, 1, 5, 11, 17, total):
        masks_f = sh.topk_mask(scores_f, k)
        masks_s = sh.topk_mask(scores_s, k)
        same = all(torch.equal(masks_s[n], masks_f[n][sh.global_slice(scores_s[n])]) for n in full)
        counted = sum(int(m.sum()) for m in masks_f.values())
        agree.append(same and counted == k)
    result["topk"] = agree
    result["topk_has_ties"] = bool(
        len(torch.cat([t.flatten() for t in scores_f.values()]).unique()) < total
    )
    gen_s, gen_f = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    draws_s = [sh.draw_like(shard[n], gen_s) for n in full]
    draws_f = [sh.draw_like(full[n], gen_f) for n in full]
    result["draws"] = all(torch.equal(d_s, d_f[sh.global_slice(shard[n])]) for d_s, d_f, n in zip(draws_s, draws_f, full))
    edited = {n: distribute_tensor(t.clone(), mesh, [Shard(0)]) for n, t in full.items()}
    for n in full:
        sh.edit_local(edited[n], lambda x, y: 0.5 * x + y, shard_other[n])
    result["edit"] = all(torch.allclose(sh.full_tensor(edited[n]), 0.5 * full[n] + other[n]) for n in full)
    # lightning_forget.merging on sharded state dicts (FSDP2's model.state_dict() holds DTensors).
    from lightning_forget.merging import lines_scale, task_arithmetic, ties_merge

    fine = [{n: t + 0.5 * other[n] * (i + 1) for n, t in full.items()} for i in range(2)]
    fine_s = [{n: distribute_tensor(t, mesh, [Shard(0)]) for n, t in f.items()} for f in fine]
    merges = {
        "task_arithmetic": lambda b, fs: task_arithmetic(b, fs, scaling=0.3),
        "ties_official": lambda b, fs: ties_merge(b, fs, k=0.3),
        "ties_ceil": lambda b, fs: ties_merge(b, fs, k=0.3, trim="ceil", zero_sign="zero"),
        "lines_scale": lambda b, fs: lines_scale(b, fs[0], alpha=0.5, beta=0.5),
    }
    result["merging"] = {}
    for label, merge in merges.items():
        expected, got = merge(full, fine), merge(shard, fine_s)
        result["merging"][label] = max(float((sh.full_tensor(got[n]) - expected[n]).abs().max()) for n in full)
    # A gradient outside the training step (backward with .grad stashed): the mean of the ranks'
    # gradients, as DDP's autograd.grad + reduce mean gives, with .grad left as it was.
    import copy

    from torch.distributed.fsdp import fully_shard

    from lightning_forget.gradients import average_gradients, compute_gradients

    torch.manual_seed(5)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    plain = copy.deepcopy(net)
    inputs = [torch.randn(3, 4, generator=torch.Generator().manual_seed(10 + r)) for r in range(world)]
    expected: dict[str, torch.Tensor] = {}
    for x in inputs:
        for name, g in compute_gradients(plain(x).square().sum(), plain).items():
            expected[name] = expected.get(name, 0) + g / world
    for layer in net:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)  # as users do: the layers reshard after the forward
    for p in net.parameters():
        p.grad = torch.full_like(p, 7.0)  # an accumulated gradient the helper must leave alone
    grads = average_gradients(None, compute_gradients(net(inputs[rank]).square().sum(), net))
    result["gradients"] = max(float((sh.full_tensor(grads[n]) - expected[n]).abs().max()) for n in expected)
    result["gradients_sharded"] = all(sh.is_sharded(g) for g in grads.values())
    result["grad_untouched"] = all(bool((sh.local_view(p.grad) == 7.0).all()) for p in net.parameters())
    # The root unit keeps its parameters gathered after a forward with no backward (evaluation):
    # reshard() brings back the sharded DTensors, and the gradient is again the ranks' mean.
    rooted = copy.deepcopy(plain)
    fully_shard(rooted[0], mesh=mesh)
    fully_shard(rooted, mesh=mesh)  # the root owns rooted[2]'s parameters
    with torch.no_grad():
        rooted(inputs[rank])
    gathered_after_eval = not sh.is_sharded(rooted[2].weight)
    sh.reshard(rooted)
    params = dict(rooted.named_parameters())  # before the forward: the sharded parameters
    grads = compute_gradients(rooted(inputs[rank]).square().sum(), params)
    try:  # after it, the root's parameters are gathered copies: refused, not zeros
        compute_gradients(rooted(inputs[rank]).square().sum(), rooted)
        result["gathered_refused"] = ""
    except ValueError as error:
        result["gathered_refused"] = str(error)
    sh.reshard(rooted)
    result["reshard"] = [gathered_after_eval, sh.is_sharded(rooted[2].weight),
                         max(float((sh.full_tensor(grads[n]) - expected[n]).abs().max()) for n in expected)]
    # AdaB2N cannot convert the BatchNorm2d layers of a module sharded before its setup.
    from lightning_forget.callbacks.adab2n import check_convertible

    normed = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    check_convertible(normed)  # not sharded yet: fine
    fully_shard(normed, mesh=mesh)
    try:
        check_convertible(normed)
        result["adab2n_refused"] = ""
    except RuntimeError as error:
        result["adab2n_refused"] = str(error)
    # global_sums: of DTensors, and of local shards in the parameters' layout (`like`).
    sums_f = sh.global_sums({n: t.abs() for n, t in full.items()})
    sums_s = sh.global_sums({n: sh.local_view(shard[n]).abs() for n in full}, like=shard)
    sums_d = sh.global_sums({n: shard[n].double() * shard_other[n].double() for n in full})
    dots_f2 = sh.global_dots(full, other)
    result["sums"] = max(max(abs(float(sums_s[n] - sums_f[n])) for n in full),
                         max(abs(float(sums_d[n] - dots_f2[n])) for n in full))
    # broadcast_buffers: every rank ends with rank 0's buffers (what DDP's broadcast_buffers does).
    norm = torch.nn.BatchNorm1d(3)
    norm.running_mean.fill_(float(rank + 1))
    norm.num_batches_tracked.fill_(rank + 5)
    sh.broadcast_buffers([norm])
    result["buffers"] = [norm.running_mean.tolist(), int(norm.num_batches_tracked)]
    result["merging_gpt2"] = _merging_gpt2(mesh)
    local_bytes = sum(sh.local_clone(t).numel() * t.element_size() for t in shard.values())
    full_bytes = sum(t.numel() * t.element_size() for t in full.values())
    result["bytes"] = [local_bytes, full_bytes]
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    port, out = sys.argv[1], sys.argv[2]
    import lightning_forget.sharding  # noqa: F401  (imported once, before the fork)

    torch.set_num_threads(1)
    torch.multiprocessing.start_processes(worker, args=(2, port, out), nprocs=2, start_method="fork")
