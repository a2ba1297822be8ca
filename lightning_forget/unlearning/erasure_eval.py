"""How well a concept was erased from a class-conditional diffusion model: plain functions (no Lightning).

The protocol of the class-conditional erasure papers (Selective Amnesia, SalUn, SFD): generate N
samples per class, judge them with a classifier trained on the real data, and report

- the erased class's **generation rate** (share of its samples the judge calls that class) and its
  **average probability** under the judge; after erasure they should fall to the rate at which
  samples of other classes are mistaken for it (``false_erased_rate``);
- the kept classes' **accuracy** (share of their samples judged as the class asked for);
- a **Fréchet distance** between generated and real images of the kept classes, on the judge's
  features (torchmetrics' ``FrechetInceptionDistance`` with a custom feature extractor: no
  Inception download; the papers use Inception features on CIFAR-10, so values are not comparable
  to theirs).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["JudgeFeatures", "erasure_scores", "frechet_metric", "judge_features", "sample_grid", "train_judge"]


def _last_linear(classifier: nn.Module) -> nn.Linear:
    linears = [m for m in classifier.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"the judge classifier {type(classifier).__name__} has no nn.Linear layer whose input could "
                         "serve as features. Fix: give it a linear head, or pass a feature module.")
    return linears[-1]


def judge_features(classifier: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """``(logits, features)`` of the judge on ``images``; features = the input of its last ``nn.Linear``."""
    captured: list[Tensor] = []
    handle = _last_linear(classifier).register_forward_hook(lambda m, args, out: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            logits = classifier(images)
    finally:
        handle.remove()
    return logits, captured[-1].flatten(1)


class JudgeFeatures(nn.Module):
    """The judge's features as a torchmetrics feature extractor (``num_features`` set, so no dummy call)."""

    def __init__(self, classifier: nn.Module, num_features: int) -> None:
        super().__init__()
        self.classifier = classifier
        self.num_features = int(num_features)

    def forward(self, images: Tensor) -> Tensor:
        return judge_features(self.classifier, images.float())[1]


def frechet_metric(classifier: nn.Module, example: Tensor) -> Any:
    """A torchmetrics ``FrechetInceptionDistance`` on the judge's features (``example``: one image batch, for the width)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    width = judge_features(classifier, example[:1].float())[1].shape[1]
    metric = FrechetInceptionDistance(feature=JudgeFeatures(classifier, width), normalize=False,
                                      reset_real_features=True, input_img_size=tuple(example.shape[1:]))
    return metric


def erasure_scores(probs: Tensor, intended: Tensor, erased: Sequence[int], kept: Sequence[int]) -> dict[str, float]:
    """The erasure scores of judged samples.

    Args:
        probs: the judge's class probabilities ``(N, K)``.
        intended: the class each sample was generated for ``(N,)``.
        erased: the erased classes.
        kept: the kept classes.

    Returns:
        ``erased_rate`` (samples of erased classes judged as their class), ``erased_prob`` (their
        average probability of it), ``false_erased_rate`` (samples of kept classes judged as an
        erased class, per erased class: the level ``erased_rate`` should fall to), ``retained_acc``
        (samples of kept classes judged as their class); NaN where a group is empty.
    """
    predicted = probs.argmax(1)
    erased_t = torch.tensor(list(erased), dtype=torch.long)
    kept_t = torch.tensor(list(kept), dtype=torch.long)
    is_erased = torch.isin(intended, erased_t)
    is_kept = torch.isin(intended, kept_t)
    nan = float("nan")

    def mean(values: Tensor) -> float:
        return float(values.float().mean()) if values.numel() else nan

    rows = torch.arange(probs.shape[0])
    return {
        "erased_rate": mean((predicted == intended)[is_erased]),
        "erased_prob": mean(probs[rows, intended][is_erased]),
        "false_erased_rate": mean(torch.isin(predicted[is_kept], erased_t)) / max(len(erased_t), 1) if is_kept.any() else nan,
        "retained_acc": mean((predicted == intended)[is_kept]),
    }


def train_judge(images: Tensor, labels: Tensor, num_classes: int, epochs: int = 30, seed: int = 0,
                backbone: str = "mlp", holdout: float = 0.2) -> tuple[nn.Module, float]:
    """Train the judge (a :class:`~lightning_forget.modules.ContinualClassifier`) on real data; returns it and its held-out accuracy.

    A plain loop (Adam lr 1e-3, batch 128) on a seeded ``1 − holdout`` share; deterministic on a CPU.
    """
    from lightning_forget.modules.classifier import ContinualClassifier

    generator = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng():
        torch.manual_seed(int(seed))
        judge = ContinualClassifier(backbone=backbone, num_classes=num_classes, input_shape=tuple(images.shape[1:]),
                                    report=False)
    order = torch.randperm(images.shape[0], generator=generator)
    n_test = int(round(holdout * images.shape[0]))
    test, train = order[:n_test], order[n_test:]
    optimizer = torch.optim.Adam(judge.parameters(), lr=1e-3)
    judge.train()
    for _ in range(int(epochs)):
        perm = train[torch.randperm(train.numel(), generator=generator)]
        for start in range(0, perm.numel(), 128):
            rows = perm[start:start + 128]
            loss = nn.functional.cross_entropy(judge(images[rows].float()), labels[rows].long())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    judge.eval().requires_grad_(False)
    accuracy = float("nan")
    if n_test:
        with torch.no_grad():
            accuracy = float((judge(images[test].float()).argmax(1) == labels[test]).float().mean())
    return judge, accuracy


def sample_grid(images: Tensor, labels: Tensor, per_class: int, num_classes: int, title: str = "",
                names: Optional[Sequence[str]] = None) -> Any:
    """A matplotlib figure: one row per class, ``per_class`` samples each (images in [-1, 1])."""
    from lightning_forget.reporting import _new_figure

    figure = _new_figure((max(per_class, 2) * 0.6 + 0.6, num_classes * 0.6 + 0.4), dpi=100)
    axes = figure.subplots(num_classes, per_class, squeeze=False)
    for k in range(num_classes):
        rows = (labels == k).nonzero().flatten()[:per_class]
        for j in range(per_class):
            ax = axes[k][j]
            ax.axis("off")
            if j < rows.numel():
                image = ((images[rows[j]].float().cpu() + 1) / 2).clamp(0, 1)
                ax.imshow(image.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
            if j == 0:
                ax.set_title(str(names[k]) if names else str(k), fontsize=6, loc="left")
    if title:
        figure.suptitle(title, fontsize=8)
    return figure
