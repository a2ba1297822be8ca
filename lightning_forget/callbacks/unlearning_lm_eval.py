"""``LMUnlearningEvaluation``: open-unlearning's TOFU metrics of a causal LM while it is unlearned, under DDP."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_forget import reporting
from lightning_forget.precision import forward_context
from lightning_forget.tasks import DDP_STRATEGIES, SHARDED_STRATEGIES, ContinualCallback
from lightning_forget.unlearning.lm_eval import SPLITS, evaluate_lm_unlearning, load_stats, split_hashes
from lightning_forget.unlearning.reference import ReferenceModel
from lightning_forget.unlearning.report import render_table, write_rows
from lightning_forget.validation import check_bool, check_float, check_int, check_str, check_type, message

__all__ = ["LMUnlearningEvaluation", "lm_metrics_figure", "retain_cache_path"]

#: The files LMUnlearningEvaluation writes (versioned beside another run's, see reporting.output_paths).
_FILES = {"csv": "lm_unlearning_metrics.csv", "json": "lm_unlearning_metrics.json", "png": "lm_unlearning_metrics.png"}
_BEST = {"ckpt": "lm_unlearning_best.ckpt"}
_SCORABLE = ("forget_quality", "model_utility", "privacy_leakage", "extraction_strength", "exact_memorization",
             "mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus", "mia_gradnorm", "mia_reference")
#: What the cached retain statistics depend on besides the data and the model file.
_CACHE_SETTINGS = ("k", "generate", "max_new_tokens", "prompt_format")


def _model_identity(path: str) -> list[Any]:
    """Sizes and modification times of the retain model's files (a changed model is a new cache key)."""
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path)
        if f.endswith((".safetensors", ".bin", ".json", ".ckpt", ".pt")) and not f.startswith("lm_eval_retain_stats"))
    return [[os.path.basename(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files]


def retain_cache_path(retain_model: str, hashes: dict[str, str], settings: dict[str, Any]) -> Path:
    """Where the retain model's statistics are cached: beside it, keyed by a hash of the data, settings and model files.

    A directory (``save_pretrained``) holds ``lm_eval_retain_stats-<key>.json``; a checkpoint file
    ``model.ckpt`` gets ``model.ckpt.lm_eval_retain_stats-<key>.json`` beside it.
    """
    text = json.dumps({"data": hashes, "settings": settings, "model": _model_identity(retain_model)}, sort_keys=True)
    key = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    path = Path(retain_model)
    if path.is_dir():
        return path / f"lm_eval_retain_stats-{key}.json"
    return path.with_name(f"{path.name}.lm_eval_retain_stats-{key}.json")


def lm_metrics_figure(rows: list[dict[str, Any]], title: str = "LM unlearning") -> Any:
    """Forget quality (log scale, left) and model utility (right) over the evaluations of a run."""
    from lightning_forget.reporting import _new_figure

    figure = _new_figure((5.5, 3.5), dpi=120)
    axes = figure.add_subplot(1, 1, 1)
    xs = [-1 if row["epoch"] == "before" else int(row["epoch"]) for row in rows]
    labels = ["before" if row["epoch"] == "before" else str(row["epoch"]) for row in rows]
    utility = [math.nan if row.get("model_utility") is None else float(row["model_utility"]) for row in rows]
    axes.plot(xs, utility, "s-", color="tab:blue", label="model utility")
    axes.set_ylabel("model utility")
    axes.set_xlabel("epoch")
    axes.set_xticks(xs)
    axes.set_xticklabels(labels, fontsize=7)
    quality = [math.nan if row.get("forget_quality") is None else float(row["forget_quality"]) for row in rows]
    if any(math.isfinite(q) for q in quality):
        right = axes.twinx()
        right.plot(xs, [max(q, 1e-300) if math.isfinite(q) else math.nan for q in quality], "o--", color="tab:red",
                   label="forget quality")
        right.set_yscale("log")
        right.set_ylabel("forget quality (KS p-value)")
        right.legend(loc="lower right", fontsize=8)
    axes.legend(loc="lower left", fontsize=8)
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    return figure


class LMUnlearningEvaluation(ContinualCallback):
    """Forget quality, model utility, privacy leakage and the MIA family while a causal LM unlearns, on every rank.

    The metrics are open-unlearning's TOFU evaluation (Maini et al., "TOFU: A Task of Fictitious
    Unlearning for LLMs", COLM 2024; the MUSE privacy leakage and MIA attacks), computed by
    :func:`~lightning_forget.unlearning.lm_eval.evaluate_lm_unlearning` on the datamodule's splits
    (:class:`~lightning_forget.datamodules.FictitiousQADataModule`: ``forget``, ``retain``,
    ``holdout``, ``world_facts``, each through ``dataset(split)``; its ``tokenizer``).

    Mechanism: at each task's start (``before``) and at the end of every ``every_n_epochs``-th
    epoch (and the last), every rank evaluates the samples a ``DistributedSampler`` would give it,
    the per-sample statistics of all splits are gathered in one collective and the repeated
    (padding) samples dropped by index before any global statistic, so every rank holds the
    single-process metrics. They are logged (``lm/<metric>``, at epoch end), kept as rows, and
    written by global rank 0 after each evaluation to ``lm_unlearning_metrics.csv``/``.json``
    and a curve ``lm_unlearning_metrics.png`` (forget quality and model utility over training) in
    the run's results folder (versioned beside another run's files, never replaced).

    Forget quality and privacy leakage compare with the **retain model** (trained without the
    forget set): ``retain_stats`` names a JSON written from ``evaluate_lm_unlearning`` on it, or
    ``retain_model`` names the model (a ``save_pretrained`` directory, or a Lightning checkpoint of
    the same module class); its statistics are then computed once in this run, with the same
    settings, and cached beside it (``retain_cache_path``: keyed by a hash of the data, the
    settings and the model's files) so a later run reuses them.

    The reference-based attack uses the model before unlearning: the reference of an unlearning
    callback of the same trainer when it has one (NPO, IdkPO, GradDiff with KL...), else a
    :class:`~lightning_forget.unlearning.ReferenceModel` made at the task start (adapters disabled
    under PEFT; otherwise a frozen copy of the weights, which is **not** checkpointed: after a
    resume it is the resumed model, so prefer an unlearning callback's reference or
    ``reference=False`` there).

    Keeping the best checkpoint: ``score_weights`` (e.g. ``{"forget_quality": 0.5,
    "model_utility": 0.5}``) makes the callback log ``lm/score = Σ weight · metric``; a user's
    ``ModelCheckpoint(monitor="lm/score", mode="max")`` then keeps the best epoch, and
    ``save_best=True`` also saves ``lm_unlearning_best.ckpt`` in the results folder whenever the
    score improves (every rank calls ``trainer.save_checkpoint``, rank 0 writes).

    Args:
        every_n_epochs: evaluate at the end of every n-th epoch (and at the last).
        before: also evaluate at each task's start (the model before unlearning).
        splits: the split names to evaluate (default: every split the datamodule has records
            for); ``"forget"`` is required.
        retain_stats: path of the retain model's statistics (JSON).
        retain_model: path of the retain model (directory or ``.ckpt``); ignored with ``retain_stats``.
        reference: compute the reference-based attack (``mia_reference``).
        score_weights: ``{metric: weight}`` over ``forget_quality``, ``model_utility``,
            ``privacy_leakage``, ``extraction_strength``, ``exact_memorization`` and the
            ``mia_*`` AUCs; logged as ``lm/score``.
        save_best: save the best-scoring model (needs ``score_weights``).
        batch_size: evaluation batch size (forwards and generation).
        generate: greedy generation for ROUGE-L (the slowest part).
        max_new_tokens: generation length (200 in TOFU; capped by the context).
        k: Min-K / Min-K++ share (0.4).
        gradnorm: the GradNorm attack (one backward per forget and holdout sample).
        progress: a progress bar over generation (rank 0).
        report: write the CSV/JSON/PNG and print the table at fit end.
        log_dir: folder of the files (default: the run's results folder).

    Logged metrics (epoch end, identical on every rank): ``lm/forget_quality`` (with retain
    statistics), ``lm/model_utility``, ``lm/privacy_leakage``, ``lm/extraction_strength``,
    ``lm/exact_memorization``, ``lm/mia_<attack>``, ``lm/<split>_probability``,
    ``lm/<split>_rouge_l``, ``lm/<split>_truth_ratio``, ``lm/<split>_probability_normalised``,
    and ``lm/score`` with ``score_weights``. A metric that cannot be computed is not logged.

    Raises:
        TypeError, ValueError: bad arguments (named). RuntimeError (setup): a datamodule without
            ``dataset(split)``/``tokenizer``, a missing split, retain statistics of other data.

    Note:
        Saved state: ``rows`` (one dict of metrics per evaluation) and ``best_score``.
        Supported strategies: single device, DDP and `ModelParallelStrategy` (FSDP2; equal forwards and
        decoding steps on every rank; GradNorm's per-sample backwards taken in turns by the ranks, world
        size × as many as under DDP, see :func:`~lightning_forget.unlearning.lm_eval.evaluate_lm_unlearning`).
    """

    supported_strategies = DDP_STRATEGIES + SHARDED_STRATEGIES
    task_end_edits_weights = False

    def __init__(
        self,
        every_n_epochs: int = 1,
        before: bool = True,
        splits: Optional[list[str]] = None,
        retain_stats: Optional[str] = None,
        retain_model: Optional[str] = None,
        reference: bool = True,
        score_weights: Optional[dict[str, float]] = None,
        save_best: bool = False,
        batch_size: int = 16,
        generate: bool = True,
        max_new_tokens: int = 200,
        k: float = 0.4,
        gradnorm: bool = True,
        progress: bool = True,
        report: bool = True,
        log_dir: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.every_n_epochs = check_int("every_n_epochs", every_n_epochs, min=1)
        self.before = check_bool("before", before)
        check_type("splits", splits, (list, tuple), allow_none=True, fix=f"pass split names among {list(SPLITS)}")
        if splits is not None:
            bad = [s for s in splits if s not in SPLITS]
            if bad or "forget" not in splits or len(set(splits)) != len(splits):
                raise ValueError(message("splits", f"distinct names among {list(SPLITS)} including 'forget'", splits,
                                         "e.g. ['forget', 'retain', 'holdout', 'world_facts']"))
        self.splits = None if splits is None else list(splits)
        self.retain_stats = check_str("retain_stats", retain_stats, allow_none=True)
        self.retain_model = check_str("retain_model", retain_model, allow_none=True)
        for name, path in (("retain_stats", retain_stats), ("retain_model", retain_model)):
            if path is not None and not os.path.exists(os.path.expanduser(path)):
                raise ValueError(message(name, "an existing path", path, "check the path (nothing is downloaded)"))
        self.reference = check_bool("reference", reference)
        check_type("score_weights", score_weights, dict, allow_none=True,
                   fix='pass e.g. {"forget_quality": 0.5, "model_utility": 0.5}')
        if score_weights is not None:
            bad = [m for m in score_weights if m not in _SCORABLE]
            if not score_weights or bad:
                raise ValueError(message("score_weights", f"a non-empty dict over {list(_SCORABLE)}", score_weights,
                                         'e.g. {"forget_quality": 0.5, "model_utility": 0.5}'))
            for m, w in score_weights.items():
                check_float(f"score_weights[{m!r}]", w)
            if "forget_quality" in score_weights and retain_stats is None and retain_model is None:
                raise ValueError(message("score_weights", "a dict without forget_quality when no retain statistics are given",
                                         score_weights,
                                         "pass retain_stats= or retain_model=, or drop forget_quality"))
        self.score_weights = None if score_weights is None else {m: float(w) for m, w in score_weights.items()}
        self.save_best = check_bool("save_best", save_best)
        if save_best and score_weights is None:
            raise ValueError(message("save_best", "False without score_weights", save_best,
                                     "pass score_weights= (the combination to keep the best by)"))
        self.batch_size = check_int("batch_size", batch_size, min=1)
        self.generate = check_bool("generate", generate)
        self.max_new_tokens = check_int("max_new_tokens", max_new_tokens, min=1)
        self.k = check_float("k", k, min=0, max=1, min_inclusive=False)
        self.gradnorm = check_bool("gradnorm", gradnorm)
        self.progress = check_bool("progress", progress)
        self.report = check_bool("report", report)
        self.log_dir = check_str("log_dir", log_dir, allow_none=True)
        self.rows: list[dict[str, Any]] = []
        self.best_score: Optional[float] = None
        self._retain: Optional[dict[str, Any]] = None
        self._own_reference: Optional[ReferenceModel] = None
        self.retain_cache: Optional[Path] = None

    # ------------------------------------------------------------------ data
    def _datamodule(self, trainer: "pl.Trainer") -> Any:
        dm = getattr(trainer, "datamodule", None)
        if dm is None or not callable(getattr(dm, "dataset", None)) or getattr(dm, "tokenizer", None) is None:
            raise RuntimeError(
                "LMUnlearningEvaluation needs a datamodule with `dataset(split)` and `tokenizer` (got "
                f"{type(dm).__name__}). Fix: use lightning_forget.datamodules.FictitiousQADataModule (your QA files "
                "plug in through its forget_path/retain_path/holdout_path/world_facts_path).")
        return dm

    def _splits(self, trainer: "pl.Trainer") -> dict[str, Any]:
        dm = self._datamodule(trainer)
        names = self.splits
        if names is None:
            records = getattr(dm, "records", None)
            names = [s for s in SPLITS if records is None or len(records(s))]
        out = {}
        for name in names:
            dataset = dm.dataset(name)
            if len(dataset) == 0:
                raise RuntimeError(f"LMUnlearningEvaluation: the datamodule's {name!r} split is empty. Fix: give it "
                                   "records, or leave it out of `splits`.")
            out[name] = dataset
        return out

    def _settings(self) -> dict[str, Any]:
        from lightning_forget.unlearning.lm_eval import DEFAULT_PROMPT

        return {"k": self.k, "generate": self.generate, "max_new_tokens": self.max_new_tokens,
                "prompt_format": DEFAULT_PROMPT}

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        splits = self._splits(trainer)
        hashes = split_hashes(splits, self._datamodule(trainer).tokenizer)
        if self.retain_stats is not None:
            self._retain = load_stats(self.retain_stats)
            theirs = self._retain.get("data_hash", {})
            for name in ("forget", "holdout"):
                if name in theirs and name in hashes and theirs[name] != hashes[name]:
                    raise RuntimeError(f"LMUnlearningEvaluation: retain_stats={self.retain_stats!r} were computed on "
                                       f"another {name!r} split. Fix: evaluate the retain model on this datamodule's "
                                       "data, or pass retain_model= to compute them here.")
        elif self.retain_model is not None:
            self.retain_cache = retain_cache_path(os.path.expanduser(self.retain_model), hashes, self._settings())
        directory = reporting.results_dir(trainer, self.log_dir)  # every rank: trainer.log_dir broadcasts
        if (self.report or self.save_best) and trainer.is_global_zero:
            reporting.ensure_writable_dir(directory, "LMUnlearningEvaluation", "lm_unlearning_metrics.csv/.json/.png",
                                          "pass a writable `log_dir`, or `report=False`")
            if self.report:
                reporting.output_paths(self, directory, _FILES)  # chosen now: never over another run's
            if self.save_best:
                reporting.output_paths(self, directory, _BEST)

    # ------------------------------------------------------------------ retain statistics
    def _load_retain_model(self, pl_module: "pl.LightningModule") -> torch.nn.Module:
        path = os.path.expanduser(self.retain_model)  # type: ignore[arg-type]
        if os.path.isdir(path):
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        try:
            return type(pl_module).load_from_checkpoint(path, map_location="cpu")
        except Exception as error:  # a checkpoint of another class, or not a checkpoint
            raise RuntimeError(f"LMUnlearningEvaluation: retain_model={self.retain_model!r} could not be loaded as a "
                               f"checkpoint of {type(pl_module).__name__} ({type(error).__name__}: {error}). Fix: pass "
                               "a save_pretrained directory, or a checkpoint of the same module class.") from error

    def retain_statistics(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> Optional[dict[str, Any]]:
        """The retain model's statistics: given, cached beside it, or computed now (every rank) and cached."""
        if self._retain is not None or self.retain_model is None:
            return self._retain
        cached = None
        if trainer.is_global_zero and self.retain_cache is not None and self.retain_cache.is_file():
            cached = load_stats(self.retain_cache, "the cached retain statistics")
        cached = trainer.strategy.broadcast(cached, src=0)
        if cached is not None:
            self._retain = cached
            return cached
        model = self._load_retain_model(pl_module).to(pl_module.device)
        with forward_context(trainer):
            stats = evaluate_lm_unlearning(
                model, self._splits(trainer), self._datamodule(trainer).tokenizer, batch_size=self.batch_size,
                generate=self.generate, max_new_tokens=self.max_new_tokens, k=self.k, gradnorm=False,
                progress=self.progress, rank=trainer.global_rank, world_size=trainer.world_size,
                all_gather=trainer.strategy.all_gather)
        del model
        if trainer.is_global_zero and self.retain_cache is not None:
            try:
                tmp = self.retain_cache.with_name(self.retain_cache.name + ".tmp")
                tmp.write_text(json.dumps(stats))
                os.replace(tmp, self.retain_cache)
            except OSError as error:
                rank_zero_warn(f"LMUnlearningEvaluation: the retain statistics could not be cached at "
                               f"{self.retain_cache} ({error}); they are recomputed next run.")
        self._retain = stats
        return stats

    # ------------------------------------------------------------------ evaluation
    def _reference(self, trainer: "pl.Trainer") -> Optional[Any]:
        if not self.reference:
            return None
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            candidate = getattr(callback, "reference", None)
            if callback is not self and isinstance(candidate, ReferenceModel):
                return candidate
        return self._own_reference

    def evaluate(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> dict[str, Any]:
        """The full result of :func:`evaluate_lm_unlearning` on the model as it is now (every rank must call)."""
        retain = self.retain_statistics(trainer, pl_module)
        with forward_context(trainer):
            return evaluate_lm_unlearning(
                pl_module, self._splits(trainer), self._datamodule(trainer).tokenizer, retain_stats=retain,
                reference_model=self._reference(trainer), batch_size=self.batch_size, generate=self.generate,
                max_new_tokens=self.max_new_tokens, k=self.k, gradnorm=self.gradnorm, progress=self.progress,
                rank=trainer.global_rank, world_size=trainer.world_size, all_gather=trainer.strategy.all_gather)

    def score(self, metrics: dict[str, Any]) -> Optional[float]:
        """``Σ weight · metric`` over ``score_weights`` (``None`` when a weighted metric is missing)."""
        if self.score_weights is None:
            return None
        values = [metrics.get(m) for m in self.score_weights]
        if any(v is None for v in values):
            return None
        return float(sum(w * float(v) for w, v in zip(self.score_weights.values(), values)))

    def _row(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", epoch: Any) -> dict[str, Any]:
        metrics = self.evaluate(trainer, pl_module)["metrics"]
        row = {"task": self.current_task(trainer), "epoch": epoch,
               **{k: v for k, v in metrics.items() if k != "model_utility_terms"}}
        if self.score_weights is not None:
            row["score"] = self.score(metrics)
        self.rows.append(row)
        self._write(trainer)
        return row

    def on_task_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        if self.reference and self._own_reference is None and self._reference(trainer) is None:
            self._own_reference = ReferenceModel(pl_module)
        if self.before:
            self._row(trainer, pl_module, "before")

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        from lightning_forget.tasks import task_schedule

        schedule = task_schedule(trainer)
        last = (schedule.is_last_epoch_of_task(trainer.current_epoch) if schedule is not None
                else trainer.current_epoch + 1 >= (trainer.max_epochs or 1))
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0 or last:
            row = self._row(trainer, pl_module, trainer.current_epoch)
            for key, value in row.items():
                if key not in ("task", "epoch") and isinstance(value, (int, float)) and value is not None:
                    pl_module.log(f"lm/{key}", float(value), on_step=False, on_epoch=True)
            score = row.get("score")
            if self.save_best and score is not None and (self.best_score is None or score > self.best_score):
                self.best_score = score
                directory = reporting.results_dir(trainer, self.log_dir)
                path = reporting.output_paths(self, directory, _BEST)["ckpt"] if trainer.is_global_zero else None
                path = trainer.strategy.broadcast(path, src=0)
                trainer.save_checkpoint(path)
            elif score is not None and (self.best_score is None or score > self.best_score):
                self.best_score = score
        super().on_train_epoch_end(trainer, pl_module)

    # ------------------------------------------------------------------ files
    def _write(self, trainer: "pl.Trainer") -> None:
        if not self.report:
            return
        directory = reporting.results_dir(trainer, self.log_dir)  # every rank: trainer.log_dir broadcasts
        if not trainer.is_global_zero:
            return
        paths = reporting.output_paths(self, directory, _FILES)
        write_rows(directory, self.rows, paths={"csv": paths["csv"], "json": paths["json"]})
        lm_metrics_figure(self.rows).savefig(paths["png"])

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_fit_end(trainer, pl_module)
        if not self.report or not self.rows:
            return
        directory = reporting.results_dir(trainer, self.log_dir)  # every rank: log_dir broadcasts
        if not trainer.is_global_zero:
            return
        from rich.console import Console

        shown = ["forget_quality", "model_utility", "privacy_leakage", "mia_min_k", "extraction_strength"]
        if self.score_weights is not None:
            shown.append("score")
        Console().print(render_table(self.rows, title="LM unlearning", extra=shown))
        reporting.announce_results(trainer, "LMUnlearningEvaluation", reporting.output_paths(self, directory, _FILES))

    # ------------------------------------------------------------------ state
    def method_state(self) -> dict[str, Any]:
        return {"rows": [dict(r) for r in self.rows], "best_score": self.best_score}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.rows = [dict(r) for r in state["rows"]]
        self.best_score = state["best_score"]
