"""RNGStateCheckpoint: a run with dropout resumes to exactly the uninterrupted run's parameters."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_forget.callbacks import RNGStateCheckpoint
from lightning_forget.callbacks.rng_state import capture_rng_state, restore_rng_state
from lightning_forget.modules import ContinualClassifier
from tests.helpers.data import BlobStream
from tests.helpers.harness import params_vector, quiet_trainer


def _dropout_model(dm: Any) -> ContinualClassifier:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5))
    return ContinualClassifier(
        backbone=backbone, num_classes=dm.num_classes, input_shape=dm.input_shape, num_tasks=dm.num_tasks, report=False
    )


def _fit(root: Path, *, rng: bool, saver: Optional[ModelCheckpoint] = None, resume: Optional[str] = None) -> torch.Tensor:
    pl.seed_everything(0 if resume is None else 1)  # the resumed run must not depend on the seed
    dm = BlobStream(num_tasks=2, epochs_per_task=2)
    model = _dropout_model(dm)
    callbacks: list[Any] = [RNGStateCheckpoint()] if rng else []
    kwargs: dict[str, Any] = {}
    if saver is not None:
        callbacks.append(saver)
        kwargs["enable_checkpointing"] = True
    trainer = quiet_trainer(root, callbacks, max_epochs=dm.max_epochs, **kwargs)
    trainer.fit(model, dm, ckpt_path=resume)
    return params_vector(model)


@pytest.mark.parametrize("where", ["mid_epoch", "epoch_end"])
def test_dropout_run_resumes_exactly_with_the_callback_and_not_without(tmp_path: Path, where: str) -> None:
    results = {}
    for rng in (True, False):
        ckpt = tmp_path / f"ckpt_{rng}"
        if where == "mid_epoch":
            saver = ModelCheckpoint(dirpath=ckpt, every_n_train_steps=5, save_top_k=-1, filename="{step}")
            name = "step=15.ckpt"
        else:
            saver = ModelCheckpoint(dirpath=ckpt, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
            name = "epoch=1.ckpt"
        full = _fit(tmp_path / f"full_{rng}", rng=rng, saver=saver)
        assert (ckpt / name).exists(), sorted(os.listdir(ckpt))
        resumed = _fit(tmp_path / f"res_{rng}", rng=rng, resume=str(ckpt / name))
        results[rng] = torch.allclose(full, resumed, atol=1e-6)
    assert results[True], "with RNGStateCheckpoint the resumed run must end with the uninterrupted parameters"
    assert not results[False], "without it dropout draws differ (the test would not show anything)"


def test_state_round_trip_restores_every_generator() -> None:
    import random

    import numpy as np

    callback = RNGStateCheckpoint()
    state = callback.state_dict()
    assert state["version"] == 1 and state["world_size"] == 1 and len(state["ranks"]) == 1
    expected = (torch.rand(3), np.random.rand(3), random.random())
    callback.load_state_dict(state)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_other_version_is_refused() -> None:
    state = RNGStateCheckpoint().state_dict()
    state["version"] = 2
    with pytest.raises(RuntimeError, match="version 2"):
        RNGStateCheckpoint().load_state_dict(state)


def test_world_size_change_warns() -> None:
    state = RNGStateCheckpoint().state_dict()
    state["ranks"] = state["ranks"] * 2
    state["world_size"] = 2
    with pytest.warns(UserWarning, match="2 rank"):
        RNGStateCheckpoint().load_state_dict(state)


_DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist
    from lightning_forget.callbacks import RNGStateCheckpoint

    def main(rank, out):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
        dist.init_process_group("gloo", rank=rank, world_size=2)
        torch.manual_seed(100 + rank)  # each rank its own stream
        callback = RNGStateCheckpoint()
        state = callback.state_dict()  # gathered: every rank's state
        expected = torch.rand(4)
        torch.manual_seed(999)  # both ranks now draw the same
        if rank == 0:
            torch.save(state, out + "/state.pt")
        dist.barrier()
        loaded = torch.load(out + "/state.pt", weights_only=False)  # what rank 0 wrote, on every rank
        RNGStateCheckpoint().load_state_dict(loaded)
        drawn = torch.rand(4)
        json.dump({"restored": bool(torch.equal(drawn, expected)), "first": drawn.tolist(),
                   "world": loaded["world_size"], "n": len(loaded["ranks"])}, open(f"{out}/rank{rank}.json", "w"))
        dist.destroy_process_group()

    if __name__ == "__main__":
        torch.multiprocessing.spawn(main, args=(sys.argv[1],), nprocs=2)
    """
)


@pytest.mark.ddp
def test_each_rank_restores_its_own_state(tmp_path: Path) -> None:
    import json
    import socket

    script = tmp_path / "rng_ddp.py"
    script.write_text(_DDP_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PORT=str(port), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, env=env, timeout=240)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["restored"] and r["world"] == 2 and r["n"] == 2 for r in ranks)
    assert ranks[0]["first"] != ranks[1]["first"]  # each rank got its own state, not rank 0's
