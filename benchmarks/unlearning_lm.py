"""LM unlearning on the fictitious-QA benchmark: forget quality, model utility, privacy leakage, MIA, time, memory.

1. The **target** model (a tiny byte-level GPT-2 fine-tuned on every person and the world facts)
   and one **retain** model per forget split (fine-tuned without the forget people) are built once
   by :mod:`lightning_forget.unlearning.lm_models` into ``--models`` (reused when they are there).
2. Each method (GA, GradDiff with the NLL and the KL retain term, NPO, SimNPO, IdkPO, RMU, the
   library's callbacks) starts from the target model on the forget 1 %, 5 % and 10 % splits, per
   seed, for ``--epochs`` epochs of one pass over the forget set each (open-unlearning's epoch: the
   forget set drives it, a retain batch beside each forget batch), AdamW.
3. Every model is scored by :func:`lightning_forget.unlearning.lm_eval.evaluate_lm_unlearning`
   against the retain model's statistics of the same split: forget quality (KS p-value of the
   Truth Ratios), model utility, privacy leakage (Min-K AUC gap to the retain model), MIA AUC
   (Min-K 40 %; LOSS beside it), extraction strength, plus the forget set's answer probability.
4. LoRA against full fine-tuning for NPO and GradDiff on one split: time, trainable parameters, the
   bytes of what training keeps (trainable weights, their gradients, AdamW's two moments, the
   reference copy: NPO's reference is the base with adapters disabled under LoRA, a frozen copy
   otherwise) and the peak RSS growth of the process during the fit (sampled every 5 ms). LoRA
   (rank 8 on the attention projections) trains at 10x the method's learning rate.

Seeds vary the global RNG, the callbacks' seed and the loaders' order (the data and the models
are the same). Prints one table per split and the literature checks, writes
``unlearning_lm.json``/``.csv`` into ``--out``. ``--quick`` builds a tiny model pair and runs every
method on one split, one seed, one epoch (seconds; for the tests).

    PYTHONPATH=$PWD python benchmarks/unlearning_lm.py --out runs/unlearning_lm
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import statistics
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_forget.callbacks import NPO, RMU, GradDiff, GradientAscent, IdkPO, SimNPO
from lightning_forget.datamodules.fictitious_qa import FictitiousQADataModule, QADataset, collate_qa
from lightning_forget.datamodules.forget import PairedDataset
from lightning_forget.datamodules.loaders import seeded_generator
from lightning_forget.modules import CausalLMModule
from lightning_forget.unlearning import lm_models
from lightning_forget.unlearning.lm_eval import evaluate_lm_unlearning
from lightning_forget.unlearning.report import write_rows

#: method → (callback factory taking seed, learning rate). Hyper-parameters: open-unlearning's
#: (UNLEARNING.md §2.1): GradDiff/NPO/IdkPO γ = α = 1, NPO/IdkPO β = 0.1, SimNPO β = 4.5, δ = 0,
#: γ = 0.125, RMU c = 2 with every parameter trained. The learning rate is ours (see LR).
METHODS: dict[str, Callable[[int], Any]] = {
    "GA": lambda seed: GradientAscent(seed=seed, save_original=False),
    "GradDiff": lambda seed: GradDiff(seed=seed, save_original=False),
    "GradDiff-KL": lambda seed: GradDiff(retain_loss="kl", seed=seed, save_original=False),
    "NPO": lambda seed: NPO(seed=seed, save_original=False),
    "SimNPO": lambda seed: SimNPO(seed=seed, save_original=False),
    "IdkPO": lambda seed: IdkPO(seed=seed, save_original=False),
    "RMU": lambda seed: RMU(seed=seed, save_original=False),
}
#: AdamW's learning rate per method (open-unlearning: 1e-5 with a 1B pretrained model; this
#: 0.45M-parameter byte-level model trained at 3e-3 barely moves at 1e-5).
LR = {"GA": 1e-4, "GradDiff": 1e-4, "GradDiff-KL": 1e-4, "NPO": 1e-4, "SimNPO": 1e-4, "IdkPO": 1e-4, "RMU": 1e-4}
#: LoRA of the comparison: rank 8 on the attention projections (c_attn, c_proj of each block).
LORA = {"r": 8, "alpha": 16.0, "kind": "attention"}
#: What lm_models builds when --models holds no models (the full run; --quick: TINY): each model
#: trains until an epoch's mean training loss is at most 0.1 (the 120 epochs are a cap).
BUILD = {"num_people": 40, "questions_per_person": 5, "num_countries": 5, "batch_size": 16, "n_layer": 2,
         "n_embd": 128, "n_head": 4, "epochs": 120, "fit_loss": 0.1, "lr": 3e-3}
TINY = {"num_people": 8, "questions_per_person": 2, "num_countries": 1, "batch_size": 16, "n_layer": 1, "n_embd": 32,
        "n_head": 2, "epochs": 15, "lr": 1e-2}
KEYS = ("forget_quality", "model_utility", "privacy_leakage", "mia_min_k", "mia_loss", "extraction_strength",
        "forget_probability")


class _OrderedQA(FictitiousQADataModule):
    """The unlearning phase with the loaders' order drawn from ``order_seed`` (the data stay ``seed``'s)."""

    def __init__(self, order_seed: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.order_seed = order_seed

    def train_dataset(self) -> Any:
        return PairedDataset(self.dataset("forget"), self.dataset("retain"), self.order_seed, 0)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset(), batch_size=self.batch_size, shuffle=True, collate_fn=collate_qa,
                          generator=seeded_generator(self.order_seed, 900_000))


class PeakRSS:
    """Peak resident memory growth of this process while inside the ``with`` (sampled every 5 ms)."""

    def __enter__(self) -> "PeakRSS":
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def growth(self) -> int:
        return self.peak - self.base


def _state_bytes(module: torch.nn.Module, callback: Any) -> int:
    """Trainable weights + their gradients + AdamW's two moments + the reference copy, in bytes."""
    trainable = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    reference = getattr(callback, "reference", None)
    copy = 0
    if reference is not None and getattr(reference, "weights", None) is not None:
        copy = sum(t.numel() * t.element_size() for t in reference.weights.values())
    return 4 * trainable + copy


