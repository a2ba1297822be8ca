"""``DomainIncrementalDataModule``: the same classes in every task, under a new input transform.

Every task keeps the full label set; the inputs of task ``t > 0`` are transformed by a fixed,
seeded pixel permutation or a rotation (the domain-incremental scenario of van de Ven & Tolias,
"Three scenarios for continual learning", NeurIPS Continual Learning Workshop 2018).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from lightning_forget.datamodules.labelled import LabelledDataModule
from lightning_forget.datamodules.pools import ArrayDataset, DataSource, SamplePool
from lightning_forget.validation import check_int

__all__ = ["DomainIncrementalDataModule", "rotate_images"]


def rotate_images(x: Tensor, degrees: float, fill: Optional[Tensor] = None, chunk_size: int = 4096) -> Tensor:
    """Rotate a batch of images ``(N, C, H, W)`` about their centre (bilinear resampling).

    Args:
        x: images, float.
        degrees: rotation angle (positive turns the image counter-clockwise as displayed with
            row 0 at the top).
        fill: value per channel ``(1, C, 1, 1)`` for pixels rotated in from outside the image
            (zeros when ``None``).
        chunk_size: images resampled at once (bounds the sampling grid's memory).
    """
    if x.ndim != 4:
        raise ValueError(f"rotate_images expects images (N, C, H, W), got shape {tuple(x.shape)}.")
    height, width = x.shape[-2:]
    radians = math.radians(degrees)
    cos, sin = math.cos(radians), math.sin(radians)
    # affine_grid works in coordinates normalised to [-1, 1] per axis; the aspect-ratio terms
    # keep the rotation rigid in pixel space for non-square images.
    # affine_grid maps each output pixel to the input point it samples: the inverse rotation.
    theta = torch.tensor([[cos, -sin * height / width, 0.0], [sin * width / height, cos, 0.0]], dtype=x.dtype)
    fill = torch.zeros(1, x.shape[1], 1, 1, dtype=x.dtype) if fill is None else fill.to(x.dtype)
    out = torch.empty_like(x)
    for start in range(0, len(x), chunk_size):
        chunk = x[start : start + chunk_size]
        grid = F.affine_grid(theta.expand(len(chunk), 2, 3), list(chunk.shape), align_corners=False)
        out[start : start + chunk_size] = (
            F.grid_sample(chunk - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
        )
    return out


class DomainIncrementalDataModule(LabelledDataModule):
    """A domain-incremental stream: the same classes in every task, under a new input transform.

    Permuted MNIST: Goodfellow, Mirza, Xiao, Courville & Bengio, "An Empirical Investigation of
    Catastrophic Forgetting in Gradient-Based Neural Networks" (ICLR 2014), popularised by
    Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks" (PNAS 2017).
    Rotated MNIST: Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning"
    (NeurIPS 2017).

    Mechanism: every task serves all samples with their original labels. Task 0 is the data as
    given; task ``t > 0`` either reorders the pixels by a fixed permutation (drawn from a
    generator seeded by ``(seed, t)``, the same permutation for every channel) or rotates every
    image by an angle (uniform in ``[0, 180)`` degrees from the same seeded generator, or
    ``angles[t]``). A task's rotated images are computed once per split with
    ``affine_grid``/``grid_sample`` (bilinear) and cached; pixels rotated in from outside the
    image take the per-channel minimum of the training inputs (the background of digit images).
    The permutation is applied per item (no copy of the data per task).

    Args:
        train: training data: ``(X, y)`` tensors/arrays or a ``Dataset`` of ``(x, y)`` (read
            into memory once for the transforms). Rotation needs image inputs ``(C, H, W)`` or
            ``(H, W)``; permutation reorders the last two dims (or the only one) of each input.
        val: validation data (by default a stratified split of ``train``).
        test: test data (defaults to the validation data).
        transform: ``"permute"`` or ``"rotate"``.
        num_tasks: number of tasks (default ``len(angles)`` when given, else 5).
        angles: rotation angle in degrees of every task, ``angles[t]`` for task ``t`` (only with
            ``transform="rotate"``); by default task 0 is 0° and the others are seeded.
        val_fraction: share of each class of ``train`` kept for validation when ``val`` is not
            given; ``0`` uses the test split as validation data.
        **kwargs: the loader and schedule arguments of
            :class:`~lightning_forget.datamodules.ContinualDataModule` (``epochs_per_task``,
            ``batch_size``, ``num_workers``, ``joint``, ``task``, ``seed``, ``eval_batch_size``,
            ``drop_last``); ``seed`` also seeds the permutations/angles and the validation split.

    Raises:
        ValueError: an unknown ``transform``, ``angles`` of the wrong length or given with
            ``transform="permute"``, inputs that cannot be rotated, a ``val_fraction`` outside
            ``[0, 1)``, malformed labels.
        TypeError: ``train``/``val``/``test`` that are neither ``(X, y)`` nor a ``Dataset``.

    Note:
        Logs nothing and saves no state: the stream is a pure function of its arguments. Memory:
        a rotated stream keeps one float copy of the data per task.
    """

    _DEFAULT_NUM_TASKS: int = 5

    def __init__(
        self,
        train: Optional[DataSource] = None,
        val: Optional[DataSource] = None,
        test: Optional[DataSource] = None,
        transform: Literal["permute", "rotate"] = "permute",
        num_tasks: Optional[int] = None,
        angles: Optional[list[float]] = None,
        val_fraction: float = 0.2,
        **kwargs: Any,
    ) -> None:
        owner = type(self).__name__
        if transform not in ("permute", "rotate"):
            raise ValueError(f"{owner}: `transform` must be 'permute' or 'rotate', got {transform!r}.")
        if angles is not None:
            if transform != "rotate":
                raise ValueError(f"{owner}: `angles` only applies to transform='rotate', got transform={transform!r}. Fix: drop `angles`.")
            if not isinstance(angles, (list, tuple)) or not angles or not all(
                isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in angles
            ):
                raise ValueError(f"{owner}: `angles` must be a non-empty list of finite numbers (degrees), got {angles!r}.")
            if num_tasks is not None and num_tasks != len(angles):
                raise ValueError(
                    f"{owner}: `angles` gives one angle per task, so its length must equal num_tasks={num_tasks}; "
                    f"got {len(angles)} angles. Fix: give {num_tasks} angles or drop `num_tasks`."
                )
        if num_tasks is None:
            num_tasks = len(angles) if angles is not None else self._DEFAULT_NUM_TASKS
        check_int("num_tasks", num_tasks, min=1)
        self._init_sources(train, val, test, val_fraction)
        self._classes = self._source_classes()
        self.transform = transform
        self.angles = None if angles is None else [float(a) for a in angles]
        shape = self._INPUT_SHAPE if self._given is None else self._given[0].sample_shape
        assert shape is not None
        if transform == "rotate" and len(shape) not in (2, 3):
            raise ValueError(
                f"{owner}: transform='rotate' needs image inputs of shape (C, H, W) or (H, W), got "
                f"inputs of shape {tuple(shape)}. Fix: reshape X to images, or use transform='permute'."
            )
        self._pixel_dims = min(2, len(shape))
        self._num_pixels = math.prod(shape[-self._pixel_dims :])
        self._fill: Optional[Tensor] = None
        super().__init__(num_tasks=num_tasks, **kwargs)

    def classes_of_task(self, task: int) -> list[int]:
        """Every class: a domain-incremental task keeps the full label set."""
        self._check_task(task)
        return list(self._classes)

    def _task_generator(self, task: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + 7_919 * task + 1)

    def task_permutation(self, task: int) -> Optional[Tensor]:
        """The pixel permutation of ``task`` (``None`` for task 0 or a rotated stream)."""
        if self.transform != "permute" or self._check_task(task) == 0:
            return None
        return torch.randperm(self._num_pixels, generator=self._task_generator(task))

    def task_angle(self, task: int) -> float:
        """The rotation angle of ``task`` in degrees (0 for a permuted stream)."""
        self._check_task(task)
        if self.transform != "rotate":
            return 0.0
        if self.angles is not None:
            return self.angles[task]
        if task == 0:
            return 0.0
        return float(torch.rand(1, generator=self._task_generator(task)).item() * 180.0)

    def _make_task_dataset(self, pool: SamplePool, split: str, task: int) -> Dataset:
        if self.transform == "permute":
            return pool.as_dataset(permutation=self.task_permutation(task), pixel_dims=self._pixel_dims)
        angle = self.task_angle(task)
        if angle % 360 == 0:
            return pool.as_dataset()
        x = pool.normalised_inputs()
        images = x.unsqueeze(1) if x.ndim == 3 else x
        rotated = rotate_images(images, angle, fill=self._rotation_fill())
        rotated = rotated.squeeze(1) if x.ndim == 3 else rotated
        return ArrayDataset(rotated, pool.labels)

    def _rotation_fill(self) -> Tensor:
        if self._fill is None:
            x = self._ensure_pools()[0].normalised_inputs()
            images = x.unsqueeze(1) if x.ndim == 3 else x
            self._fill = images.amin(dim=(0, 2, 3)).view(1, -1, 1, 1)
        return self._fill

