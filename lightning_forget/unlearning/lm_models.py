"""Build the models of the LM unlearning benchmark: a target model and the retain models, saved.

One command fine-tunes, on :class:`~lightning_forget.datamodules.FictitiousQADataModule`'s data:

- the **target** model on every person (forget and retain) and the world facts (``phase="target"``),
  the model the unlearning methods start from;
- one **retain** model per forget split on the retained people and the world facts only
  (``phase="retain"``), the gold standard that forget quality and privacy leakage compare with.

The model is a tiny GPT-2 or Llama built from a config with the byte tokenizer
(:func:`~lightning_forget.modules.causal_lm.build_tiny_causal_lm`, randomly initialised from
``seed``), or a local Hugging Face model (``--pretrained PATH``, with ``--tokenizer PATH`` for its
tokenizer); each model is trained with AdamW at a constant learning rate for ``epochs`` epochs.
Each model goes into its own folder, written by ``save_pretrained``, with ``data.json`` (the
datamodule's arguments: :func:`load_data_settings` rebuilds the same data) and ``training.json``
(the recipe, the time, and the answer probability and token accuracy reached on each split)::

    python -m lightning_forget.unlearning.lm_models --out models/fqa --forget-percent 1 5 10

writes ``models/fqa/target/`` and ``models/fqa/retain_forget{1,5,10}/`` and prints, per model and
split, the mean answer probability (``exp(−mean answer NLL)``, open-unlearning's ``probability``) and
the teacher-forced token accuracy on the answers (``exact_memorization``): the target model should
be near 1 on forget and retain; a retain model near 1 on retain and low on forget.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_forget.datamodules.fictitious_qa import FictitiousQADataModule, collate_qa
from lightning_forget.metrics.functional_lm import answer_probability, exact_memorization
from lightning_forget.modules.causal_lm import CausalLMModule
from lightning_forget.unlearning.losses import shift_for_next_token
from lightning_forget.validation import check_float, check_int, check_str, message

__all__ = ["DATA_FILE", "TRAINING_FILE", "StopWhenFitted", "build_models", "data_settings", "load_data_settings", "model_dir",
           "score_splits", "train_model"]

#: The datamodule's arguments, beside each saved model.
DATA_FILE = "data.json"
#: The training recipe and the scores reached, beside each saved model.
TRAINING_FILE = "training.json"
#: The datamodule arguments written to :data:`DATA_FILE` (the phase and forget share vary by use).
_DATA_KEYS = ("num_people", "questions_per_person", "num_perturbed", "num_countries", "seed", "forget_percent",
              "tokenizer")


def data_settings(dm: FictitiousQADataModule) -> dict[str, Any]:
    """The arguments that rebuild ``dm``'s records (without its phase and batch sizes)."""
    values = {"num_people": dm.num_people, "questions_per_person": dm.questions_per_person,
              "num_perturbed": dm.num_perturbed, "num_countries": dm.num_countries, "seed": dm.seed,
              "forget_percent": dm.forget_percent, "tokenizer": dm.tokenizer_spec}
    return {k: values[k] for k in _DATA_KEYS}


def load_data_settings(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The datamodule arguments saved beside a model (``path`` is the model folder or its ``data.json``).

    Raises:
        ValueError: there is no ``data.json`` there.
    """
    file = Path(path)
    if file.is_dir():
        file = file / DATA_FILE
    if not file.is_file():
        raise ValueError(message("path", f"a model folder written by lm_models (with {DATA_FILE})", str(path),
                                 "build the models first: python -m lightning_forget.unlearning.lm_models --out DIR"))
    return dict(json.loads(file.read_text()))


def model_dir(out: str | os.PathLike[str], kind: str, forget_percent: Optional[float] = None) -> Path:
    """Folder of a model under ``out``: ``target`` or ``retain_forget{p}`` (``p`` printed as 1, 5, 10, 2.5)."""
    if kind == "target":
        return Path(out) / "target"
    return Path(out) / f"retain_forget{forget_percent:g}"


@torch.no_grad()
def score_splits(model: torch.nn.Module, dm: FictitiousQADataModule, batch_size: int = 64,
                 splits: Sequence[str] = ("forget", "retain", "holdout", "world_facts")) -> dict[str, dict[str, float]]:
    """Per split: the mean answer probability and the teacher-forced answer-token accuracy of a HF causal LM."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores: dict[str, dict[str, float]] = {}
    try:
        for split in splits:
            if not dm.records(split):  # type: ignore[arg-type]
                continue
            probability, accuracy = [], []
            for batch in DataLoader(dm.dataset(split), batch_size=batch_size, collate_fn=collate_qa):  # type: ignore[arg-type]
                logits = model(input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device)).logits.float().cpu()
                aligned = shift_for_next_token(logits, batch["labels"])
                probability.append(answer_probability(*aligned))
                accuracy.append(exact_memorization(*aligned))
            scores[split] = {"probability": float(torch.cat(probability).mean()),
                             "accuracy": float(torch.cat(accuracy).mean())}
    finally:
        model.train(was_training)
    return scores


