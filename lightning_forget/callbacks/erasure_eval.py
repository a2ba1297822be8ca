"""``ErasureEvaluation``: judge a diffusion model's samples per class before and after each erasure task."""

from __future__ import annotations

import json
import os
from typing import Any, Literal, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_forget import reporting
from lightning_forget.callbacks.erasure import ConceptSpec, _concept_list
from lightning_forget.tasks import DDP_STRATEGIES, SHARDED_STRATEGIES, ContinualCallback
from lightning_forget.unlearning.erasure_eval import erasure_scores, frechet_metric, judge_features, sample_grid, train_judge
from lightning_forget.validation import check_bool, check_choice, check_float, check_int, check_str, message

__all__ = ["ErasureEvaluation", "evaluate_erasure"]

SCORES = ("erased_rate", "erased_prob", "false_erased_rate", "retained_acc", "fd")


def _real_data(name: str) -> tuple[Tensor, Tensor]:
    from lightning_forget.modules.diffusion import digits_data, mnist_data

    return digits_data() if name == "digits" else mnist_data()


def evaluate_erasure(
    pl_module: Any,
    judge: nn.Module,
    erased: Sequence[int],
    kept: Sequence[int],
    real_images: Tensor,
    real_labels: Tensor,
    samples_per_class: int = 50,
    seed: int = 0,
    num_steps: Optional[int] = None,
    guidance_scale: Optional[float] = None,
    rank: int = 0,
    world_size: int = 1,
    gather: Any = None,
) -> tuple[dict[str, float], Tensor, Tensor]:
    """Generate ``samples_per_class`` images per class, judge them, and score the erasure.

    Sample ``i`` (class ``i // samples_per_class``) starts from noise seeded by ``(seed, i)``; rank
    ``r`` of ``world_size`` generates samples ``r, r + world_size, ...`` and ``gather`` (e.g.
    ``trainer.strategy.all_gather``) joins them, so the scores do not depend on the number of
    processes. The Fréchet distance is computed on the kept classes against ``real_images`` of the
    kept classes (each rank its share; torchmetrics syncs the sums under DDP).

    Returns:
        ``(scores, images, labels)``: :func:`~lightning_forget.unlearning.erasure_eval.erasure_scores`
        plus ``"fd"``, and the gathered samples in sample order.
    """
    k = int(pl_module.num_classes)
    total = k * samples_per_class
    indices = list(range(rank, total, world_size))
    # Every rank samples as many images as rank 0 (the most; a rank short of it repeats its last one, left out of
    # the scores): the same forwards on every rank, which a sharded (FSDP2) model's collective forwards need.
    n = len(range(0, total, world_size))
    padded = indices + [indices[-1] if indices else 0] * (n - len(indices))
    all_labels = torch.tensor([i // samples_per_class for i in padded], dtype=torch.long)
    noise = pl_module.initial_noise(len(padded), seed, indices=padded)
    all_images = pl_module.sample(all_labels, num_steps=num_steps, guidance_scale=guidance_scale, noise=noise).detach()
    judge = judge.to(all_images.device)
    logits, _ = judge_features(judge, all_images.float())
    all_probs = logits.softmax(-1)
    own = len(indices)
    probs, images, labels = all_probs[:own], all_images[:own], all_labels[:own]
    metric = frechet_metric(judge, all_images[:1]).to(all_images.device)
    kept_t = torch.tensor(list(kept), dtype=torch.long)
    fake_kept = images[torch.isin(labels, kept_t).to(images.device)]
    real_rows = torch.isin(real_labels, kept_t).nonzero().flatten()[rank::world_size]
    if fake_kept.shape[0]:
        metric.update(fake_kept.float(), real=False)
    if real_rows.numel():
        metric.update(real_images[real_rows].to(images.device).float(), real=True)
    try:
        fd = float(metric.compute())
    except (RuntimeError, ValueError):  # fewer than two samples on a side
        fd = float("nan")
    if gather is not None and world_size > 1:
        g_probs, g_images, g_labels = (gather(t) for t in (all_probs, all_images, all_labels.to(all_images.device)))
        order = [(r, j) for j in range(n) for r in range(world_size) if r + j * world_size < total]
        probs = torch.stack([g_probs[r, j] for r, j in order])
        images = torch.stack([g_images[r, j] for r, j in order])
        labels = torch.stack([g_labels[r, j] for r, j in order]).long()
    scores = erasure_scores(probs.cpu(), labels.cpu(), erased, kept)
    scores["fd"] = fd
    return scores, images.cpu(), labels.cpu()


class ErasureEvaluation(ContinualCallback):
    """Judge ``samples_per_class`` generated images per class before erasure and after each task.

    The judge is a classifier of the real data: ``classifier`` (a module), or ``classifier_ckpt``
    (a :class:`~lightning_forget.modules.ContinualClassifier` checkpoint), or, with neither, one
    trained in ``setup`` on ``data`` (:func:`~lightning_forget.unlearning.erasure_eval.train_judge`,
    ``judge_epochs``, seeded; rank 0's weights are broadcast). ``data`` also gives the real
    images of the Fréchet distance.

    Runs at the first fit's train start (``"before"``, with ``before=True``) and at each task's
    report (after every callback's task end). Each rank generates its share; the scores are the
    same on every rank and do not depend on the number of processes
    (:func:`evaluate_erasure`). Rank 0 writes ``erasure.json`` (every row) and a grid PNG per row
    (``erasure_samples_before.png``, ``erasure_samples_task{t}.png``: one row per class) into the
    run's folder (versioned beside another run's files), and sends the grids to the loggers that
    take images.

    Args:
        erase: the erased concepts, as given to the erasure callback (a list of lists: task ``t``
            scores ``erase[0..t]`` as erased).
        data: ``"digits"`` or ``"mnist"``: the real data (judge training and Fréchet distance).
        samples_per_class: generated samples per class (default 50).
        classifier: the judge module (logits), or ``None``.
        classifier_ckpt: path of a ContinualClassifier checkpoint, or ``None``.
        judge_epochs: epochs of the judge trained on ``data`` (default 30).
        num_steps: DDIM steps (default: the module's ``sample_steps``).
        guidance_scale: guidance ``w`` (default: the module's).
        seed: seed of the samples' noise (the same samples before and after).
        before: evaluate before training (default True).
        grid_per_class: samples per class in the grid PNG (default 8).
        log_dir: folder of the files (default: the run's results folder).

    Logged (after each task): ``erasure/erased_rate``, ``erasure/erased_prob``,
    ``erasure/false_erased_rate``, ``erasure/retained_acc``, ``erasure/fd``; the values before
    erasure go to the loggers with the suffix ``_before``.

    Note:
        Saved state: ``rows`` (every evaluation's scores), ``version``.
    """

    #: Under ModelParallelStrategy every rank samples as many images (:func:`evaluate_erasure`); the judge is replicated.
    supported_strategies = DDP_STRATEGIES + SHARDED_STRATEGIES
    task_end_edits_weights = False
    state_arguments: tuple[str, ...] = ()

    def __init__(
        self,
        erase: ConceptSpec,
        data: Optional[Literal["digits", "mnist"]] = "digits",
        samples_per_class: int = 50,
        classifier: Optional[nn.Module] = None,
        classifier_ckpt: Optional[str] = None,
        judge_epochs: int = 30,
        num_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        seed: int = 0,
        before: bool = True,
        grid_per_class: int = 8,
        log_dir: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.erase = _concept_list("erase", erase)
        self.data = check_choice("data", data, ("digits", "mnist"))
        self.samples_per_class = check_int("samples_per_class", samples_per_class, min=2)
        if classifier is not None and not isinstance(classifier, nn.Module):
            raise TypeError(message("classifier", "an nn.Module returning logits, or None", classifier))
        if classifier is not None and classifier_ckpt is not None:
            raise ValueError(message("classifier_ckpt", "None when `classifier` is given", classifier_ckpt, "pass one of them"))
        self.classifier = classifier
        self.classifier_ckpt = check_str("classifier_ckpt", classifier_ckpt, allow_none=True)
        if self.classifier_ckpt is not None and not os.path.isfile(self.classifier_ckpt):
            raise ValueError(message("classifier_ckpt", "an existing checkpoint file", classifier_ckpt))
        self.judge_epochs = check_int("judge_epochs", judge_epochs, min=1)
        self.num_steps = check_int("num_steps", num_steps, min=1, allow_none=True)
        self.guidance_scale = check_float("guidance_scale", guidance_scale, min=0, allow_none=True)
        self.seed = check_int("seed", seed)
        self.before = check_bool("before", before)
        self.grid_per_class = check_int("grid_per_class", grid_per_class, min=1)
        self.log_dir = check_str("log_dir", log_dir, allow_none=True)
        self.rows: list[dict[str, Any]] = []
        self.judge: Optional[nn.Module] = None
        self.judge_accuracy = float("nan")
        self._real: Optional[tuple[Tensor, Tensor]] = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_real=None)
        return state

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if not hasattr(pl_module, "sample") or not hasattr(pl_module, "num_classes"):
            raise RuntimeError(f"ErasureEvaluation judges a diffusion model's samples; {type(pl_module).__name__} has no "
                               "`sample`/`num_classes`. Fix: use lightning_forget.modules.DiffusionModule.")
        self._real = _real_data(self.data)
        if self.judge is None:
            self.judge = self._build_judge(trainer, max(int(pl_module.num_classes), int(self._real[1].max()) + 1))
        directory = reporting.results_dir(trainer, self.log_dir)  # every rank: trainer.log_dir is a broadcast
        if trainer.is_global_zero:  # announce where the files go, before training
            self._paths(directory, "before")

    def _build_judge(self, trainer: "pl.Trainer", num_classes: int) -> nn.Module:
        if self.classifier is not None:
            return self.classifier.eval()
        if self.classifier_ckpt is not None:
            from lightning_forget.modules.classifier import ContinualClassifier

            return ContinualClassifier.load_from_checkpoint(self.classifier_ckpt, map_location="cpu").eval()
        assert self._real is not None
        judge, accuracy = train_judge(*self._real, num_classes=num_classes, epochs=self.judge_epochs, seed=self.seed)
        state = trainer.strategy.broadcast({k: v.cpu() for k, v in judge.state_dict().items()}, src=0)
        judge.load_state_dict(state)
        self.judge_accuracy = accuracy
        rank_zero_info(f"ErasureEvaluation: judge trained on {self.data} (held-out accuracy {accuracy:.3f})")
        return judge

    def _paths(self, directory: str, tag: str) -> dict[str, Any]:
        """The row's files (rank 0 only; ``directory`` from :func:`~lightning_forget.reporting.results_dir` on every rank)."""
        return reporting.output_paths(self, directory, {"json": "erasure.json", "png": f"erasure_samples_{tag}.png"})

    # ------------------------------------------------------------------ evaluation
    def erased_until(self, task: int) -> list[Any]:
        assert self.erase is not None
        if any(isinstance(c, list) for c in self.erase):
            out: list[Any] = []
            for group in self.erase[: task + 1]:
                out += group if isinstance(group, list) else [group]
            return out
        return list(self.erase)

    def evaluate(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", tag: str, task: int) -> dict[str, float]:
        """Score the model now (every rank; the same result on each) and write the row's files (rank 0)."""
        erased = sorted({int(pl_module.concept_index(c)) for c in self.erased_until(max(task, 0))})
        kept = [c for c in range(int(pl_module.num_classes)) if c not in erased]
        assert self.judge is not None and self._real is not None
        scores, images, labels = evaluate_erasure(
            pl_module, self.judge, erased, kept, *self._real, samples_per_class=self.samples_per_class, seed=self.seed,
            num_steps=self.num_steps, guidance_scale=self.guidance_scale, rank=trainer.global_rank,
            world_size=trainer.world_size, gather=trainer.strategy.all_gather)
        row = {"tag": tag, "task": task, "erased": erased, **scores}
        self.rows.append(row)
        directory = reporting.results_dir(trainer, self.log_dir)  # every rank (a broadcast), not rank 0 alone
        if trainer.is_global_zero:
            paths = self._paths(directory, tag)
            title = f"{tag}: erased {erased}, erased_rate {scores['erased_rate']:.2f}, retained_acc {scores['retained_acc']:.2f}"
            figure = sample_grid(images, labels, self.grid_per_class, int(pl_module.num_classes), title,
                                 getattr(pl_module, "concepts", None))
            os.makedirs(os.path.dirname(paths["png"]), exist_ok=True)
            figure.savefig(paths["png"], dpi=100)
            reporting.log_figure(trainer, figure, f"erasure/samples_{tag}")
            with open(paths["json"], "w") as f:
                json.dump(reporting._none_if_nan({"judge_accuracy": self.judge_accuracy, "rows": self.rows}), f, indent=1)
            rank_zero_info(f"ErasureEvaluation {tag}: " + ", ".join(f"{k} {scores[k]:.4g}" for k in SCORES)
                           + f"; results written to {paths['json']}")
        return scores

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # on_fit_start runs before every callback's on_train_start, where task starts (UCE's edit) fire.
        if self.before and not self.rows and self._started < 0:
            scores = self.evaluate(trainer, pl_module, "before", 0)
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics({f"erasure/{k}_before": v for k, v in scores.items()}, step=trainer.global_step)

    def on_task_report(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", task: int) -> None:
        scores = self.evaluate(trainer, pl_module, f"task{task}", task)
        self.log_task_metrics(trainer, pl_module, {f"erasure/{k}": v for k, v in scores.items()})

    # ------------------------------------------------------------------ state
    def method_state(self) -> dict[str, Any]:
        return {"rows": [dict(r) for r in self.rows]}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.rows = [dict(r) for r in state["rows"]]
