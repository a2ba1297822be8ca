"""``CausalLMModule``: a Hugging Face causal language model as a LightningModule."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.optim import AdamW, Optimizer
from torchmetrics import MeanMetric

from lightning_forget.validation import check_float, check_int, check_str, check_type, message

try:  # Python 3.12+
    from typing import override
except ImportError:  # pragma: no cover
    from typing_extensions import override

__all__ = ["CausalLMModule", "causal_lm_loss", "default_adamw", "build_tiny_causal_lm"]

IGNORE_INDEX = -100
"""Label value that is not predicted (padding), as in Hugging Face models."""


def default_adamw(params: Iterable[Any]) -> Optimizer:
    """The default optimizer of :class:`CausalLMModule`: ``AdamW(params, lr=3e-4)``."""
    return AdamW(params, lr=3e-4)


def causal_lm_loss(logits: Tensor, labels: Tensor, reduction: Literal["mean", "sum", "none"] = "mean") -> Tensor:
    """Next-token cross-entropy: position ``j`` of ``logits`` predicts ``labels[:, j + 1]``.

    Args:
        logits: ``(B, L, V)`` model outputs.
        labels: ``(B, L)`` token ids; ``-100`` marks positions that are not predicted.
        reduction: ``"mean"`` over predicted tokens, ``"sum"``, or ``"none"`` for the
            ``(B, L - 1)`` per-token losses (0 where ignored).

    Returns:
        The loss, computed in float32 whatever the logits' dtype.
    """
    shifted_logits = logits[:, :-1, :].float()
    targets = labels[:, 1:]
    loss = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )
    return loss.view(targets.shape) if reduction == "none" else loss


def build_tiny_causal_lm(
    family: Literal["gpt2", "llama"],
    vocab_size: int,
    block_size: int,
    n_layer: int,
    n_embd: int,
    n_head: int,
    intermediate_size: Optional[int] = None,
    dropout: float = 0.0,
) -> nn.Module:
    """A randomly initialised ``GPT2LMHeadModel`` or ``LlamaForCausalLM`` built from a config.

    Initialisation draws from torch's global generator, so the weights are fixed by
    ``seed_everything``. The EOS/BOS id is ``vocab_size - 1`` (the byte tokenizer's end-of-document
    id when ``vocab_size`` is 257).
    """
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    special = vocab_size - 1
    if family == "gpt2":
        config: Any = GPT2Config(
            vocab_size=vocab_size,
            n_positions=block_size,
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            n_inner=intermediate_size,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            bos_token_id=special,
            eos_token_id=special,
        )
    else:
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=n_embd,
            intermediate_size=intermediate_size or 4 * n_embd,
            num_hidden_layers=n_layer,
            num_attention_heads=n_head,
            num_key_value_heads=n_head,
            max_position_embeddings=block_size,
            attention_dropout=dropout,
            bos_token_id=special,
            eos_token_id=special,
            pad_token_id=None,
        )
    return AutoModelForCausalLM.from_config(config)


def _check_corpus_names(corpus_names: Any) -> Optional[list[str]]:
    """``corpus_names`` as a list of distinct non-empty names (or ``None``)."""
    fix = "pass one distinct name per validation corpus, e.g. ['prose', 'code'], or None"
    check_type("corpus_names", corpus_names, (list, tuple), allow_none=True, fix=fix)
    if corpus_names is None:
        return None
    if not corpus_names:
        raise ValueError(message("corpus_names", "a non-empty list of names, or None", corpus_names, fix))
    for i, name in enumerate(corpus_names):
        check_str(f"corpus_names[{i}]", name, fix=fix)
    repeated = sorted({n for n in corpus_names if list(corpus_names).count(n) > 1})
    if repeated:
        raise ValueError(message("corpus_names", f"distinct names ({', '.join(map(repr, repeated))} repeated)", corpus_names, fix))
    return list(corpus_names)


class CausalLMModule(pl.LightningModule):
    """A causal language model trained by next-token prediction, evaluated per corpus.

    The model is a Hugging Face causal LM: a tiny GPT-2 ("Language Models are Unsupervised
    Multitask Learners", Radford et al., OpenAI 2019) or Llama ("LLaMA: Open and Efficient
    Foundation Language Models", Touvron et al., arXiv 2023) built from a config with the sizes
    given here, or any model saved on disk (``pretrained_path``, loaded without network).

    Mechanism: a batch is ``{"input_ids": (B, L), "labels": (B, L)[, "attention_mask"]}`` with
    unshifted labels (as :class:`~lightning_forget.datamodules.TextStreamDataModule` serves
    them); :func:`causal_lm_loss` shifts them so position ``j`` predicts token ``j + 1`` and
    averages cross-entropy over the predicted tokens (labels ``-100`` are skipped).
    Validation keeps one token-weighted running mean of the loss per dataloader (= per corpus:
    a torchmetrics ``MeanMetric``, summed across DDP ranks), so a corpus's loss is the mean over
    all its tokens, whatever the batch sizes; perplexity is ``exp`` of it.

    The optimizer and scheduler are injected LightningCLI-style: ``optimizer`` is called with the
    parameters, ``lr_scheduler`` (optional) with the optimizer; the scheduler steps every
    ``scheduler_interval``.

    Args:
        model: ``"gpt2"`` or ``"llama"``: the architecture built from a config (ignored with
            ``pretrained_path``).
        vocab_size: vocabulary size (257 for the byte tokenizer; link it to the datamodule's
            ``vocab_size``).
        block_size: context length (GPT-2 ``n_positions``, Llama ``max_position_embeddings``).
        n_layer: transformer blocks (``n_layer`` / ``num_hidden_layers``).
        n_embd: hidden size (``n_embd`` / ``hidden_size``).
        n_head: attention heads; must divide ``n_embd``.
        intermediate_size: MLP width (default ``4 * n_embd``).
        dropout: dropout probability of the built model.
        pretrained_path: a local directory written by ``save_pretrained``; loaded with
            ``AutoModelForCausalLM.from_pretrained(path, local_files_only=True)``. The size
            arguments are then ignored.
        optimizer: ``params -> Optimizer`` (default :func:`default_adamw`, AdamW at lr 3e-4).
        lr_scheduler: ``optimizer -> scheduler``, or ``None`` for a constant LR.
        scheduler_interval: ``"step"`` or ``"epoch"``.
        corpus_names: distinct names of the validation corpora in dataloader order, one per
            corpus; with them, the per-corpus values are also logged under ``val/loss/<name>``
            and ``val/ppl/<name>``.
        exact_match: also log the per-corpus exact match: the fraction of validation sequences
            whose every predicted token (label not ``-100``) is the model's top prediction, which
            is when greedy decoding reproduces it. For prompt/answer data (labels on the answer
            only). ``None`` (default): on when the datamodule says its labels mark answers only
            (``answer_only_labels``, as ``InstructionStreamDataModule``).
        lora: ``None`` (full fine-tuning) or the fields of a
            :class:`~lightning_forget.lora.LoRASettings` (``{"r": 8, "alpha": 16, "kind":
            "attention"}``, or ``target_modules``): the model is wrapped with PEFT LoRA adapters
            (``lightning_forget.lora.add_lora``: its own weights frozen, the adapters trained), e.g. to
            unlearn a real model with the base as the reference (adapters disabled, no copy).

    Raises:
        TypeError: a size is not an int, ``corpus_names`` is not a list of strings, or
            ``optimizer``/``lr_scheduler`` is not callable.
        ValueError: a size is not positive, ``n_head`` does not divide ``n_embd``, the Llama
            head dimension is odd, ``model`` or ``scheduler_interval`` is unknown,
            ``pretrained_path`` does not exist, or ``corpus_names`` is empty or repeats a name.
            In ``setup()``: the model's ``vocab_size`` or ``block_size`` is below the
            datamodule's, or ``corpus_names`` does not have one name per corpus of the
            datamodule (:meth:`check_data`).

    Note:
        Logged keys: ``train/loss`` (every step), ``val/loss/task_{t}``, ``val/ppl/task_{t}``
        (per validation dataloader ``t``, epoch level), ``val/loss_avg`` and ``val/ppl_avg`` (the
        mean over dataloaders of the loss, and its ``exp``); with exact match,
        ``val/exact_match/task_{t}`` and ``val/exact_match_avg``. ``save_hyperparameters`` records
        every argument except ``optimizer`` and ``lr_scheduler`` (callables; LightningCLI's saved
        ``config.yaml`` keeps them). The validation metrics are not checkpointed (they are reset
        every epoch).
    """

    def __init__(
        self,
        model: Literal["gpt2", "llama"] = "gpt2",
        vocab_size: int = 257,
        block_size: int = 128,
        n_layer: int = 2,
        n_embd: int = 64,
        n_head: int = 4,
        intermediate_size: Optional[int] = None,
        dropout: float = 0.0,
        pretrained_path: Optional[str] = None,
        optimizer: OptimizerCallable = default_adamw,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        corpus_names: Optional[Sequence[str]] = None,
        exact_match: Optional[bool] = None,
        lora: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        if model not in ("gpt2", "llama"):
            raise ValueError(
                f"`model` must be 'gpt2' or 'llama' (built from a config), got {model!r}. For another "
                "architecture save it with `save_pretrained(dir)` and pass `pretrained_path=dir`."
            )
        for name, value in (("vocab_size", vocab_size), ("block_size", block_size), ("n_layer", n_layer),
                            ("n_embd", n_embd), ("n_head", n_head)):
            check_int(name, value, min=1)
        check_int("intermediate_size", intermediate_size, min=1, allow_none=True, fix="pass the MLP width, or None for 4 * n_embd")
        if n_embd % n_head:
            raise ValueError(
                f"`n_head`={n_head} must divide `n_embd`={n_embd}. Fix: pick n_head among the divisors "
                f"of {n_embd} (e.g. {math.gcd(n_embd, n_head)})."
            )
        if model == "llama" and (n_embd // n_head) % 2:
            raise ValueError(
                f"Llama's rotary embeddings need an even head dimension, but n_embd / n_head = "
                f"{n_embd}/{n_head} = {n_embd // n_head}. Fix: change `n_head` or `n_embd`."
            )
        check_float("dropout", dropout, min=0.0, max=1.0, max_inclusive=False)
        if pretrained_path is not None and not os.path.isdir(os.path.expanduser(pretrained_path)):
            raise ValueError(
                f"`pretrained_path` must be a local directory written by `save_pretrained`, got "
                f"{pretrained_path!r}, which does not exist. Nothing is downloaded."
            )
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(f"`scheduler_interval` must be 'step' or 'epoch', got {scheduler_interval!r}.")
        if not callable(optimizer):
            raise TypeError(f"`optimizer` must be a callable params -> Optimizer, got {type(optimizer).__name__}.")
        if lr_scheduler is not None and not callable(lr_scheduler):
            raise TypeError(
                f"`lr_scheduler` must be None or a callable optimizer -> scheduler, got {type(lr_scheduler).__name__}."
            )
        corpus_names = _check_corpus_names(corpus_names)
        check_type("exact_match", exact_match, bool, allow_none=True, fix="pass True, False or None (auto)")
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.scheduler_interval = scheduler_interval
        self.corpus_names = corpus_names
        self.exact_match = exact_match
        self._exact_match_on = bool(exact_match)

        if pretrained_path is not None:
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(
                os.path.expanduser(pretrained_path), local_files_only=True
            )
        else:
            self.model = build_tiny_causal_lm(
                model, vocab_size, block_size, n_layer, n_embd, n_head, intermediate_size, dropout
            )
        if lora is not None:
            from lightning_forget.lora import LoRASettings, add_lora

            check_type("lora", lora, dict, fix="pass the fields of LoRASettings, e.g. {'r': 8, 'alpha': 16}, or None")
            try:
                settings = LoRASettings(**lora)
            except TypeError as error:
                if "unexpected keyword" not in str(error):
                    raise
                raise ValueError(message("lora", "the fields of LoRASettings (r, alpha, dropout, target_modules, kind, "
                                         "modules_to_save)", lora, "drop the unknown keys")) from None
            self.model = add_lora(self.model, settings)
        self.val_loss_metrics = nn.ModuleList()
        self.val_match_metrics = nn.ModuleList()
        self._val_seen: set[int] = set()

    # ------------------------------------------------------------------ model
    @override
    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """The ``(B, L, V)`` next-token logits of ``input_ids``."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def _logits_and_labels(self, batch: Union[dict[str, Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        if isinstance(batch, Tensor):
            batch = {"input_ids": batch}
        input_ids = batch["input_ids"]
        labels = batch.get("labels", input_ids)
        attention_mask = batch.get("attention_mask")
        if attention_mask is not None and "labels" not in batch:
            labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        return self(input_ids, attention_mask), labels

    def compute_loss(self, batch: Union[dict[str, Tensor], Tensor]) -> Tensor:
        """Mean next-token loss of ``batch`` (a dict as served by the datamodule, or ids)."""
        logits, labels = self._logits_and_labels(batch)
        return causal_lm_loss(logits, labels)

    # ------------------------------------------------------------------ steps
    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.compute_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=int(batch["input_ids"].shape[0]))
        return loss

    def _val_metric(self, dataloader_idx: int, metrics: Optional[nn.ModuleList] = None) -> MeanMetric:
        metrics = self.val_loss_metrics if metrics is None else metrics
        while len(metrics) <= dataloader_idx:
            metrics.append(MeanMetric().to(self.device))
        return metrics[dataloader_idx]  # type: ignore[return-value]

    @override
    def on_validation_epoch_start(self) -> None:
        self._val_seen = set()
        for metric in [*self.val_loss_metrics, *self.val_match_metrics]:
            metric.reset()

    @override
    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        self._exact_match_on = (
            bool(getattr(datamodule, "answer_only_labels", False)) if self.exact_match is None else self.exact_match
        )
        if datamodule is not None:
            self.check_data(
                vocab_size=getattr(datamodule, "vocab_size", None),
                block_size=getattr(datamodule, "block_size", None),
                corpus_names=getattr(datamodule, "corpus_names", None),
                source=type(datamodule).__name__,
            )

    def check_data(
        self,
        vocab_size: Optional[int] = None,
        block_size: Optional[int] = None,
        corpus_names: Optional[Sequence[str]] = None,
        source: str = "the data",
    ) -> None:
        """Check the model against the data's sizes (``setup`` does it with the datamodule's).

        A token id ``>=`` the model's vocabulary, or a block longer than its position table,
        would otherwise fail deep in the embedding with an ``IndexError``; names for fewer
        corpora than the data has would silently log some corpora under ``task_{t}`` only.

        Raises:
            ValueError: the model's vocabulary or context is smaller than the data's, or
                ``corpus_names`` does not have one name per corpus of the data.
        """
        link = "(the lightning-forget CLI links it from the datamodule)"
        if vocab_size is not None and self.model_vocab_size < vocab_size:
            raise ValueError(
                message("vocab_size", f">= the vocab_size {vocab_size} of {source} (its token ids go up to {vocab_size - 1})",
                        self.model_vocab_size, f"pass vocab_size={vocab_size} {link}")
            )
        positions = self.model_block_size
        if block_size is not None and positions is not None and positions < block_size:
            raise ValueError(
                message("block_size", f">= the block_size {block_size} of {source} (the tokens of one block)",
                        positions, f"pass block_size={block_size} {link}")
            )
        if corpus_names is not None and self.corpus_names is not None and len(self.corpus_names) != len(corpus_names):
            raise ValueError(
                message("corpus_names", f"one name per corpus of {source} ({len(corpus_names)}: {list(corpus_names)})",
                        self.corpus_names, f"pass corpus_names={list(corpus_names)}, or None {link}")
            )

    @property
    def model_vocab_size(self) -> int:
        """Rows of the model's input embedding (the ids it can read)."""
        return int(self.model.get_input_embeddings().num_embeddings)

    @property
    def model_block_size(self) -> Optional[int]:
        """Positions of the model (GPT-2 ``n_positions``, Llama ``max_position_embeddings``)."""
        config = self.model.config
        value = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        return None if value is None else int(value)

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.corpus_names is not None and dataloader_idx >= len(self.corpus_names):
            raise ValueError(
                message("corpus_names", f"one name per validation dataloader (dataloader {dataloader_idx} has none)",
                        self.corpus_names, "add a name for every validation corpus, or pass None")
            )
        logits, labels = self._logits_and_labels(batch)
        per_token = causal_lm_loss(logits, labels, reduction="none")
        predicted = labels[:, 1:] != IGNORE_INDEX
        metric = self._val_metric(dataloader_idx)
        # A token-weighted mean: each predicted token counts once, whatever the batch size.
        metric.update(per_token[predicted])
        if self._exact_match_on:
            rows = predicted.any(dim=1)
            hit = (logits[:, :-1].argmax(dim=-1) == labels[:, 1:]) | ~predicted
            self._val_metric(dataloader_idx, self.val_match_metrics).update(hit.all(dim=1)[rows].float())
        self._val_seen.add(dataloader_idx)

    @override
    def on_validation_epoch_end(self) -> None:
        losses, matches = [], []
        for t in sorted(self._val_seen):
            loss = self.val_loss_metrics[t].compute()  # synced across ranks (collective on all ranks)
            losses.append(loss)
            ppl = torch.exp(loss)
            self.log(f"val/loss/task_{t}", loss, sync_dist=True)
            self.log(f"val/ppl/task_{t}", ppl, sync_dist=True)
            if self.corpus_names is not None and t < len(self.corpus_names):
                self.log(f"val/loss/{self.corpus_names[t]}", loss, sync_dist=True)
                self.log(f"val/ppl/{self.corpus_names[t]}", ppl, sync_dist=True)
            self.val_loss_metrics[t].reset()
            if self._exact_match_on and t < len(self.val_match_metrics):
                match = self.val_match_metrics[t].compute()
                matches.append(match)
                self.log(f"val/exact_match/task_{t}", match, sync_dist=True)
                self.val_match_metrics[t].reset()
        if matches:
            self.log("val/exact_match_avg", torch.stack(matches).mean(), sync_dist=True)
        if losses:
            loss_avg = torch.stack(losses).mean()
            self.log("val/loss_avg", loss_avg, prog_bar=True, sync_dist=True)
            self.log("val/ppl_avg", torch.exp(loss_avg), sync_dist=True)

    # ------------------------------------------------------------------ optimisation
    @override
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": self.scheduler_interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/loss_avg"
        return {"optimizer": optimizer, "lr_scheduler": config}