class StopWhenFitted(pl.Callback):
    """Stop training once an epoch's mean training loss is at most ``loss`` (checked at each epoch end).

    The models of the benchmark must all fit their training set alike (the retain model is the
    gold standard the unlearned target is compared with); a fixed number of epochs does not
    ensure it: at a constant learning rate the loss of this tiny model falls slowly and then
    drops steeply after a data- and order-dependent number of epochs, so the same epoch count
    left two of three retain models half fitted. ``epochs`` is then only the cap.
    """

    def __init__(self, loss: float) -> None:
        self.loss = check_float("fit_loss", loss, min=0, min_inclusive=False)
        self._sum, self._count = 0.0, 0
        self.epoch_losses: list[float] = []

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._sum += float(loss.detach())
        self._count += 1

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._count:
            return
        self.epoch_losses.append(self._sum / self._count)
        self._sum, self._count = 0.0, 0
        if self.epoch_losses[-1] <= self.loss:
            trainer.should_stop = True


def train_model(dm: FictitiousQADataModule, out: Path, *, model: str = "gpt2", n_layer: int = 2, n_embd: int = 128,
                n_head: int = 4, pretrained_path: Optional[str] = None, epochs: int = 30, lr: float = 2e-3,
                seed: int = 0, accelerator: str = "cpu", block_size: Optional[int] = None,
                fit_loss: Optional[float] = None) -> dict[str, Any]:
    """Fine-tune one model on ``dm``'s training phase, save it to ``out`` and return what ``training.json`` holds.

    ``block_size``: positions of a model built from a config (default: the data's longest example).
    ``fit_loss``: stop as soon as an epoch's mean training loss (answer-token NLL) is at most this
    (:class:`StopWhenFitted`; ``epochs`` is then the cap); ``None`` trains ``epochs`` epochs.
    """
    pl.seed_everything(seed, workers=True)
    module = CausalLMModule(model=model, vocab_size=dm.vocab_size, block_size=block_size or dm.block_size,  # type: ignore[arg-type]
                            n_layer=n_layer,
                            n_embd=n_embd, n_head=n_head, pretrained_path=pretrained_path,
                            optimizer=functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.0))
    stop = StopWhenFitted(fit_loss) if fit_loss is not None else None
    trainer = pl.Trainer(max_epochs=epochs, accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, default_root_dir=str(out), callbacks=[stop] if stop else None)
    start = time.perf_counter()
    trainer.fit(module, dm)
    seconds = time.perf_counter() - start
    scores = score_splits(module.model, dm)
    out.mkdir(parents=True, exist_ok=True)
    module.model.save_pretrained(str(out))
    if dm.tokenizer_spec not in (None, "bytes"):
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(dm.tokenizer_spec, local_files_only=True).save_pretrained(str(out))
    settings = data_settings(dm)
    if settings["tokenizer"] not in (None, "bytes"):
        settings["tokenizer"] = str(out)  # the copy beside the model
    (out / DATA_FILE).write_text(json.dumps(settings, indent=1))
    record = {"phase": dm.phase, "model": pretrained_path or model, "n_layer": n_layer, "n_embd": n_embd,
              "n_head": n_head, "epochs": epochs, "epochs_trained": trainer.current_epoch, "fit_loss": fit_loss,
              "final_train_loss": stop.epoch_losses[-1] if stop and stop.epoch_losses else None,
              "lr": lr, "seed": seed, "batch_size": dm.batch_size,
              "seconds": seconds, "parameters": sum(p.numel() for p in module.model.parameters()), "scores": scores}
    (out / TRAINING_FILE).write_text(json.dumps(record, indent=1))
    return record


