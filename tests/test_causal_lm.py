"""Tests of ``CausalLMModule``: shapes, loss, per-corpus validation metrics, a 2-task fit."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_forget.datamodules.text import TextStreamDataModule
from lightning_forget.modules.causal_lm import CausalLMModule, causal_lm_loss, default_adamw
from tests.helpers.harness import quiet_trainer

TINY = dict(vocab_size=257, block_size=32, n_layer=2, n_embd=32, n_head=4)


def _quiet_trainer(**kwargs) -> pl.Trainer:
    # The shared harness; these runs write nothing (no logger, no checkpoints), so no folder is needed.
    kwargs.setdefault("reload_dataloaders_every_n_epochs", 0)
    kwargs.setdefault("deterministic", False)
    return quiet_trainer(Path.cwd(), [], **kwargs)


class _Blocks(Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_forward_shapes_and_determinism(family: str) -> None:
    pl.seed_everything(0)
    module = CausalLMModule(model=family, **TINY)
    pl.seed_everything(0)
    again = CausalLMModule(model=family, **TINY)
    ids = torch.randint(0, 257, (3, 20))
    logits = module(ids)
    assert logits.shape == (3, 20, 257)
    assert torch.equal(logits, again(ids))
    mask = torch.ones_like(ids)
    assert module(ids, attention_mask=mask).shape == (3, 20, 257)
    assert module.hparams.model == family and "optimizer" not in module.hparams


def test_loss_matches_hugging_face_shifted_loss() -> None:
    pl.seed_everything(0)
    module = CausalLMModule(model="gpt2", **TINY)
    ids = torch.randint(0, 257, (2, 16))
    labels = ids.clone()
    labels[0, :5] = -100
    ours = module.compute_loss({"input_ids": ids, "labels": labels})
    theirs = module.model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(ours, theirs)
    per_token = causal_lm_loss(module(ids), labels, reduction="none")
    assert per_token.shape == (2, 15)
    assert float(per_token[0, :4].detach().abs().sum()) == 0.0  # ignored positions


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_loss_decreases_on_a_repeated_block(family: str) -> None:
    pl.seed_everything(0)
    module = CausalLMModule(model=family, **TINY, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    optimizer = module.configure_optimizers()
    ids = torch.randint(0, 257, (1, 32)).repeat(4, 1)
    batch = {"input_ids": ids, "labels": ids.clone()}
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = module.compute_loss(batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert losses[-1] < min(losses[:10])


def test_validation_logs_token_weighted_loss_and_ppl_per_corpus() -> None:
    pl.seed_everything(0)
    module = CausalLMModule(model="gpt2", **TINY, corpus_names=["prose", "code"])
    g = torch.Generator().manual_seed(1)
    corpora = [torch.randint(0, 257, (5, 32), generator=g), torch.randint(0, 128, (3, 32), generator=g)]
    # Uneven batches (2, 2, 1) and (2, 1): the mean must weight every token once.
    loaders = [DataLoader(_Blocks(ids), batch_size=2) for ids in corpora]
    metrics = _quiet_trainer().validate(module, dataloaders=loaders, verbose=False)[0]
    module.eval()
    with torch.no_grad():
        expected = [float(causal_lm_loss(module(ids), ids)) for ids in corpora]
    for t, loss in enumerate(expected):
        assert metrics[f"val/loss/task_{t}"] == pytest.approx(loss, rel=1e-5)
        assert metrics[f"val/ppl/task_{t}"] == pytest.approx(math.exp(metrics[f"val/loss/task_{t}"]), rel=1e-5)
    assert metrics["val/loss/prose"] == metrics["val/loss/task_0"]
    assert metrics["val/ppl/code"] == metrics["val/ppl/task_1"]
    assert metrics["val/loss_avg"] == pytest.approx(sum(expected) / 2, rel=1e-5)
    # A second run starts from reset metrics.
    again = _quiet_trainer().validate(module, dataloaders=loaders, verbose=False)[0]
    assert again["val/loss/task_0"] == pytest.approx(metrics["val/loss/task_0"], rel=1e-6)


def test_two_task_fit_over_text_stream() -> None:
    dm = TextStreamDataModule(
        corpora=["python_docs", "python_code"], block_size=32, max_chars_per_corpus=20_000,
        replay_fraction=0.25, batch_size=4,
    )
    pl.seed_everything(0)
    module = CausalLMModule(
        model="llama", vocab_size=dm.vocab_size, block_size=dm.block_size, n_layer=2, n_embd=32, n_head=4,
        corpus_names=dm.corpus_names,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step)),
    )
    trainer = _quiet_trainer(
        max_epochs=dm.max_epochs, reload_dataloaders_every_n_epochs=1, limit_train_batches=3, limit_val_batches=2,
    )
    trainer.fit(module, datamodule=dm)
    logged = trainer.callback_metrics
    for key in ("val/loss/task_0", "val/loss/task_1", "val/ppl/python_code", "val/loss_avg", "train/loss"):
        assert key in logged and torch.isfinite(logged[key])
    assert trainer.global_step == 6
    assert trainer.lr_scheduler_configs[0].interval == "step"
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(3e-4 / 7)


def test_pretrained_path_loads_locally(tmp_path: Path) -> None:
    pl.seed_everything(0)
    source = CausalLMModule(model="gpt2", **TINY)
    source.model.save_pretrained(tmp_path / "tiny")
    loaded = CausalLMModule(pretrained_path=str(tmp_path / "tiny"))
    ids = torch.randint(0, 257, (2, 10))
    torch.testing.assert_close(loaded(ids), source(ids))


def test_default_optimizer_is_adamw() -> None:
    module = CausalLMModule(model="gpt2", **TINY)
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["lr"] == 3e-4
    assert module.optimizer_factory is default_adamw


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(model="bert"), ValueError, "model"),
        (dict(n_embd=30, n_head=4), ValueError, "n_head"),
        (dict(model="llama", n_embd=36, n_head=12), ValueError, "head dimension"),
        (dict(vocab_size=0), ValueError, "vocab_size"),
        (dict(dropout=1.0), ValueError, "dropout"),
        (dict(pretrained_path="/no/such/dir"), ValueError, "pretrained_path"),
        (dict(scheduler_interval="batch"), ValueError, "scheduler_interval"),
        (dict(optimizer="adam"), TypeError, "optimizer"),
        (dict(corpus_names="prose"), TypeError, "corpus_names"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        CausalLMModule(**kwargs)


def test_lightning_cli_with_linked_datamodule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr("sys.argv", ["lightning-forget"])

    class _CLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
            parser.link_arguments("data.corpus_names", "model.corpus_names", apply_on="instantiate")
            parser.link_arguments("data.block_size", "model.block_size")

    cli = _CLI(
        CausalLMModule,
        TextStreamDataModule,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=[
            "fit", "--data.block_size=32", "--data.max_chars_per_corpus=20000", "--data.replay_fraction=0.05",
            "--data.batch_size=4", "--model.n_embd=32",
            "--model.optimizer=AdamW", "--model.optimizer.lr=1e-3",
            "--model.lr_scheduler=CosineAnnealingLR", "--model.lr_scheduler.T_max=10",
            "--trainer.max_epochs=2", "--trainer.reload_dataloaders_every_n_epochs=1",
            "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.accelerator=cpu",
            "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
    )
    assert cli.model.hparams.corpus_names == ["python_docs", "python_code"]
    assert cli.model.hparams.block_size == 32 and cli.model.hparams.vocab_size == 257
    # CosineAnnealingLR(T_max=10) stepped once per optimizer step: 4 steps.
    expected = 1e-3 * 0.5 * (1 + math.cos(math.pi * 4 / 10))
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(expected)
    assert "val/ppl/python_code" in cli.trainer.callback_metrics


@pytest.mark.parametrize(
    ("names", "error", "match"),
    [
        (["prose", "prose"], ValueError, r"`corpus_names` must be distinct names \('prose' repeated\)"),
        ([], ValueError, "`corpus_names` must be a non-empty list"),
        (["prose", 3], TypeError, r"`corpus_names\[1\]` must be a str"),
        ("prose", TypeError, "`corpus_names` must be a list or tuple"),
    ],
)
def test_bad_corpus_names(names: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        CausalLMModule(**TINY, corpus_names=names)


def test_wrong_size_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="`vocab_size` must be an int"):
        CausalLMModule(vocab_size="257")


class _SizedData(pl.LightningDataModule):
    """Random blocks over ``vocab_size`` tokens, one validation loader per corpus name."""

    def __init__(self, vocab_size: int, block_size: int, corpus_names: list[str]) -> None:
        super().__init__()
        self.vocab_size, self.block_size, self.corpus_names = vocab_size, block_size, corpus_names
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(vocab_size - 8, vocab_size, (4, block_size), generator=g)  # the top ids

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Blocks(self.ids), batch_size=2)

    def val_dataloader(self) -> list[DataLoader]:
        return [DataLoader(_Blocks(self.ids), batch_size=2) for _ in self.corpus_names]


@pytest.mark.parametrize(
    ("model_kwargs", "match"),
    [
        # ids up to 299 against a 257-row embedding: an IndexError deep in the model without the check
        (dict(vocab_size=257, block_size=32), r"`vocab_size` must be >= the vocab_size 300 of _SizedData .*got 257"),
        (dict(vocab_size=300, block_size=16), r"`block_size` must be >= the block_size 32 of _SizedData .*got 16"),
        (dict(vocab_size=300, block_size=32, corpus_names=["prose"]),
         r"`corpus_names` must be one name per corpus of _SizedData \(2: \['prose', 'code'\]\)"),
    ],
)
def test_model_smaller_than_the_datamodule_is_refused_in_setup(model_kwargs: dict, match: str) -> None:
    dm = _SizedData(vocab_size=300, block_size=32, corpus_names=["prose", "code"])
    module = CausalLMModule(model="gpt2", n_layer=1, n_embd=16, n_head=2, **model_kwargs)
    with pytest.raises(ValueError, match=match):
        _quiet_trainer(fast_dev_run=1).fit(module, datamodule=dm)


def test_model_matching_the_datamodule_trains() -> None:
    dm = _SizedData(vocab_size=300, block_size=32, corpus_names=["prose", "code"])
    module = CausalLMModule(model="gpt2", vocab_size=300, block_size=32, n_layer=1, n_embd=16, n_head=2,
                            corpus_names=["prose", "code"])
    trainer = _quiet_trainer(fast_dev_run=1)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 1 and "val/loss/code" in trainer.callback_metrics


def test_fewer_corpus_names_than_validation_loaders() -> None:
    module = CausalLMModule(**TINY, corpus_names=["prose"])
    loaders = [DataLoader(_Blocks(torch.randint(0, 257, (2, 32))), batch_size=2) for _ in range(2)]
    with pytest.raises(ValueError, match=r"`corpus_names` must be one name per validation dataloader \(dataloader 1 has none\)"):
        _quiet_trainer().validate(module, dataloaders=loaders, verbose=False)
