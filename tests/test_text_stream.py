"""TextStreamDataModule: blocks, token replay, budgets, errors, DDP sharding (datamodules/text_stream.py)."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_forget.datamodules.text import TextStreamDataModule, load_corpus, token_stream
from tests.helpers.harness import quiet_trainer
from tests.helpers.text import SMALL, small_text_dm, text_file  # noqa: F401 (fixture)


def test_blocks_shape_and_split() -> None:
    dm = small_text_dm(corpora=["python_docs", "python_code"], block_size=32, val_fraction=0.1)
    for t in range(2):
        item = dm.train_dataset(t)[0]
        assert set(item) == {"input_ids", "labels"}
        assert item["input_ids"].shape == (32,) and item["input_ids"].dtype == torch.long
        assert torch.equal(item["input_ids"], item["labels"])
        stream = token_stream(dm.corpora[t], SMALL)
        n_val = dm.num_val_blocks(t)
        assert n_val == int(np.ceil(0.1 * stream.numel() / 32))
        assert dm.num_train_blocks(t) == (stream.numel() - n_val * 32) // 32
        # Validation is the contiguous tail; training blocks come from the head only.
        val = dm.val_dataset(t)
        assert len(val) == n_val
        assert torch.equal(val[n_val - 1]["input_ids"], stream[-32:])
        tail_start = stream.numel() - n_val * 32
        assert torch.equal(val[0]["input_ids"], stream[tail_start : tail_start + 32])
        assert max(b for _, b in dm.task_indices(t)) * 32 + 32 <= tail_start
    loaders = dm.val_dataloader()
    assert len(loaders) == 2
    assert next(iter(loaders[0]))["input_ids"].shape == (16, 32)

@pytest.mark.parametrize("replay_fraction", [0.0, 0.05, 0.25, 0.5])
def test_replay_fraction_is_exact(replay_fraction: float, text_file: str) -> None:
    dm = small_text_dm(corpora=["python_docs", "python_code", text_file], replay_fraction=replay_fraction)
    for t in range(3):
        n_t = dm.num_train_blocks(t)
        index = dm.task_indices(t)
        expected_replay = 0 if t == 0 else int(np.floor(replay_fraction * n_t + 0.5))
        assert dm.replay_counts(t) == (n_t - expected_replay, expected_replay)
        assert len(index) == n_t == len(dm.train_dataset(t))  # the budget is unchanged
        replayed = [(c, b) for c, b in index if c != t]
        assert len(replayed) == expected_replay
        assert all(0 <= c < t for c, _ in replayed)
        assert all(0 <= b < dm.num_train_blocks(c) for c, b in index)
        assert len(set(index)) == len(index)  # without replacement: the pools are large enough
    # The replay pool is the union of *all* earlier corpora.
    if replay_fraction >= 0.25:
        assert {c for c, _ in dm.task_indices(2) if c != 2} == {0, 1}
    # Replayed items are really the earlier corpora's blocks.
    if replay_fraction > 0:
        dataset = dm.train_dataset(1)
        c, b = dm.task_indices(1)[-1]
        assert c == 0
        assert torch.equal(dataset[len(dataset) - 1]["input_ids"], token_stream("python_docs", SMALL)[b * 32 : b * 32 + 32])

def test_budget_override_and_repetition() -> None:
    small = small_text_dm(corpora=["python_docs", "python_code"], blocks_per_task=10, replay_fraction=0.25)
    assert small.replay_counts(1) == (7, 3)  # round(2.5) = 3, half rounded up
    assert len(small.task_indices(0)) == 10 and len(set(small.task_indices(0))) == 10
    big = small_text_dm(corpora=["python_docs", "python_code"], blocks_per_task=1000, max_chars_per_corpus=8_000)
    n0 = big.num_train_blocks(0)
    index = big.task_indices(0)
    assert len(index) == 1000 and n0 < 1000
    assert set(index) == {(0, b) for b in range(n0)}  # whole passes over the corpus
    counts = np.bincount([b for _, b in index])
    assert counts.max() - counts.min() <= 1

def test_determinism_and_seed() -> None:
    kwargs = dict(corpora=["python_docs", "python_code"], replay_fraction=0.25)
    a = small_text_dm(seed=3, **kwargs)
    torch.manual_seed(123)
    np.random.seed(5)
    b = small_text_dm(seed=3, **kwargs)
    _ = b.task_indices(1)  # order of calls does not matter
    assert a.task_indices(0) == b.task_indices(0) and a.task_indices(1) == b.task_indices(1)
    c = small_text_dm(seed=4, **kwargs)
    assert a.task_indices(1) != c.task_indices(1)
    assert a.replay_counts(1) == c.replay_counts(1)

def test_joint_budget_is_the_sum_of_task_budgets() -> None:
    dm = small_text_dm(corpora=["python_docs", "python_code"], joint=True, replay_fraction=0.25, batch_size=8)
    assert dm.max_epochs == 1
    total = dm.num_train_blocks(0) + dm.num_train_blocks(1)
    loader = dm.train_dataloader()
    assert len(loader.dataset) == total
    assert all(c == 1 for c, _ in dm.task_indices(1, with_replay=False))

@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(corpora=[]), ValueError, "corpora"),
        (dict(corpora="python_docs"), TypeError, "corpora"),
        (dict(corpora=["nope_not_a_corpus"]), ValueError, "nope_not_a_corpus"),
        (dict(block_size=1), ValueError, "block_size"),
        (dict(replay_fraction=1.0), ValueError, "replay_fraction"),
        (dict(replay_fraction=-0.1), ValueError, "replay_fraction"),
        (dict(val_fraction=0.0), ValueError, "val_fraction"),
        (dict(blocks_per_task=0), ValueError, "blocks_per_task"),
        (dict(max_chars_per_corpus=0), ValueError, "max_chars_per_corpus"),
        (dict(tokenizer=3), TypeError, "tokenizer"),
        (dict(seed=-1), ValueError, "seed"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        TextStreamDataModule(**kwargs)

def test_corpus_too_short(tmp_path: Path) -> None:
    path = tmp_path / "tiny.txt"
    path.write_text("too short", encoding="utf-8")
    dm = TextStreamDataModule(corpora=[str(path)], block_size=32)
    with pytest.raises(ValueError, match="too few"):
        dm.setup("fit")

class _RecordShards(Callback):
    """Writes, per rank and epoch, the task indices, the sampler's shard and the batches seen."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.batches: list[torch.Tensor] = []
        self.shard: list[int] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.shard = list(iter(trainer.train_dataloader.sampler))
        self.batches = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self.batches.append(batch["input_ids"].cpu())

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = trainer.datamodule
        task = dm.current_task
        record = {
            "task": task,
            "indices": dm.task_indices(task),
            "shard": self.shard,
            "batches": torch.cat(self.batches),
            "sampler": type(trainer.train_dataloader.sampler).__name__,
        }
        torch.save(record, os.path.join(self.out, f"rank{trainer.global_rank}_epoch{trainer.current_epoch}.pt"))