def _eval_splits(dm: FictitiousQADataModule, retain_eval: int) -> dict[str, Any]:
    """The evaluated splits: forget, holdout and world facts whole, the first ``retain_eval`` retain questions."""
    retain = dm.records("retain")[:retain_eval] if retain_eval else dm.records("retain")
    splits: dict[str, Any] = {"forget": dm.dataset("forget"), "retain": QADataset(retain, dm.tokenizer, dm.end_id),
                              "holdout": dm.dataset("holdout")}
    if dm.records("world_facts"):
        splits["world_facts"] = dm.dataset("world_facts")
    return splits


def _evaluate(model: Any, dm: FictitiousQADataModule, args: argparse.Namespace, retain_stats: Any = None,
              gradnorm: Optional[bool] = None) -> dict[str, Any]:
    """``evaluate_lm_unlearning``'s result, with its wall time in ``result["seconds"]``."""
    start = time.perf_counter()
    result = evaluate_lm_unlearning(model, _eval_splits(dm, args.retain_eval), dm.tokenizer, retain_stats=retain_stats,
                                    batch_size=32, generate=not args.no_generate, max_new_tokens=args.max_new_tokens,
                                    gradnorm=not args.no_gradnorm if gradnorm is None else gradnorm, progress=False)
    result["seconds"] = time.perf_counter() - start
    return result


def _metrics(result: dict[str, Any]) -> dict[str, Any]:
    m = result["metrics"]
    out = {k: (None if m.get(k) is None else float(m[k]))
           for k in (*KEYS, "mia_gradnorm", "holdout_probability", "retain_probability", "world_facts_probability")}
    out["eval_seconds"] = result.get("seconds")
    return out