def build_models(out: str | os.PathLike[str], *, forget_percents: Sequence[float] = (1.0, 5.0, 10.0),
                 num_people: int = 100, questions_per_person: int = 20, num_countries: int = 30, num_perturbed: int = 5,
                 data_seed: int = 0, tokenizer: Optional[str] = None, batch_size: int = 32, model: str = "gpt2",
                 n_layer: int = 2, n_embd: int = 128, n_head: int = 4, pretrained_path: Optional[str] = None,
                 epochs: int = 30, lr: float = 2e-3, seed: int = 0, accelerator: str = "cpu",
                 fit_loss: Optional[float] = None, verbose: bool = True) -> dict[str, dict[str, Any]]:
    """Train and save the target model and one retain model per forget split; returns each one's ``training.json``.

    The target model does not depend on the split (it trains on every person); its ``data.json``
    records the first split's share, and :func:`load_data_settings` callers pass the share they want.

    Raises:
        ValueError, TypeError: bad arguments (named).
    """
    check_str("out", str(out))
    percents = [check_float(f"forget_percents[{i}]", p, min=0, max=100, min_inclusive=False, max_inclusive=False)
                for i, p in enumerate(forget_percents)]
    if not percents:
        raise ValueError(message("forget_percents", "at least one forget share", list(forget_percents), "pass e.g. [1, 5, 10]"))
    check_int("epochs", epochs, min=1)
    check_float("lr", lr, min=0, min_inclusive=False)
    common = dict(num_people=num_people, questions_per_person=questions_per_person, num_countries=num_countries,
                  num_perturbed=num_perturbed, seed=data_seed, tokenizer=tokenizer, batch_size=batch_size)
    recipe = dict(model=model, n_layer=n_layer, n_embd=n_embd, n_head=n_head, pretrained_path=pretrained_path,
                  epochs=epochs, lr=lr, seed=seed, accelerator=accelerator, fit_loss=fit_loss)
    # One context length for every model: the longest example of any split's data (the holdout
    # set grows with the forget share), with room for IdkPO's "I don't know" answers.
    recipe["block_size"] = max(FictitiousQADataModule(forget_percent=p, **common).block_size for p in percents) + 32  # type: ignore[arg-type]
    jobs = [("target", percents[0])] + [("retain", p) for p in percents]
    records: dict[str, dict[str, Any]] = {}
    for kind, percent in jobs:
        dm = FictitiousQADataModule(phase=kind, forget_percent=percent, **common)  # type: ignore[arg-type]
        folder = model_dir(out, kind, percent)
        record = train_model(dm, folder, **recipe)  # type: ignore[arg-type]
        records[folder.name] = record
        if verbose:
            shown = ", ".join(f"{split} p={s['probability']:.3f} acc={s['accuracy']:.3f}" for split, s in record["scores"].items())
            print(f"{folder.name}: {record['seconds']:.0f} s, {record['epochs_trained']} epochs, "
                  f"{record['parameters']} parameters; {shown}", flush=True)
    Path(out, "models.json").write_text(json.dumps(records, indent=1))
    return records


def main(argv: Optional[Sequence[str]] = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m lightning_forget.unlearning.lm_models",
                                     description="Build the target and retain models of the LM unlearning benchmark.")
    parser.add_argument("--out", required=True, help="folder of the models (target/, retain_forget{p}/)")
    parser.add_argument("--forget-percent", nargs="+", type=float, default=[1.0, 5.0, 10.0],
                        help="forget splits in percent of the people; one retain model each (default 1 5 10)")
    parser.add_argument("--num-people", type=int, default=100)
    parser.add_argument("--questions-per-person", type=int, default=20)
    parser.add_argument("--num-countries", type=int, default=30, help="world facts: 4 per country (0: none)")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--tokenizer", default=None, help="'bytes' (default) or a local Hugging Face tokenizer folder")
    parser.add_argument("--pretrained", default=None, help="a local Hugging Face model folder (instead of a tiny model)")
    parser.add_argument("--model", default="gpt2", choices=["gpt2", "llama"])
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=30, help="epochs (the cap with --fit-loss)")
    parser.add_argument("--fit-loss", type=float, default=None,
                        help="stop once an epoch's mean training loss is at most this (every model fits alike)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    return build_models(args.out, forget_percents=args.forget_percent, num_people=args.num_people,
                        questions_per_person=args.questions_per_person, num_countries=args.num_countries,
                        data_seed=args.data_seed, tokenizer=args.tokenizer, batch_size=args.batch_size, model=args.model,
                        n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, pretrained_path=args.pretrained,
                        epochs=args.epochs, lr=args.lr, seed=args.seed, accelerator=args.accelerator,
                        fit_loss=args.fit_loss)


if __name__ == "__main__":
    main()