@pytest.mark.ddp
def test_ddp_ranks_share_index_lists_and_get_disjoint_shards(tmp_path: Path) -> None:
    from lightning_forget.modules.causal_lm import CausalLMModule

    kwargs = dict(
        corpora=["python_docs", "python_code"], block_size=32, max_chars_per_corpus=SMALL,
        replay_fraction=0.25, blocks_per_task=16, batch_size=4, seed=7,
    )
    dm = TextStreamDataModule(**kwargs)
    pl.seed_everything(0)
    model = CausalLMModule(model="gpt2", vocab_size=dm.vocab_size, block_size=32, n_layer=2, n_embd=32, n_head=2)
    trainer = quiet_trainer(
        tmp_path, [_RecordShards(str(tmp_path))], devices=2, strategy="ddp_spawn", max_epochs=dm.max_epochs,
        limit_val_batches=1,
    )
    trainer.fit(model, datamodule=dm)

    reference = TextStreamDataModule(**kwargs)
    reference.setup("fit")
    for epoch in range(2):
        r0 = torch.load(tmp_path / f"rank0_epoch{epoch}.pt")
        r1 = torch.load(tmp_path / f"rank1_epoch{epoch}.pt")
        assert r0["task"] == r1["task"] == epoch
        assert r0["sampler"].startswith("DistributedSampler")  # Lightning shards the task set
        assert r0["indices"] == r1["indices"] == reference.task_indices(epoch)
        assert len(r0["shard"]) == len(r1["shard"]) == 8
        assert set(r0["shard"]).isdisjoint(r1["shard"])
        assert set(r0["shard"]) | set(r1["shard"]) == set(range(16))
        dataset = reference.train_dataset(epoch)
        for record in (r0, r1):
            expected = torch.stack([dataset[i]["input_ids"] for i in record["shard"]])
            assert torch.equal(record["batches"], expected)
