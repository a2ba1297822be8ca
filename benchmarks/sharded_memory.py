"""Per-rank memory of per-parameter state kept as local shards, against a replicated copy.

A method that keeps one tensor per parameter (I-LoRA's slow learner, refresh's Fisher, LiNeS'
pre-trained weights, a saliency mask, a reference model) holds, under DDP, a full copy on every
rank. Under FSDP2 (``fully_shard``, as ``ModelParallelStrategy`` applies it in a user's
``configure_model``) :func:`lightning_forget.sharding.local_clone` keeps only the rank's shard.
This script shards a GPT-2 built from a config (no download) over ``--world`` gloo processes on
CPU, takes one ``local_clone`` of every parameter (the state), and reports per rank the bytes of
that state against the bytes of a full copy, plus the largest rank's share (goal ≤ 1/world +
small overhead; the overhead is ``torch.chunk``'s rounding of dim 0).

    python benchmarks/sharded_memory.py                 # GPT-2, 6 layers, n_embd 384, world 2 and 4
    python benchmarks/sharded_memory.py --quick         # a 2-layer, n_embd 32 model, world 2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from typing import Any, Optional

import torch
import torch.distributed as dist


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _model(layers: int, width: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=257, n_positions=128, n_layer=layers, n_embd=width, n_head=4, bos_token_id=0, eos_token_id=0))


def _worker(rank: int, world: int, port: str, layers: int, width: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_forget.sharding import full_tensor, is_sharded, local_clone

    model = _model(layers, width)
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    mesh = init_device_mesh("cpu", (world,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert is_sharded(model)
    state = {name: local_clone(p) for name, p in model.named_parameters()}
    local_bytes = sum(t.numel() * t.element_size() for t in state.values())
    # The state is the parameters' own shard: gathered, it is the full model (checked on one tensor).
    name, param = next(iter(model.named_parameters()))
    exact = bool(torch.equal(full_tensor(state[name], like=param), full_tensor(param)))
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, {"rank": rank, "local_bytes": local_bytes, "full_bytes": full_bytes, "exact": exact})
    if rank == 0:
        with open(out, "w") as handle:
            json.dump(gathered, handle)
    dist.destroy_process_group()


def measure(world: int, layers: int, width: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ranks.json")
        torch.multiprocessing.start_processes(
            _worker, args=(world, _free_port(), layers, width, out), nprocs=world, start_method="fork"
        )
        with open(out) as handle:
            ranks = json.load(handle)
    full = ranks[0]["full_bytes"]
    largest = max(r["local_bytes"] for r in ranks)
    return {
        "world": world, "layers": layers, "width": width, "full_bytes": full,
        "local_bytes": [r["local_bytes"] for r in ranks],
        "largest_share": largest / full, "ideal_share": 1 / world,
        "exact": all(r["exact"] for r in ranks),
    }


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worlds", type=int, nargs="+", default=None)
    args = parser.parse_args(argv)
    import lightning_forget.sharding  # noqa: F401  (imported once, before the fork)

    torch.set_num_threads(1)
    layers, width = (2, 32) if args.quick else (6, 384)
    worlds = args.worlds or ([2] if args.quick else [2, 4])
    rows = [measure(world, layers, width) for world in worlds]
    print(f"GPT-2 ({layers} layers, n_embd {width}), one local_clone per parameter, fully_shard per block:")
    print("| world | full copy (MiB) | largest rank's shards (MiB) | share | 1/world |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['world']} | {row['full_bytes'] / 2**20:.2f} | {max(row['local_bytes']) / 2**20:.2f} "
              f"| {row['largest_share']:.4f} | {row['ideal_share']:.4f} |")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