def _load(path: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()


def unlearn(name: str, factory: Callable[[int], Any], lr: float, target: Path, settings: dict[str, Any], percent: float,
            seed: int, args: argparse.Namespace, retain_stats: Any, lora: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """One unlearning fit from the target model, then its scores; ``None`` metrics when it diverged."""
    pl.seed_everything(seed, workers=True)
    data = {k: v for k, v in settings.items() if k != "forget_percent"}
    dm = _OrderedQA(seed, **data, forget_percent=percent, phase="unlearn", batch_size=args.batch_size)
    module = CausalLMModule(pretrained_path=str(target), lora=lora,
                            optimizer=functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.01))
    callback = factory(seed)
    steps = math.ceil(len(dm.records("forget")) / args.batch_size)
    trainer = pl.Trainer(max_epochs=args.epochs, limit_train_batches=steps, accelerator="cpu", devices=1, logger=False,
                         callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                         reload_dataloaders_every_n_epochs=0, default_root_dir=str(Path(args.out) / "fits"))
    row: dict[str, Any] = {"method": name + ("+LoRA" if lora else ""), "split": percent, "seed": seed, "lr": lr}
    start = time.perf_counter()
    with PeakRSS() as rss:
        try:
            trainer.fit(module, dm)
            diverged = False
        except FloatingPointError:
            diverged = True
    row.update(seconds=time.perf_counter() - start, steps=trainer.global_step, peak_rss_mb=rss.growth / 2**20,
               state_mb=_state_bytes(module, callback) / 2**20,
               trainable=sum(p.numel() for p in module.parameters() if p.requires_grad))
    if diverged or not all(math.isfinite(float(p.detach().abs().sum())) for p in module.parameters()):
        row.update(diverged=True, **{k: None for k in KEYS})
    else:
        row.update(diverged=False, **_metrics(_evaluate(module.model, dm, args, retain_stats)))
    shown = " ".join(f"{k}={row[k]:.3g}" for k in KEYS if row.get(k) is not None)
    print(f"  forget{percent:g} {row['method']} seed={seed}: {shown}, {row['seconds']:.1f} s", flush=True)
    return row


def table(rows: list[dict[str, Any]], title: str, labels: tuple[str, ...], keys: tuple[str, ...]) -> Any:
    """A rich table of ``rows``: the label columns, then ``keys`` (4 significant digits)."""
    from rich.table import Table

    out = Table(title=title, title_style="bold")
    for key in (*labels, *keys):
        out.add_column(key, no_wrap=True)
    for row in rows:
        cells = []
        for key in (*labels, *keys):
            value = row.get(key)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
            cells.append(f"{float(value):.4g}" if ok else "-" if value is None or isinstance(value, float) else str(value))
        out.add_row(*cells)
    return out


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    values = [float(r[key]) for r in rows if r.get(key) is not None and math.isfinite(float(r[key]))]
    return statistics.fmean(values) if values else math.nan


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean over seeds per (split, method), with the seeds' min and max of forget quality and model utility."""
    out = []
    groups: dict[tuple[float, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["split"], r["method"]), []).append(r)
    for (split, method), runs in groups.items():
        row: dict[str, Any] = {"split": split, "method": method}
        for key in (*KEYS, "mia_gradnorm", "holdout_probability", "retain_probability", "seconds", "eval_seconds",
                    "eval_seconds_without_gradnorm", "peak_rss_mb", "state_mb", "trainable"):
            row[key] = _mean(runs, key)
        for key in ("forget_quality", "model_utility"):
            values = [float(r[key]) for r in runs if r.get(key) is not None]
            row[f"{key}_min"], row[f"{key}_max"] = (min(values), max(values)) if values else (math.nan, math.nan)
        row["seeds"], row["diverged"] = len(runs), sum(1 for r in runs if r.get("diverged"))
        out.append(row)
    return out


def findings(summary: list[dict[str, Any]]) -> list[str]:
    """The literature's qualitative findings, checked on each split's means."""
    lines = []
    for split in sorted({r["split"] for r in summary}):
        by = {r["method"]: r for r in summary if r["split"] == split}
        target = by.get("Target")
        if target and "GA" in by:
            ga, t = by["GA"]["model_utility"], target["model_utility"]
            verdict = "holds" if ga < 0.5 * t else "does not hold"
            ratio = f"{ga / t:.2f}x" if t > 0 else "target MU 0"
            lines.append(f"forget{split:g}: GA collapses utility: MU {ga:.3f} vs the target's {t:.3f} "
                         f"({ratio}) -> {verdict} (criterion: below half)")
        if "GA" in by and "NPO" in by:
            ga, npo = by["GA"], by["NPO"]
            forgot = npo["forget_probability"] <= ga["forget_probability"] * 1.1
            kept = npo["model_utility"] > ga["model_utility"]
            verdict = ("holds" if kept else "does not hold") if forgot else "not comparable (NPO forgot less)"
            lines.append(f"forget{split:g}: NPO keeps more utility than GA at equal forgetting: MU NPO {npo['model_utility']:.3f} "
                         f"vs GA {ga['model_utility']:.3f}, forget probability NPO {npo['forget_probability']:.3f} vs GA "
                         f"{ga['forget_probability']:.3f} -> {verdict}")
        if "NPO" in by and "SimNPO" in by:
            npo, sim = by["NPO"], by["SimNPO"]
            lines.append(f"forget{split:g}: SimNPO vs NPO: forget quality {sim['forget_quality']:.3g} vs {npo['forget_quality']:.3g}, "
                         f"MU {sim['model_utility']:.3f} vs {npo['model_utility']:.3f}, forget probability "
                         f"{sim['forget_probability']:.3f} vs {npo['forget_probability']:.3f} (the paper: SimNPO better on both)")
    return lines


def build_or_load(args: argparse.Namespace) -> Path:
    models = Path(args.models)
    wanted = [lm_models.model_dir(models, "target")] + [lm_models.model_dir(models, "retain", p) for p in args.splits]
    if all((d / lm_models.DATA_FILE).is_file() for d in wanted):
        print(f"using the models in {models}", flush=True)
        return models
    recipe = dict(TINY if args.quick else BUILD)
    data = {k: recipe.pop(k) for k in ("num_people", "questions_per_person", "num_countries")}
    print(f"building the models into {models} ...", flush=True)
    lm_models.build_models(models, forget_percents=args.splits, **data, **recipe)
    return models


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, forget 10 %%, 1 seed, 1 epoch, no generation")
    parser.add_argument("--models", default=None, help="folder of lm_models' models (built there when absent)")
    parser.add_argument("--splits", nargs="+", type=float, default=[1.0, 5.0, 10.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--lora-methods", nargs="*", default=["NPO", "GradDiff"], choices=list(METHODS))
    parser.add_argument("--lora-split", type=float, default=10.0)
    parser.add_argument("--lora-seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=10, help="passes over the forget set (open-unlearning: 10)")
    parser.add_argument("--batch-size", type=int, default=8, help="per stream (open-unlearning: 32 effective)")
    parser.add_argument("--lr", action="append", default=[], metavar="METHOD=LR", help="override a learning rate")
    parser.add_argument("--retain-eval", type=int, default=40, help="retain questions evaluated (0: all)")
    parser.add_argument("--max-new-tokens", type=int, default=80, help="greedy generation length in bytes (ROUGE-L)")
    parser.add_argument("--no-generate", action="store_true", help="skip generation (no ROUGE-L in model utility)")
    parser.add_argument("--no-baselines", action="store_true",
                        help="no Target/Retain rows (a run of further seeds beside one that has them)")
    parser.add_argument("--no-gradnorm", action="store_true",
                        help="skip the GradNorm attack (one backward per forget and holdout sample)")
    parser.add_argument("--out", default="runs/unlearning_lm")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.splits, args.seeds, args.lora_seeds, args.lora_split, args.epochs = [10.0], [0], [0], 10.0, 1
        args.no_generate, args.retain_eval = True, 0
    if args.models is None:
        args.models = str(Path(args.out) / "models")
    lrs = dict(LR)
    for spec in args.lr:
        name, _, value = spec.partition("=")
        if name not in METHODS or not value:
            raise SystemExit(f"--lr {spec!r}: write METHOD=LR with METHOD one of {list(METHODS)}")
        lrs[name] = float(value)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return _run(args, lrs)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, lrs: dict[str, float]) -> dict[str, Any]:
    from rich.console import Console

    console = Console(width=200)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    models = build_or_load(args)
    target = lm_models.model_dir(models, "target")
    settings = lm_models.load_data_settings(target)
    rows: list[dict[str, Any]] = []
    retain_stats: dict[float, Any] = {}

    def save() -> list[dict[str, Any]]:
        summary = summarise(rows)
        write_rows(out, summary, stem="unlearning_lm")
        (out / "unlearning_lm_runs.json").write_text(json.dumps(rows, indent=1, default=str))
        return summary

    lora_rows: list[dict[str, Any]] = []
    if args.lora_methods:
        data = {k: v for k, v in settings.items() if k != "forget_percent"}
        retain_stats[args.lora_split] = _evaluate(_load(lm_models.model_dir(models, "retain", args.lora_split)),
                                                  FictitiousQADataModule(**data, forget_percent=args.lora_split), args)
    for name in args.lora_methods:
        for lora in (None, LORA):
            for seed in args.lora_seeds:
                row = unlearn(name, METHODS[name], lrs[name] * (10 if lora else 1), target, settings, args.lora_split,
                              seed, args, retain_stats[args.lora_split], lora=lora)
                row["variant"] = "lora" if lora else "full"
                lora_rows.append(row)
    (out / "unlearning_lm_lora.json").write_text(json.dumps(lora_rows, indent=1, default=str))
    if lora_rows:
        console.print(table(lora_rows, f"LoRA vs full fine-tuning, forget {args.lora_split:g}%", ("method", "seed", "lr"),
                            ("forget_quality", "model_utility", "forget_probability", "seconds", "trainable", "state_mb",
                             "peak_rss_mb")))
    for percent in args.splits:
        data = {k: v for k, v in settings.items() if k != "forget_percent"}
        dm = FictitiousQADataModule(**data, forget_percent=percent)
        if percent not in retain_stats:
            retain_stats[percent] = _evaluate(_load(lm_models.model_dir(models, "retain", percent)), dm, args)
        baselines = () if args.no_baselines else (("Target", target), ("Retain", lm_models.model_dir(models, "retain", percent)))
        for label, path in baselines:
            metrics = _metrics(_evaluate(_load(path), dm, args, retain_stats[percent]))
            if not args.no_gradnorm:  # GradNorm's cost: the same evaluation without it
                metrics["eval_seconds_without_gradnorm"] = _evaluate(_load(path), dm, args, retain_stats[percent],
                                                                     gradnorm=False)["seconds"]
            rows.append({"method": label, "split": percent, "seed": 0, "seconds": 0.0, **metrics})
            print(f"  forget{percent:g} {label}: " + " ".join(f"{k}={metrics[k]:.3g}" for k in KEYS if metrics[k] is not None),
                  flush=True)
        for name in args.methods:
            for seed in args.seeds:
                rows.append(unlearn(name, METHODS[name], lrs[name], target, settings, percent, seed, args, retain_stats[percent]))
            save()
        summary = [r for r in save() if r["split"] == percent]
        console.print(table(summary, f"forget {percent:g}%: mean of {len(args.seeds)} seed(s)", ("method",),
                            (*KEYS, "seconds")))
    summary = save()
    lines = findings(summary)
    for line in lines:
        console.print(line)
    total = time.perf_counter() - started
    result = {"summary": summary, "runs": rows, "lora": lora_rows, "findings": lines, "seconds": total,
              "settings": {**vars(args), "lrs": lrs, "data": settings}}
    (out / "unlearning_lm.json").write_text(json.dumps(result, indent=1, default=str))
    console.print(f"{total:.0f} s; results written to {out.resolve()}")
    return result


if __name__ == "__main__":
    main()
