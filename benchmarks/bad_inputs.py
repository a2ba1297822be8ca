"""Tally how the public classes answer bad input: clear error, unclear error, crash, or silence.

Each case gives one public class or function one wrong argument (or a run whose data contradicts
an argument) and records what happens:

- **clear**: an exception raised by ``lightning_forget`` itself that names the argument;
- **unclear**: an exception raised by ``lightning_forget`` that does not name it;
- **crash**: an exception raised from inside torch, Lightning or another dependency (a raw
  traceback the user must decode);
- **silent**: nothing raised: the bad value was accepted.

Run ``python benchmarks/bad_inputs.py`` (``--verbose`` prints every case with its message). The
tally is the figure quoted in the first-contact issue's closing note; a test runs the script in
``--quick`` mode so it cannot rot.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import traceback
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)

import lightning.pytorch as pl  # noqa: E402

for _name in ("lightning.pytorch", "lightning.fabric"):  # Lightning sets INFO on import
    logging.getLogger(_name).setLevel(logging.ERROR)

PACKAGE_DIR = str(Path(__file__).resolve().parents[1] / "lightning_forget")


def _tiny_trainer(tmp: str, callbacks: Optional[list] = None, **kwargs: Any) -> pl.Trainer:
    kwargs.setdefault("max_epochs", 1)
    return pl.Trainer(
        default_root_dir=tmp,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks or [],
        **kwargs,
    )


def _blobs(num_classes: int = 4, dim: int = 8, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, dim, generator=gen), torch.randint(0, num_classes, (n,), generator=gen)


def _split_data(num_classes: int = 4, dim: int = 8, **kwargs: Any):
    from lightning_forget.datamodules import SplitDataModule

    x, y = _blobs(num_classes, dim, 64)
    kwargs.setdefault("classes_per_task", 2)
    kwargs.setdefault("batch_size", 8)
    return SplitDataModule(train=(x, y), **kwargs)


class _Plain(pl.LightningModule):
    """An ordinary user module: (x, y) batches, logs val_acc per loader."""

    def __init__(self, dim: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.net = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch[0], batch[1]
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit_plain(callback: Any) -> None:
    x, y = _blobs()
    with tempfile.TemporaryDirectory() as tmp:
        loader = DataLoader(TensorDataset(x, y), batch_size=8)
        _tiny_trainer(tmp, [callback]).fit(_Plain(), loader, loader)


def _fit_classifier(model_kwargs: dict[str, Any], data_kwargs: Optional[dict[str, Any]] = None) -> None:
    from lightning_forget.modules import ContinualClassifier

    data = _split_data(**(data_kwargs or {}))
    data.setup("fit")
    kwargs = {"num_classes": data.num_classes, "input_shape": data.input_shape, "num_tasks": data.num_tasks,
              "hidden_sizes": [8], "report": False}
    kwargs.update(model_kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        _tiny_trainer(tmp, max_epochs=data.max_epochs, reload_dataloaders_every_n_epochs=1).fit(
            ContinualClassifier(**kwargs), data
        )


def _fit_lm(model_kwargs: dict[str, Any]) -> None:
    from lightning_forget.datamodules import TextStreamDataModule
    from lightning_forget.modules import CausalLMModule

    data = TextStreamDataModule(block_size=32, max_chars_per_corpus=8000, batch_size=4, blocks_per_task=8)
    kwargs = {"block_size": 32, "n_layer": 1, "n_embd": 16, "n_head": 2}
    kwargs.update(model_kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        _tiny_trainer(tmp, max_epochs=data.max_epochs, reload_dataloaders_every_n_epochs=1, limit_train_batches=2,
                      limit_val_batches=1).fit(CausalLMModule(**kwargs), data)


class _NoForward(pl.LightningModule):
    """The README's module: no ``forward``; ``training_step`` calls ``self.net(x)``."""

    def __init__(self, dim: int = 8, classes: int = 4, conv: bool = False) -> None:
        super().__init__()
        if conv:
            self.net = nn.Sequential(nn.Unflatten(1, (2, 2, dim // 4)), nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4),
                                     nn.Flatten(), nn.Linear(4 * dim // 2, classes))
        else:
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(dim, classes))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


class _Unlabelled(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Unsized(torch.utils.data.IterableDataset):
    def __iter__(self):
        x, y = _blobs()
        return iter(zip(x, y))


def _fit_user(callbacks: Any, model: Optional[pl.LightningModule] = None, loader: Any = None, fits: int = 1,
              **trainer_kwargs: Any) -> None:
    """One fit per task with plain loaders, as README mode 2."""
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    x, y = _blobs()
    model = model if model is not None else _NoForward()
    loader = loader if loader is not None else DataLoader(TensorDataset(x, y), batch_size=8)
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(fits):
            _tiny_trainer(tmp, callbacks, **trainer_kwargs).fit(model, loader)


class _LM(pl.LightningModule):
    """A user's causal LM (transformers GPT-2 at ``self.model``), token batches as given."""

    def __init__(self, plain: bool = False) -> None:
        super().__init__()
        if plain:
            self.model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        else:
            from transformers import GPT2Config, GPT2LMHeadModel

            self.model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=1, n_head=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if isinstance(batch, dict):
            return self.model(**batch).loss
        if batch[0].is_floating_point():
            return nn.functional.cross_entropy(self(batch[0]), batch[1])
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def _fit_lm_user(callback: Any, batches: str = "dict", plain: bool = False, fits: int = 2) -> None:
    ids = torch.randint(0, 32, (16, 10), generator=torch.Generator().manual_seed(0))
    if plain:
        data: Any = TensorDataset(*_blobs(n=16))
    elif batches == "dict":
        data = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]
    else:
        data = TensorDataset(ids, torch.ones_like(ids))
    _fit_user(callback, _LM(plain=plain), DataLoader(data, batch_size=4), fits=fits, limit_train_batches=2)


def _forget_dm(**kwargs: Any):
    from lightning_forget.datamodules import ForgetRetainDataModule

    kwargs.setdefault("forget_classes", [[8, 9]])
    kwargs.setdefault("data_ratio", 0.05)
    return ForgetRetainDataModule(builtin="digits", batch_size=64, **kwargs)


def _fit_forget(callbacks: list, model: Optional[pl.LightningModule] = None, datamodule: Any = None) -> None:
    dm = datamodule if datamodule is not None else _forget_dm()
    model = model if model is not None else _NoForward(dim=64, classes=10)
    with tempfile.TemporaryDirectory() as tmp:
        _tiny_trainer(tmp, callbacks, max_epochs=1, limit_train_batches=2).fit(model, dm)


class _FlatDigits(_NoForward):
    def __init__(self) -> None:
        super().__init__(dim=64, classes=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]
        return nn.functional.cross_entropy(self(x), y)


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.weight": torch.randn(3, 3, generator=gen) for i in range(3)}


def _nan_state() -> dict[str, torch.Tensor]:
    state = _state(1)
    state["layers.1.weight"][0, 0] = float("nan")
    return state


def cases() -> list[tuple[str, str, str, Callable[[], Any]]]:
    """(class, what is wrong, argument the error must name, thunk)."""
    from lightning_forget import merging
    from lightning_forget.buffers import ReservoirBuffer, make_buffer
    from lightning_forget.callbacks import (
        ContinualEvaluation,
        ContinualMetrics,
        DarkExperienceReplay,
        ExperienceReplay,
        LiNeS,
        LRRewarming,
    )
    from lightning_forget.datamodules import SplitDigits, SplitMNIST, TextStreamDataModule
    from lightning_forget.modules import CausalLMModule, ContinualClassifier

    unwritable = "/proc/lightning_forget_cannot_write_here"
    out: list[tuple[str, str, str, Callable[[], Any]]] = [
        ("ExperienceReplay", "buffer_size=0", "buffer_size", lambda: ExperienceReplay(buffer_size=0)),
        ("ExperienceReplay", "buffer_size=2.5", "buffer_size", lambda: ExperienceReplay(buffer_size=2.5)),
        ("ExperienceReplay", "buffer_size=True", "buffer_size", lambda: ExperienceReplay(buffer_size=True)),
        ("ExperienceReplay", "replay_batch_size=-1", "replay_batch_size", lambda: ExperienceReplay(replay_batch_size=-1)),
        ("ExperienceReplay", "buffer='fifo'", "buffer", lambda: ExperienceReplay(buffer="fifo")),
        ("ExperienceReplay", "seed='0'", "seed", lambda: ExperienceReplay(seed="0")),
        ("ExperienceReplay", "target_key names no field (fit)", "target_key",
         lambda: _fit_plain(ExperienceReplay(buffer_size=8, target_key="label"))),
        ("DarkExperienceReplay", "alpha=-1", "alpha", lambda: DarkExperienceReplay(alpha=-1.0)),
        ("DarkExperienceReplay", "alpha=nan", "alpha", lambda: DarkExperienceReplay(alpha=float("nan"))),
        ("DarkExperienceReplay", "beta=inf", "beta", lambda: DarkExperienceReplay(beta=float("inf"))),
        ("DarkExperienceReplay", "buffer_size=-3", "buffer_size", lambda: DarkExperienceReplay(buffer_size=-3)),
        ("DarkExperienceReplay", "alpha='0.1'", "alpha", lambda: DarkExperienceReplay(alpha="0.1")),
        ("LRRewarming", "max_lr=0", "max_lr", lambda: LRRewarming(max_lr=0.0)),
        ("LRRewarming", "max_lr=nan", "max_lr", lambda: LRRewarming(max_lr=float("nan"))),
        ("LRRewarming", "min_lr > max_lr", "min_lr", lambda: LRRewarming(max_lr=1e-3, min_lr=1e-2)),
        ("LRRewarming", "warmup=-0.5", "warmup", lambda: LRRewarming(max_lr=1e-3, warmup=-0.5)),
        ("LRRewarming", "decay='step'", "decay", lambda: LRRewarming(max_lr=1e-3, decay="step")),
        ("LRRewarming", "steps_per_task=0", "steps_per_task", lambda: LRRewarming(max_lr=1e-3, steps_per_task=0)),
        ("LiNeS", "alpha=1.5", "alpha", lambda: LiNeS(alpha=1.5)),
        ("LiNeS", "alpha=-0.1", "alpha", lambda: LiNeS(alpha=-0.1)),
        ("LiNeS", "alpha=nan", "alpha", lambda: LiNeS(alpha=float("nan"))),
        ("LiNeS", "head_policy='drop'", "head_policy", lambda: LiNeS(head_policy="drop")),
        ("LiNeS", "apply_at='epoch'", "apply_at", lambda: LiNeS(apply_at="epoch")),
        ("LiNeS", "layer_pattern='('", "layer_pattern", lambda: LiNeS(layer_pattern="(")),
        ("LiNeS", "pretrained_ckpt missing file", "pretrained_ckpt", lambda: LiNeS(pretrained_ckpt="/nonexistent.ckpt")),
        ("ContinualEvaluation", "every_n_steps=0", "every_n_steps", lambda: ContinualEvaluation(every_n_steps=0)),
        ("ContinualEvaluation", "samples_per_task=0", "samples_per_task", lambda: ContinualEvaluation(samples_per_task=0)),
        ("ContinualEvaluation", "window=0", "window", lambda: ContinualEvaluation(window=0)),
        ("ContinualEvaluation", "max_eval_fraction=2", "max_eval_fraction", lambda: ContinualEvaluation(max_eval_fraction=2.0)),
        ("ContinualEvaluation", "window_scope='all'", "window_scope", lambda: ContinualEvaluation(window_scope="all")),
        ("ContinualEvaluation", "unwritable log_dir (fit)", "log_dir",
         lambda: _fit_plain(ContinualEvaluation(every_n_steps=1, log_dir=unwritable))),
        ("ContinualMetrics", "key=3", "key", lambda: ContinualMetrics(key=3)),
        ("ContinualMetrics", "report='yes'", "report", lambda: ContinualMetrics(report="yes")),
        ("ContinualMetrics", "log_dir=5", "log_dir", lambda: ContinualMetrics(log_dir=5)),
        ("ContinualMetrics", "key=''", "key", lambda: ContinualMetrics(key="")),
        ("ContinualMetrics", "filename_prefix=7", "filename_prefix", lambda: ContinualMetrics(filename_prefix=7)),
        ("ContinualMetrics", "unwritable log_dir (fit)", "log_dir",
         lambda: _fit_plain(ContinualMetrics(key="val_acc", log_dir=unwritable))),
        ("ContinualClassifier", "input_shape=[]", "input_shape", lambda: ContinualClassifier(input_shape=[])),
        ("ContinualClassifier", "input_shape=(-1, 28)", "input_shape", lambda: ContinualClassifier(input_shape=(-1, 28))),
        ("ContinualClassifier", "hidden_sizes=[0]", "hidden_sizes", lambda: ContinualClassifier(hidden_sizes=[0])),
        ("ContinualClassifier", "num_classes=0", "num_classes", lambda: ContinualClassifier(num_classes=0)),
        ("ContinualClassifier", "resnet_width=0", "resnet_width",
         lambda: ContinualClassifier(backbone="resnet", resnet_width=0)),
        ("ContinualClassifier", "optimizer='adam'", "optimizer", lambda: ContinualClassifier(optimizer="adam")),
        ("ContinualClassifier", "backbone='vgg'", "backbone", lambda: ContinualClassifier(backbone="vgg")),
        ("ContinualClassifier", "label >= num_classes (fit)", "num_classes",
         lambda: _fit_classifier({"num_classes": 2})),
        ("ContinualClassifier", "input_shape does not match the data (fit)", "input_shape",
         lambda: _fit_classifier({"input_shape": (5,)})),
        ("CausalLMModule", "corpus_names too short (fit)", "corpus_names",
         lambda: _fit_lm({"corpus_names": ["prose"]})),
        ("CausalLMModule", "corpus_names duplicated", "corpus_names",
         lambda: CausalLMModule(corpus_names=["a", "a"])),
        ("CausalLMModule", "vocab_size below the data's (fit)", "vocab_size", lambda: _fit_lm({"vocab_size": 50})),
        ("CausalLMModule", "block_size below the data's (fit)", "block_size", lambda: _fit_lm({"block_size": 8})),
        ("CausalLMModule", "model='bert'", "model", lambda: CausalLMModule(model="bert")),
        ("CausalLMModule", "dropout=1.5", "dropout", lambda: CausalLMModule(dropout=1.5)),
        ("CausalLMModule", "n_embd not divisible by n_head", "n_head", lambda: CausalLMModule(n_embd=30, n_head=4)),
        ("SplitMNIST", "classes_per_task=3 (10 classes)", "classes_per_task", lambda: SplitMNIST(classes_per_task=3)),
        ("SplitMNIST", "epochs_per_task=0", "epochs_per_task", lambda: SplitMNIST(epochs_per_task=0)),
        ("SplitMNIST", "batch_size=0", "batch_size", lambda: SplitMNIST(batch_size=0)),
        ("SplitMNIST", "val_fraction=1.5", "val_fraction", lambda: SplitMNIST(val_fraction=1.5)),
        ("SplitMNIST", "class_order with a duplicate", "class_order",
         lambda: SplitMNIST(class_order=[0, 0, 1, 2, 3, 4, 5, 6, 7, 8]).setup("fit")),
        ("SplitMNIST", "task=7 (5 tasks)", "task", lambda: SplitMNIST(task=7).setup("fit")),
        ("SplitDigits", "num_tasks=0", "num_tasks", lambda: SplitDigits(num_tasks=0)),
        ("SplitDigits", "seed=1.5", "seed", lambda: SplitDigits(seed=1.5)),
        ("SplitDigits", "num_workers=-1", "num_workers", lambda: SplitDigits(num_workers=-1)),
        ("SplitDigits", "eval_batch_size=0", "eval_batch_size", lambda: SplitDigits(eval_batch_size=0)),
        ("SplitDigits", "class_order with a label absent from the data", "class_order",
         lambda: SplitDigits(class_order=list(range(9)) + [42]).setup("fit")),
        ("TextStreamDataModule", "corpora=['nope']", "corpora", lambda: TextStreamDataModule(corpora=["nope"]).setup("fit")),
        ("TextStreamDataModule", "block_size=0", "block_size", lambda: TextStreamDataModule(block_size=0)),
        ("TextStreamDataModule", "replay_fraction=1.5", "replay_fraction", lambda: TextStreamDataModule(replay_fraction=1.5)),
        ("TextStreamDataModule", "val_fraction=-0.1", "val_fraction", lambda: TextStreamDataModule(val_fraction=-0.1)),
        ("TextStreamDataModule", "tokenizer path missing", "tokenizer",
         lambda: TextStreamDataModule(tokenizer="/nonexistent/tokenizer").setup("fit")),
        ("ReplayBuffer", "capacity=0", "capacity", lambda: ReservoirBuffer(0)),
        ("ReplayBuffer", "capacity='10'", "capacity", lambda: ReservoirBuffer("10")),
        ("ReplayBuffer", "kind='fifo'", "buffer", lambda: make_buffer("fifo", 10)),
        ("ReplayBuffer", "fields of different lengths", "batch",
         lambda: ReservoirBuffer(4).add({"x": torch.zeros(3, 2), "y": torch.zeros(2)})),
        ("ReplayBuffer", "sample(-1)", "n", lambda: (lambda b: (b.add({"x": torch.zeros(3, 2)}), b.sample(-1)))(ReservoirBuffer(4))),
        ("lines_scale", "alpha=-1", "alpha", lambda: merging.lines_scale(_state(), _state(1), alpha=-1.0)),
        ("lines_scale", "alpha=nan", "alpha", lambda: merging.lines_scale(_state(), _state(1), alpha=float("nan"))),
        ("lines_scale", "head_policy='drop'", "head_policy",
         lambda: merging.lines_scale(_state(), _state(1), alpha=0.5, head_policy="drop")),
        ("lines_scale", "different keys", "finetuned",
         lambda: merging.lines_scale(_state(), {"other.weight": torch.zeros(3, 3)}, alpha=0.5)),
        ("lines_scale", "layer_pattern matching nothing", "layer_pattern",
         lambda: merging.lines_scale(_state(), _state(1), alpha=0.5, layer_pattern=r"blocks\.(\d+)")),
        ("ties_merge", "k=0", "k", lambda: merging.ties_merge(_state(), [_state(1)], k=0.0)),
        ("ties_merge", "k=1.5", "k", lambda: merging.ties_merge(_state(), [_state(1)], k=1.5)),
        ("ties_merge", "empty finetuned_list", "finetuned_list", lambda: merging.ties_merge(_state(), [])),
        ("ties_merge", "NaN in a fine-tuned model", "layers.1.weight",
         lambda: merging.ties_merge(_state(), [_nan_state(), _state(2)])),
        ("ties_merge", "scaling=nan", "scaling", lambda: merging.ties_merge(_state(), [_state(1)], scaling=float("nan"))),
        ("task_arithmetic", "empty finetuned_list", "finetuned_list", lambda: merging.task_arithmetic(_state(), [])),
        ("task_arithmetic", "scaling=inf", "scaling",
         lambda: merging.task_arithmetic(_state(), [_state(1)], scaling=float("inf"))),
        ("task_arithmetic", "shape mismatch", "finetuned_list",
         lambda: merging.task_arithmetic(_state(), [{k: torch.zeros(2, 2) for k in _state()}])),
        ("task_arithmetic", "NaN in a fine-tuned model", "layers.1.weight",
         lambda: merging.task_arithmetic(_state(), [_nan_state()])),
        ("task_arithmetic", "finetuned_list not a list", "finetuned_list",
         lambda: merging.task_arithmetic(_state(), _state(1))),
    ]
    out += _wave2_cases(unwritable)
    out += _unlearning_cases()
    out += _lm_eval_cases()
    out += _erasure_cases()
    return out


def _erasure_cases() -> list[tuple[str, str, str, Callable[[], Any]]]:
    """Concept erasure on diffusion models (constructor checks, and a run with a concept the model lacks)."""
    from lightning_forget.callbacks import ESD, UCE, ConceptAblation
    from lightning_forget.callbacks.erasure_eval import ErasureEvaluation
    from lightning_forget.modules import DiffusionModule

    def erase_unknown_concept() -> None:
        model = DiffusionModule(preset=None, num_classes=3, sample_size=8, in_channels=1, block_out_channels=[8],
                                norm_num_groups=4, cross_attention_dim=8, attention_head_dim=4, num_train_timesteps=10)
        loader = DataLoader(TensorDataset(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)), batch_size=2)
        with tempfile.TemporaryDirectory() as tmp:
            _tiny_trainer(tmp, [ESD(erase="cat", ddim_steps=1)], max_steps=1).fit(model, loader)

    return [
        ("DiffusionModule", "unet='transformer'", "unet", lambda: DiffusionModule(unet="transformer")),
        ("DiffusionModule", "label_dropout=1", "label_dropout", lambda: DiffusionModule(label_dropout=1.0)),
        ("DiffusionModule", "block_out_channels=(10, 20)", "block_out_channels", lambda: DiffusionModule(block_out_channels=(10, 20))),
        ("DiffusionModule", "pretrained_path missing", "pretrained_path", lambda: DiffusionModule(pretrained_path="/nonexistent/model")),
        ("ESD", "erase=[]", "erase", lambda: ESD(erase=[])),
        ("ESD", "erase=[-1]", "erase", lambda: ESD(erase=[-1])),
        ("ESD", "parameters='xattn'", "parameters", lambda: ESD(erase=[3], parameters="xattn")),
        ("ESD", "negative_guidance=-1", "negative_guidance", lambda: ESD(erase=[3], negative_guidance=-1.0)),
        ("ESD", "lora_alpha without lora_rank", "lora_alpha", lambda: ESD(erase=[3], lora_alpha=4.0)),
        ("ESD", "erase='cat' on digits", "erase", erase_unknown_concept),
        ("ConceptAblation", "anchor=1.5", "anchor", lambda: ConceptAblation(erase=[3], anchor=1.5)),
        ("UCE", "lamb=0", "lamb", lambda: UCE(erase=[3], lamb=0.0)),
        ("UCE", "lora_rank=4", "lora_rank", lambda: UCE(erase=[3], lora_rank=4)),
        ("ErasureEvaluation", "data='cifar'", "data", lambda: ErasureEvaluation(erase=[3], data="cifar")),
        ("ErasureEvaluation", "classifier_ckpt missing", "classifier_ckpt",
         lambda: ErasureEvaluation(erase=[3], classifier_ckpt="/nonexistent.ckpt")),
    ]


def _lm_eval_cases() -> list[tuple[str, str, str, Callable[[], Any]]]:
    """The LM unlearning evaluation: the plain function, GradNorm and the callback."""
    from lightning_forget.callbacks import LMUnlearningEvaluation
    from lightning_forget.datamodules import FictitiousQADataModule, TextStreamDataModule
    from lightning_forget.metrics.functional_lm import gradnorm_score
    from lightning_forget.modules import CausalLMModule
    from lightning_forget.modules.causal_lm import build_tiny_causal_lm
    from lightning_forget.unlearning.lm_eval import evaluate_lm_unlearning

    dm = FictitiousQADataModule(num_people=3, questions_per_person=1, num_countries=0, num_perturbed=1, forget_percent=34)
    model = build_tiny_causal_lm("gpt2", 257, dm.block_size + 8, 1, 16, 2)
    tok = dm.tokenizer

    def evaluate(splits: Any = None, **kwargs: Any) -> Any:
        kwargs.setdefault("generate", False)
        return evaluate_lm_unlearning(model, splits if splits is not None else {"forget": dm.dataset("forget")}, tok,
                                      progress=False, **kwargs)

    def fit(callback: Any, datamodule: Any) -> None:
        module = CausalLMModule(n_layer=1, n_embd=16, n_head=2, block_size=max(64, getattr(datamodule, "block_size", 64) + 8))
        with tempfile.TemporaryDirectory() as tmp:
            _tiny_trainer(tmp, [callback], max_epochs=1, limit_train_batches=1, limit_val_batches=0,
                          reload_dataloaders_every_n_epochs=1).fit(module, datamodule)

    other = evaluate({"forget": dm.records("retain")}, gradnorm=False)  # statistics of other data

    def fit_with_other_stats() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "other_stats.json")
            with open(path, "w") as handle:
                json.dump(other, handle)
            fit(LMUnlearningEvaluation(retain_stats=path, progress=False),
                FictitiousQADataModule(num_people=3, questions_per_person=1, num_countries=0, forget_percent=34))
    ids = torch.tensor([[1, 2, 3, 4]])
    return [
        ("evaluate_lm_unlearning", "no forget split", "splits", lambda: evaluate({"retain": dm.dataset("retain")})),
        ("evaluate_lm_unlearning", "splits a list", "splits", lambda: evaluate([dm.dataset("forget")])),
        ("evaluate_lm_unlearning", "a split as a file name", "splits", lambda: evaluate({"forget": "forget.json"})),
        ("evaluate_lm_unlearning", "batch_size=0", "batch_size", lambda: evaluate(batch_size=0)),
        ("evaluate_lm_unlearning", "max_new_tokens=0", "max_new_tokens", lambda: evaluate(max_new_tokens=0)),
        ("evaluate_lm_unlearning", "rank=2 of 2", "rank", lambda: evaluate(rank=2, world_size=2)),
        ("evaluate_lm_unlearning", "an empty answer", "answer",
         lambda: evaluate({"forget": [{"question": "Who?", "answer": ""}]})),
        ("evaluate_lm_unlearning", "a record without an answer", "answer", lambda: evaluate({"forget": [{"question": "Who?"}]})),
        ("evaluate_lm_unlearning", "retain_stats missing file", "retain_stats", lambda: evaluate(retain_stats="missing.json")),
        ("evaluate_lm_unlearning", "retain_stats of other data", "retain_stats", lambda: evaluate(retain_stats=other)),
        ("evaluate_lm_unlearning", "retain_stats=[1]", "retain_stats", lambda: evaluate(retain_stats=[1])),
        ("evaluate_lm_unlearning", "k=0", "k must", lambda: evaluate(k=0.0)),
        ("evaluate_lm_unlearning", "gradnorm_p=3", "gradnorm_p", lambda: evaluate(gradnorm_p=3)),
        ("gradnorm_score", "p=3", "p must", lambda: gradnorm_score(model, ids, ids, p=3)),
        ("gradnorm_score", "labels all -100", "answer", lambda: gradnorm_score(model, ids, torch.full_like(ids, -100))),
        ("LMUnlearningEvaluation", "every_n_epochs=0", "every_n_epochs", lambda: LMUnlearningEvaluation(every_n_epochs=0)),
        ("LMUnlearningEvaluation", "splits=['retain']", "splits", lambda: LMUnlearningEvaluation(splits=["retain"])),
        ("LMUnlearningEvaluation", "splits='forget'", "splits", lambda: LMUnlearningEvaluation(splits="forget")),
        ("LMUnlearningEvaluation", "score_weights={'accuracy': 1}", "score_weights",
         lambda: LMUnlearningEvaluation(score_weights={"accuracy": 1.0})),
        ("LMUnlearningEvaluation", "forget_quality weight without retain", "score_weights",
         lambda: LMUnlearningEvaluation(score_weights={"forget_quality": 1.0})),
        ("LMUnlearningEvaluation", "save_best without score_weights", "save_best", lambda: LMUnlearningEvaluation(save_best=True)),
        ("LMUnlearningEvaluation", "retain_model missing", "retain_model", lambda: LMUnlearningEvaluation(retain_model="/no/model")),
        ("LMUnlearningEvaluation", "max_new_tokens=0", "max_new_tokens", lambda: LMUnlearningEvaluation(max_new_tokens=0)),
        ("LMUnlearningEvaluation", "batch_size=0", "batch_size", lambda: LMUnlearningEvaluation(batch_size=0)),
        ("LMUnlearningEvaluation", "text-stream datamodule (fit)", "datamodule",
         lambda: fit(LMUnlearningEvaluation(progress=False),
                     TextStreamDataModule(block_size=32, max_chars_per_corpus=2000, batch_size=4, blocks_per_task=4))),
        ("LMUnlearningEvaluation", "retain_stats of other data (fit)", "retain_stats",
         fit_with_other_stats),
    ]


def _wave2_cases(unwritable: str) -> list[tuple[str, str, str, Callable[[], Any]]]:
    """The classes of the second wave (refresh, AdaB2N, FPF, LoRA methods, forgetting, layers)."""
    import lightning_forget.nn as lf_nn
    from lightning_forget.callbacks import (
        FPF,
        KFPF,
        AdaB2N,
        ContinualEvaluation,
        DarkExperienceReplay,
        ForgetRetainEvaluation,
        GSLoRA,
        ILoRA,
        InfiniteLRSchedule,
        RefreshLearning,
    )
    from lightning_forget.datamodules import (
        DomainIncrementalDataModule,
        ForgetRetainDataModule,
        InstructionStreamDataModule,
        SplitDataModule,
    )
    from lightning_forget.fisher import fisher_diagonal
    from lightning_forget.lora import LoRASettings

    x, y = _blobs()
    linear = nn.Linear(8, 4)
    dicts = [{"x": x[:4], "y": y[:4]}]
    return [
        ("RefreshLearning", "delta=-1", "delta", lambda: RefreshLearning(delta=-1.0)),
        ("RefreshLearning", "damping=nan", "damping", lambda: RefreshLearning(damping=float("nan"))),
        ("RefreshLearning", "every_n_steps=0", "every_n_steps", lambda: RefreshLearning(every_n_steps=0)),
        ("RefreshLearning", "fisher_samples=-1", "fisher_samples", lambda: RefreshLearning(fisher_samples=-1)),
        ("RefreshLearning", "loss_fn=3", "loss_fn", lambda: RefreshLearning(loss_fn=3)),
        ("RefreshLearning", "input_key=1.5", "input_key", lambda: RefreshLearning(input_key=1.5)),
        ("RefreshLearning", "module without forward (fit)", "forward_fn", lambda: _fit_user(RefreshLearning())),
        ("RefreshLearning", "label-free batches, default fisher_samples (fit)", "fisher_samples",
         lambda: _fit_user(RefreshLearning(loss_fn=lambda m, b: m(b[0]).pow(2).mean()), _Unlabelled(),
                           DataLoader(TensorDataset(x), batch_size=8))),
        ("RefreshLearning", "unsized dataset (fit)", "fisher_samples",
         lambda: _fit_user(RefreshLearning(), _Unlabelled(), DataLoader(_Unsized(), batch_size=8))),
        ("AdaB2N", "kappa=1.5", "kappa", lambda: AdaB2N(kappa=1.5)),
        ("AdaB2N", "lambd=-1", "lambd", lambda: AdaB2N(lambd=-1.0)),
        ("AdaB2N", "ada_t0=-1", "ada_t0", lambda: AdaB2N(ada_t0=-1)),
        ("AdaB2N", "num_tasks=0", "num_tasks", lambda: AdaB2N(num_tasks=0)),
        ("AdaB2N", "classes_per_task=0", "classes_per_task", lambda: AdaB2N(classes_per_task=0)),
        ("AdaB2N", "target_key=3", "target_key", lambda: AdaB2N(target_key=3)),
        ("AdaB2N", "no num_tasks with plain loaders (fit)", "num_tasks",
         lambda: _fit_user(AdaB2N(), _NoForward(conv=True))),
        ("AdaB2N", "module without BatchNorm2d (fit)", "BatchNorm2d", lambda: _fit_user(AdaB2N(num_tasks=2))),
        ("KFPF", "k=0", "k", lambda: KFPF(k=0)),
        ("KFPF", "k=None and interval=None", "interval", lambda: KFPF(k=None, interval=None)),
        ("KFPF", "lr=0", "lr", lambda: KFPF(lr=0.0)),
        ("KFPF", "module_types=['conv2d']", "module_types", lambda: KFPF(module_types=["conv2d"])),
        ("KFPF", "module_types='batchnorm'", "module_types", lambda: KFPF(module_types="batchnorm")),
        ("KFPF", "finetune_steps=0", "finetune_steps", lambda: KFPF(finetune_steps=0)),
        ("KFPF", "module without forward (fit)", "forward_fn", lambda: _fit_user(KFPF(k=1, buffer_size=8), fits=2)),
        ("KFPF", "module_patterns matching nothing (fit)", "module_patterns",
         lambda: _fit_user(KFPF(k=1, module_types=[], module_patterns=["nothing"]), _FlatDigits())),
        ("FPF", "finetune_steps=0", "finetune_steps", lambda: FPF(finetune_steps=0)),
        ("FPF", "lr=-1", "lr", lambda: FPF(lr=-1.0)),
        ("FPF", "buffer_size=0", "buffer_size", lambda: FPF(buffer_size=0)),
        ("FPF", "every_task='yes'", "every_task", lambda: FPF(every_task="yes")),
        ("FPF", "kd_weight=nan", "kd_weight", lambda: FPF(kd_weight=float("nan"))),
        ("FPF", "module without forward (fit)", "forward_fn", lambda: _fit_user(FPF(buffer_size=8, finetune_steps=2))),
        ("ILoRA", "ema=1.0", "ema", lambda: ILoRA(ema=1.0)),
        ("ILoRA", "layers=[]", "layers", lambda: ILoRA(layers=[])),
        ("ILoRA", "layers='all'", "layers", lambda: ILoRA(layers="all")),
        ("ILoRA", "inference_learner='mean'", "inference_learner", lambda: ILoRA(inference_learner="mean")),
        ("ILoRA", "lora=5", "lora", lambda: ILoRA(lora=5)),
        ("ILoRA", "model_attr=''", "model_attr", lambda: ILoRA(model_attr="")),
        ("ILoRA", "layers=[99] (fit)", "layers",
         lambda: _fit_lm_user(ILoRA(lora={"r": 2, "alpha": 4.0}, layers=[99], save_adapters=False, buffer_size=8))),
        ("ILoRA", "token batches as tuples (fit)", "input_ids",
         lambda: _fit_lm_user(ILoRA(lora={"r": 2, "alpha": 4.0}, save_adapters=False, buffer_size=8), batches="tuple")),
        ("ILoRA", "model_attr names nothing (fit)", "model_attr",
         lambda: _fit_lm_user(ILoRA(lora={"r": 2, "alpha": 4.0}, model_attr="backbone", save_adapters=False))),
        ("ILoRA", "backbone without a Hugging Face model (fit)", "model_attr",
         lambda: _fit_lm_user(ILoRA(lora={"r": 2, "alpha": 4.0, "target_modules": ["0", "2"]}, save_adapters=False,
                                    buffer_size=8), plain=True)),
        ("GSLoRA", "r=0", "r", lambda: GSLoRA(r=0)),
        ("GSLoRA", "grouping='row'", "grouping", lambda: GSLoRA(grouping="row")),
        ("GSLoRA", "beta=[]", "beta", lambda: GSLoRA(beta=[])),
        ("GSLoRA", "eps=0", "eps", lambda: GSLoRA(eps=0.0)),
        ("GSLoRA", "bound=-1", "bound", lambda: GSLoRA(bound=-1.0)),
        ("GSLoRA", "forget_stream=''", "forget_stream", lambda: GSLoRA(forget_stream="")),
        ("GSLoRA", "one-stream batches (fit)", "forget_stream",
         lambda: _fit_user(GSLoRA(target_modules=["net.1"]), _FlatDigits(), DataLoader(TensorDataset(*_blobs(10, 64)), batch_size=8))),
        ("GSLoRA", "module without forward (fit)", "forward_fn",
         lambda: _fit_forget([GSLoRA(target_modules=["net.1"])], _NoForward(dim=64, classes=10))),
        ("GSLoRA", "target_modules matching nothing (fit)", "target_modules",
         lambda: _fit_forget([GSLoRA(target_modules=["nothing"])], _FlatDigits())),
        ("ForgetRetainEvaluation", "split='train'", "split", lambda: ForgetRetainEvaluation(split="train")),
        ("ForgetRetainEvaluation", "mia='yes'", "mia", lambda: ForgetRetainEvaluation(mia="yes")),
        ("ForgetRetainEvaluation", "batch_size=0", "batch_size", lambda: ForgetRetainEvaluation(batch_size=0)),
        ("ForgetRetainEvaluation", "report=1", "report", lambda: ForgetRetainEvaluation(report=1)),
        ("ForgetRetainEvaluation", "log_dir=3", "log_dir", lambda: ForgetRetainEvaluation(log_dir=3)),
        ("ForgetRetainEvaluation", "plain loaders, no forget datamodule (fit)", "ForgetRetainDataModule",
         lambda: _fit_user(ForgetRetainEvaluation(report=False), _FlatDigits(), DataLoader(TensorDataset(*_blobs(10, 64)), batch_size=8))),
        ("ForgetRetainEvaluation", "module without forward (fit)", "forward_fn",
         lambda: _fit_forget([ForgetRetainEvaluation(report=False), GSLoRA(target_modules=["net.1"])],
                             _NoForward(dim=64, classes=10))),
        ("ForgetRetainEvaluation", "unwritable log_dir (fit)", "log_dir",
         lambda: _fit_forget([GSLoRA(target_modules=["net.1"]), ForgetRetainEvaluation(log_dir=unwritable)], _FlatDigits())),
        ("DarkExperienceReplay", "module without forward (fit)", "forward_fn",
         lambda: _fit_user(DarkExperienceReplay(buffer_size=8))),
        ("ContinualEvaluation", "module without forward (fit)", "forward_fn",
         lambda: _fit_user(ContinualEvaluation(every_n_steps=1, save_csv=False, save_plot=False))),
        ("InfiniteLRSchedule", "max_lr=0", "max_lr", lambda: InfiniteLRSchedule(max_lr=0.0)),
        ("InfiniteLRSchedule", "decay='step'", "decay", lambda: InfiniteLRSchedule(max_lr=1e-3, decay="step")),
        ("InfiniteLRSchedule", "warmup=-1", "warmup", lambda: InfiniteLRSchedule(max_lr=1e-3, warmup=-1)),
        ("InfiniteLRSchedule", "cooldown_steps=-1", "cooldown_steps",
         lambda: InfiniteLRSchedule(max_lr=1e-3, cooldown_steps=-1)),
        ("InfiniteLRSchedule", "anneal='x'", "anneal", lambda: InfiniteLRSchedule(max_lr=1e-3, anneal="x")),
        ("InstructionStreamDataModule", "tasks=['nope']", "tasks",
         lambda: InstructionStreamDataModule(tasks=["nope"]).setup("fit")),
        ("InstructionStreamDataModule", "tasks=[]", "tasks", lambda: InstructionStreamDataModule(tasks=[])),
        ("InstructionStreamDataModule", "examples_per_task=0", "examples_per_task",
         lambda: InstructionStreamDataModule(examples_per_task=0)),
        ("InstructionStreamDataModule", "max_length=0", "max_length", lambda: InstructionStreamDataModule(max_length=0)),
        ("InstructionStreamDataModule", "batch_size=0", "batch_size", lambda: InstructionStreamDataModule(batch_size=0)),
        ("ForgetRetainDataModule", "forget_classes=[[8.7]]", "forget_classes",
         lambda: _forget_dm(forget_classes=[[8.7]]).setup("fit")),
        ("ForgetRetainDataModule", "every class forgotten", "forget_classes",
         lambda: _forget_dm(forget_classes=[list(range(10))]).setup("fit")),
        ("ForgetRetainDataModule", "data_ratio=0", "data_ratio", lambda: _forget_dm(data_ratio=0.0)),
        ("ForgetRetainDataModule", "mode='x'", "mode", lambda: ForgetRetainDataModule(builtin="digits", mode="x")),
        ("ForgetRetainDataModule", "builtin='cifar'", "builtin", lambda: ForgetRetainDataModule(builtin="cifar")),
        ("DomainIncrementalDataModule", "transform='flip'", "transform",
         lambda: DomainIncrementalDataModule(train=(x, y), transform="flip")),
        ("DomainIncrementalDataModule", "num_tasks=0", "num_tasks", lambda: DomainIncrementalDataModule(train=(x, y), num_tasks=0)),
        ("DomainIncrementalDataModule", "angles=[]", "angles",
         lambda: DomainIncrementalDataModule(train=(x, y), transform="rotate", angles=[])),
        ("DomainIncrementalDataModule", "val_fraction=2", "val_fraction",
         lambda: DomainIncrementalDataModule(train=(x, y), val_fraction=2.0)),
        ("DomainIncrementalDataModule", "batch_size=0", "batch_size", lambda: DomainIncrementalDataModule(train=(x, y), batch_size=0)),
        ("SplitDataModule", "classes_per_task=0", "classes_per_task", lambda: SplitDataModule(train=(x, y), classes_per_task=0)),
        ("SplitDataModule", "num_tasks=-1", "num_tasks", lambda: SplitDataModule(train=(x, y), num_tasks=-1)),
        ("SplitDataModule", "val_fraction=1", "val_fraction", lambda: SplitDataModule(train=(x, y), classes_per_task=2, val_fraction=1.0)),
        ("SplitDataModule", "class_order with a duplicate", "class_order",
         lambda: SplitDataModule(train=(x, y), classes_per_task=2, class_order=[0, 0, 1, 2]).setup("fit")),
        ("SplitDataModule", "train=None", "train", lambda: SplitDataModule(classes_per_task=2).setup("fit")),
        ("AdaB2NBatchNorm2d", "num_features=0", "num_features", lambda: lf_nn.AdaB2NBatchNorm2d(0, 2, 0.5)),
        ("AdaB2NBatchNorm2d", "num_tasks=0", "num_tasks", lambda: lf_nn.AdaB2NBatchNorm2d(4, 0, 0.5)),
        ("AdaB2NBatchNorm2d", "kappa=2", "kappa", lambda: lf_nn.AdaB2NBatchNorm2d(4, 2, 2.0)),
        ("AdaB2NBatchNorm2d", "momentum=None", "momentum", lambda: lf_nn.AdaB2NBatchNorm2d(4, 2, 0.5, momentum=None)),
        ("AdaB2NBatchNorm2d", "eps=-1", "eps", lambda: lf_nn.AdaB2NBatchNorm2d(4, 2, 0.5, eps=-1.0)),
        ("AdaB2NBatchNorm2d", "set_task_ids of floats", "task_ids",
         lambda: lf_nn.AdaB2NBatchNorm2d(4, 2, 0.5).set_task_ids(torch.zeros(3))),
        ("convert_adab2n", "num_tasks=0", "num_tasks", lambda: lf_nn.convert_adab2n(nn.BatchNorm2d(4), 0, 0.5)),
        ("convert_adab2n", "kappa=-1", "kappa", lambda: lf_nn.convert_adab2n(nn.BatchNorm2d(4), 2, -1.0)),
        ("convert_adab2n", "init_weight=nan", "init_weight",
         lambda: lf_nn.convert_adab2n(nn.BatchNorm2d(4), 2, 0.5, init_weight=float("nan"))),
        ("convert_adab2n", "num_tasks='2'", "num_tasks", lambda: lf_nn.convert_adab2n(nn.BatchNorm2d(4), "2", 0.5)),
        ("convert_adab2n", "renormalize='no'", "renormalize",
         lambda: lf_nn.convert_adab2n(nn.BatchNorm2d(4), 2, 0.5, renormalize="no")),
        ("nn backbones", "MLP input_shape=[]", "input_shape", lambda: lf_nn.MLP(input_shape=[])),
        ("nn backbones", "MLP dropout=1.5", "dropout", lambda: lf_nn.MLP(input_shape=[8], dropout=1.5)),
        ("nn backbones", "ConvNet channels=[0]", "channels", lambda: lf_nn.ConvNet(channels=[0])),
        ("nn backbones", "ResNet width=0", "width", lambda: lf_nn.ResNet(input_shape=(3, 8, 8), width=0)),
        ("nn backbones", "ViT patch_size=5 on 28x28", "patch_size", lambda: lf_nn.ViT(patch_size=5)),
        ("nn backbones", "ViT heads not dividing hidden_size", "num_attention_heads",
         lambda: lf_nn.ViT(hidden_size=64, num_attention_heads=3)),
        ("LoRASettings", "r=0", "r", lambda: LoRASettings(r=0)),
        ("LoRASettings", "alpha=-1", "alpha", lambda: LoRASettings(alpha=-1.0)),
        ("LoRASettings", "dropout=1.5", "dropout", lambda: LoRASettings(dropout=1.5)),
        ("LoRASettings", "kind='mlp'", "kind", lambda: LoRASettings(kind="mlp")),
        ("LoRASettings", "target_modules=3", "target_modules", lambda: LoRASettings(target_modules=3)),
        ("fisher_diagonal", "model='x'", "model", lambda: fisher_diagonal("x", [(x, y)])),
        ("fisher_diagonal", "loss='kl'", "loss", lambda: fisher_diagonal(linear, [(x, y)], loss="kl")),
        ("fisher_diagonal", "max_samples=0", "max_samples", lambda: fisher_diagonal(linear, [(x, y)], max_samples=0)),
        ("fisher_diagonal", "dict batches", "batches", lambda: fisher_diagonal(linear, dicts, progress=False)),
        ("fisher_diagonal", "no batches", "batches", lambda: fisher_diagonal(linear, [], progress=False)),
    ]


def _unlearning_cases() -> list[tuple[str, str, str, Callable[[], Any]]]:
    """The unlearning baselines, their evaluation, the LM methods and the fictitious-QA data."""
    from lightning_forget.callbacks import (
        NPO, RMU, SCRUB, GradDiff, GradientAscent, IdkPO, L1Sparse, RandomLabels, SalUn, SimNPO, UnlearningEvaluation,
    )
    from lightning_forget.datamodules import FictitiousQADataModule

    return [
        ("GradientAscent", "forget_weight=-1", "forget_weight", lambda: GradientAscent(forget_weight=-1.0)),
        ("GradientAscent", "retain_weight=-1", "retain_weight", lambda: GradientAscent(retain_weight=-1.0)),
        ("GradientAscent", "bound=-1", "bound", lambda: GradientAscent(bound=-1.0)),
        ("GradientAscent", "forget_passes=0", "forget_passes", lambda: GradientAscent(forget_passes=0.0)),
        ("GradientAscent", "guard_mode='sideways'", "guard_mode", lambda: GradientAscent(guard_mode="sideways")),
        ("GradientAscent", "module without forward (fit)", "forward_fn",
         lambda: _fit_forget([GradientAscent(save_original=False)])),
        ("GradDiff", "gamma=-1", "gamma", lambda: GradDiff(gamma=-1.0)),
        ("GradDiff", "alpha=-1", "alpha", lambda: GradDiff(alpha=-1.0)),
        ("GradDiff", "retain_loss='mse'", "retain_loss", lambda: GradDiff(retain_loss="mse")),
        ("GradDiff", "restore_mode='best'", "restore_mode", lambda: GradDiff(restore_mode="best")),
        ("GradDiff", "seed='0'", "seed", lambda: GradDiff(seed="0")),
        ("GradDiff", "gradient_surgery='pcgrad'", "gradient_surgery", lambda: GradDiff(gradient_surgery="pcgrad")),
        ("GradDiff", "gradient_surgery=True", "gradient_surgery", lambda: GradDiff(gradient_surgery=True)),
        *_erasure_b_cases(),
        ("RandomLabels", "forget_weight=nan", "forget_weight", lambda: RandomLabels(forget_weight=float("nan"))),
        ("RandomLabels", "exclude_true='yes'", "exclude_true", lambda: RandomLabels(exclude_true="yes")),
        ("RandomLabels", "mask_fraction=1.5", "mask_fraction", lambda: RandomLabels(mask_fraction=1.5)),
        ("RandomLabels", "save_original='no'", "save_original", lambda: RandomLabels(save_original="no")),
        ("RandomLabels", "guard_action='panic'", "guard_action", lambda: RandomLabels(guard_action="panic")),
        ("L1Sparse", "alpha=-1", "alpha", lambda: L1Sparse(alpha=-1.0)),
        ("L1Sparse", "no_l1_epochs=-1", "no_l1_epochs", lambda: L1Sparse(no_l1_epochs=-1)),
        ("L1Sparse", "no_l1_epochs=1.5", "no_l1_epochs", lambda: L1Sparse(no_l1_epochs=1.5)),
        ("L1Sparse", "retain_weight=-1", "retain_weight", lambda: L1Sparse(retain_weight=-1.0)),
        ("L1Sparse", "forget_passes=-2", "forget_passes", lambda: L1Sparse(forget_passes=-2.0)),
        ("SCRUB", "temperature=0", "temperature", lambda: SCRUB(temperature=0.0)),
        ("SCRUB", "gamma=-1", "gamma", lambda: SCRUB(gamma=-1.0)),
        ("SCRUB", "alpha=-1", "alpha", lambda: SCRUB(alpha=-1.0)),
        ("SCRUB", "msteps=-1", "msteps", lambda: SCRUB(msteps=-1)),
        ("SCRUB", "forget_weight=-1", "forget_weight", lambda: SCRUB(forget_weight=-1.0)),
        ("SalUn", "mask_fraction=0", "mask_fraction", lambda: SalUn(mask_fraction=0.0)),
        ("SalUn", "mask_fraction=2", "mask_fraction", lambda: SalUn(mask_fraction=2.0)),
        ("SalUn", "mask_fraction='half'", "mask_fraction", lambda: SalUn(mask_fraction="half")),
        ("SalUn", "reference_offload='no'", "reference_offload", lambda: SalUn(reference_offload="no")),
        ("SalUn", "guard_threshold without guard_monitor", "guard_threshold", lambda: SalUn(guard_threshold=0.5)),
        ("UnlearningEvaluation", "every_n_epochs=0", "every_n_epochs", lambda: UnlearningEvaluation(every_n_epochs=0)),
        ("UnlearningEvaluation", "mia='lira'", "mia", lambda: UnlearningEvaluation(mia="lira")),
        ("UnlearningEvaluation", "batch_size=0", "batch_size", lambda: UnlearningEvaluation(batch_size=0)),
        ("UnlearningEvaluation", "retrained=3", "retrained", lambda: UnlearningEvaluation(retrained=3)),
        ("UnlearningEvaluation", "before='yes'", "before", lambda: UnlearningEvaluation(before="yes")),
        ("NPO", "beta=0", "beta", lambda: NPO(beta=0.0)),
        ("NPO", "gamma=-1", "gamma", lambda: NPO(gamma=-1.0)),
        ("NPO", "alpha=-1", "alpha", lambda: NPO(alpha=-1.0)),
        ("NPO", "retain_loss='mse'", "retain_loss", lambda: NPO(retain_loss="mse")),
        ("NPO", "beta=nan", "beta", lambda: NPO(beta=float("nan"))),
        ("SimNPO", "beta=-1", "beta", lambda: SimNPO(beta=-1.0)),
        ("SimNPO", "delta=nan", "delta", lambda: SimNPO(delta=float("nan"))),
        ("SimNPO", "gamma=-1", "gamma", lambda: SimNPO(gamma=-1.0)),
        ("SimNPO", "alpha=-1", "alpha", lambda: SimNPO(alpha=-1.0)),
        ("SimNPO", "retain_loss=3", "retain_loss", lambda: SimNPO(retain_loss=3)),
        ("IdkPO", "beta=0", "beta", lambda: IdkPO(beta=0.0)),
        ("IdkPO", "idk_answers=[]", "idk_answers", lambda: IdkPO(idk_answers=[])),
        ("IdkPO", "idk_answers='no idea'", "idk_answers", lambda: IdkPO(idk_answers="no idea")),
        ("IdkPO", "gamma=-1", "gamma", lambda: IdkPO(gamma=-1.0)),
        ("IdkPO", "alpha=-1", "alpha", lambda: IdkPO(alpha=-1.0)),
        ("RMU", "steering_coeff=0", "steering_coeff", lambda: RMU(steering_coeff=0.0)),
        ("RMU", "steering_coeff=-5", "steering_coeff", lambda: RMU(steering_coeff=-5.0)),
        ("RMU", "layer=[1]", "layer", lambda: RMU(layer=[1])),
        ("RMU", "gamma=-1", "gamma", lambda: RMU(gamma=-1.0)),
        ("RMU", "trainable_params=3", "trainable_params", lambda: RMU(trainable_params=3)),
        ("FictitiousQADataModule", "num_people=0", "num_people", lambda: FictitiousQADataModule(num_people=0)),
        ("FictitiousQADataModule", "forget_percent=100", "forget_percent", lambda: FictitiousQADataModule(forget_percent=100.0)),
        ("FictitiousQADataModule", "phase='pretrain'", "phase", lambda: FictitiousQADataModule(phase="pretrain")),
        ("FictitiousQADataModule", "batch_size=0", "batch_size", lambda: FictitiousQADataModule(batch_size=0)),
        ("FictitiousQADataModule", "num_perturbed=0", "num_perturbed", lambda: FictitiousQADataModule(num_perturbed=0)),
        ("FictitiousQADataModule", "questions_per_person=0", "questions_per_person",
         lambda: FictitiousQADataModule(questions_per_person=0)),
    ]


def _erasure_b_cases() -> list[tuple[str, str, str, Callable[[], Any]]]:
    """DoCo, SalUnDiffusion and SFD."""
    from lightning_forget.callbacks import SFD, DoCo, SalUnDiffusion

    return [
        ("DoCo", "gradient_surgery='pcgrad'", "gradient_surgery", lambda: DoCo(erase=[1], gradient_surgery="pcgrad")),
        ("DoCo", "discriminator_lr=0", "discriminator_lr", lambda: DoCo(erase=[1], discriminator_lr=0.0)),
        ("DoCo", "discriminator_warmup=-1", "discriminator_warmup", lambda: DoCo(erase=[1], discriminator_warmup=-1)),
        ("DoCo", "discriminator_blocks=0", "discriminator_blocks", lambda: DoCo(erase=[1], discriminator_blocks=0)),
        ("DoCo", "clip_norm=0", "clip_norm", lambda: DoCo(erase=[1], clip_norm=0.0)),
        ("DoCo", "add_preservation='no'", "add_preservation", lambda: DoCo(erase=[1], add_preservation="no")),
        ("SalUnDiffusion", "mask_fraction=0", "mask_fraction", lambda: SalUnDiffusion(erase=[1], mask_fraction=0.0)),
        ("SalUnDiffusion", "pseudo=[2]", "pseudo", lambda: SalUnDiffusion(erase=[1], pseudo=[2])),
        ("SalUnDiffusion", "num_forget_samples=0", "num_forget_samples", lambda: SalUnDiffusion(erase=[1], num_forget_samples=0)),
        ("SalUnDiffusion", "batch_size=0", "batch_size", lambda: SalUnDiffusion(erase=[1], batch_size=0)),
        ("SalUnDiffusion", "retain_weight=-1", "retain_weight", lambda: SalUnDiffusion(erase=[1], retain_weight=-1.0)),
        ("SFD", "t_min >= t_max", "t_min", lambda: SFD(erase=[1], t_min=0.8, t_max=0.5)),
        ("SFD", "t_init=1", "t_init", lambda: SFD(erase=[1], t_init=1.0)),
        ("SFD", "override=[2]", "override", lambda: SFD(erase=[1], override=[2])),
        ("SFD", "alpha=-1", "alpha", lambda: SFD(erase=[1], alpha=-1.0)),
        ("SFD", "fake_lr=0", "fake_lr", lambda: SFD(erase=[1], fake_lr=0.0)),
        ("SFD", "forget_weight=nan", "forget_weight", lambda: SFD(erase=[1], forget_weight=float("nan"))),
    ]


def classify(arg: str, thunk: Callable[[], Any]) -> tuple[str, str]:
    """(category, message) for one case."""
    try:
        result = thunk()
        if isinstance(result, dict):
            bad = [k for k, v in result.items() if isinstance(v, torch.Tensor) and not torch.isfinite(v).all()]
            if bad:
                return "silent", f"returned non-finite values in {bad[:3]}"
        return "silent", "accepted"
    except BaseException as error:  # noqa: BLE001 - the tally needs every outcome
        if isinstance(error, (KeyboardInterrupt, SystemExit)):
            raise
        frames = traceback.extract_tb(error.__traceback__)
        raised_by_us = bool(frames) and frames[-1].filename.startswith(PACKAGE_DIR)
        text = f"{type(error).__name__}: {error}".replace("\n", " ")
        if not raised_by_us:
            return "crash", text
        return ("clear" if arg in str(error) else "unclear"), text


def main(argv: Optional[list[str]] = None) -> Counter:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="print every case and its message")
    parser.add_argument("--quick", action="store_true", help="constructor cases only (no fits), for the test")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    total: Counter = Counter()
    per_class: dict[str, Counter] = defaultdict(Counter)
    rows = []
    for owner, what, arg, thunk in cases():
        if args.quick and "(fit)" in what:
            continue
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            category, text = classify(arg, thunk)
        total[category] += 1
        per_class[owner][category] += 1
        rows.append((owner, what, category, text))
    if args.verbose:
        for owner, what, category, text in rows:
            print(f"{category:8s} {owner:22s} {what:45s} {text[:160]}")
        print()
    kinds = ("clear", "unclear", "crash", "silent")
    print(f"{'class':24s}" + "".join(f"{k:>9s}" for k in kinds))
    for owner, counts in per_class.items():
        print(f"{owner:24s}" + "".join(f"{counts[k]:9d}" for k in kinds))
    print(f"{'total (' + str(sum(total.values())) + ' cases)':24s}" + "".join(f"{total[k]:9d}" for k in kinds))
    return total


if __name__ == "__main__":
    main(sys.argv[1:])
