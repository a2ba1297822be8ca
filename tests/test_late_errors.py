"""Errors that used to arrive only after a task had trained are raised in setup or at the first batch.

Before: RefreshLearning's Fisher on label-free batches or an unsized dataset failed at the first
task's end; ILoRA's ``layers=[99]``, a backbone without a Hugging Face model and token batches
served as tuples failed at the first replay step of task 1. Each case here must stop before any
optimizer step of the first fit.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_forget.callbacks import ILoRA, RefreshLearning
from tests.helpers.harness import quiet_trainer
from tests.helpers.text import tiny_lm

LORA = {"r": 2, "alpha": 4.0, "dropout": 0.0}


class _Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x = batch[0]
        return self(x).pow(2).mean()  # a label-free loss (e.g. self-supervised)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Stream(IterableDataset):
    def __iter__(self):
        gen = torch.Generator().manual_seed(0)
        for _ in range(8):
            yield torch.randn(4, generator=gen), torch.randint(0, 3, (), generator=gen)


def _fit(tmp_path: Path, callback, model, loader) -> pl.Trainer:
    trainer = quiet_trainer(tmp_path, [callback], max_epochs=1, reload_dataloaders_every_n_epochs=0)
    trainer.fit(model, loader)
    return trainer


def test_refresh_without_labels_and_default_fisher_samples_fails_at_the_first_batch(tmp_path: Path) -> None:
    loader = DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4)
    refresh = RefreshLearning(loss_fn=lambda module, batch: module(batch[0]).pow(2).mean())
    trainer = quiet_trainer(tmp_path, [refresh], max_epochs=1, reload_dataloaders_every_n_epochs=0)
    with pytest.raises(KeyError, match="fisher_samples=0"):
        trainer.fit(_Classifier(), loader)
    assert trainer.global_step == 0
    # the advertised fix works
    _fit(tmp_path, RefreshLearning(loss_fn=refresh.loss_fn, fisher_samples=0), _Classifier(), loader)


def test_refresh_on_an_unsized_dataset_fails_at_the_first_batch(tmp_path: Path) -> None:
    trainer = quiet_trainer(tmp_path, [RefreshLearning()], max_epochs=1, reload_dataloaders_every_n_epochs=0)
    with pytest.raises(RuntimeError, match="fisher_samples=0"):
        trainer.fit(_Classifier(), DataLoader(_Stream(), batch_size=4))
    assert trainer.global_step == 0


class _TupleLM(pl.LightningModule):
    """A user's causal LM whose loader yields ``(input_ids, attention_mask)`` tuples."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_lm().model

    def training_step(self, batch, batch_idx):
        ids, mask = batch
        return self.model(input_ids=ids, attention_mask=mask, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


class _PlainBackbone(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def _tokens() -> DataLoader:
    ids = torch.randint(0, 257, (8, 12), generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(ids, torch.ones_like(ids)), batch_size=4)


@pytest.mark.parametrize("case", ["layers", "tuples", "no_hf_model"])
def test_ilora_refuses_at_setup_or_first_batch(tmp_path: Path, case: str) -> None:
    if case == "layers":
        callback = ILoRA(lora=dict(LORA), layers=[99], save_adapters=False)
        model, loader, error, match = _TupleLM(), _tokens(), ValueError, r"`layers`.*3 hidden states.*\[99\]"
    elif case == "tuples":
        callback = ILoRA(lora=dict(LORA), save_adapters=False)
        model, loader, error, match = _TupleLM(), _tokens(), RuntimeError, "dicts with `input_ids`"
    else:
        callback = ILoRA(lora=dict(LORA, target_modules=["0", "2"]), save_adapters=False)
        data = TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,)))
        model, loader, error, match = _PlainBackbone(), DataLoader(data, batch_size=4), RuntimeError, "no Hugging Face model"
    trainer = quiet_trainer(tmp_path, [callback], max_epochs=1, reload_dataloaders_every_n_epochs=0)
    with pytest.raises(error, match=match):
        trainer.fit(model, loader)
    assert trainer.global_step == 0
