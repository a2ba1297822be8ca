"""Split CIFAR-10 and Split CIFAR-100: the presets over torchvision's CIFAR files.

Like the offline presets of :mod:`lightning_forget.datamodules.presets`, each takes only its own
arguments (``root``, ``download``, ``augment`` and its ``val_fraction`` default) and forwards the
rest to :class:`~lightning_forget.datamodules.SplitDataModule`. The files are read through
torchvision from an explicit ``root`` (and downloaded only with ``download=True``); nothing here
runs without them. For offline tests and demos use
:class:`~lightning_forget.datamodules.SplitMNIST` or
:class:`~lightning_forget.datamodules.SplitDigits`.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_forget.datamodules.class_incremental import SplitDataModule
from lightning_forget.datamodules.pools import Normalise, SamplePool
from lightning_forget.datamodules.sources import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    check_torchvision_source,
    torchvision_download,
    torchvision_files_present,
    torchvision_pools,
)

__all__ = ["SplitCIFAR10", "SplitCIFAR100", "RandomCropFlip"]


class RandomCropFlip:
    """The standard CIFAR training augmentation on a tensor image ``(C, H, W)``.

    Pads by ``padding`` pixels (zeros, i.e. the channel mean after normalisation), takes a random
    ``H × W`` crop and flips horizontally with probability 1/2. Randomness comes from torch's
    global generator, which Lightning's ``seed_everything`` and the ``DataLoader`` worker seeding
    make reproducible.

    Args:
        padding: pixels of padding on each side (0 disables the crop).
        flip: whether to flip horizontally at random.
    """

    def __init__(self, padding: int = 4, flip: bool = True) -> None:
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"`padding` must be a non-negative int, got {padding!r}.")
        self.padding = padding
        self.flip = flip

    def __call__(self, x: Tensor) -> Tensor:
        if self.padding:
            height, width = x.shape[-2:]
            padded = F.pad(x, (self.padding,) * 4)
            top, left = torch.randint(0, 2 * self.padding + 1, (2,)).tolist()
            x = padded[..., top : top + height, left : left + width]
        if self.flip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        return x


class SplitCIFAR10(SplitDataModule):
    """Split CIFAR-10: the ten CIFAR-10 classes in class-incremental tasks (default 5 × 2).

    Zenke, Poole & Ganguli, "Continual Learning Through Synaptic Intelligence" (ICML 2017); the
    class-incremental benchmark of e.g. Buzzega et al., "Dark Experience for General Continual
    Learning: a Strong, Simple Baseline" (NeurIPS 2020).

    Mechanism: torchvision's CIFAR-10 (50,000 training and 10,000 test images, 32×32 RGB) is
    held as uint8 and normalised per item (mean ``CIFAR10_MEAN``, std ``CIFAR10_STD``); inputs
    are ``(3, 32, 32)``. By default (``val_fraction=0``) the official test images are the
    validation data of every task, as in the literature; ``val_fraction > 0`` keeps a seeded
    stratified share of the training images for validation instead. With ``augment=True`` the
    training items get random crops (padding 4) and horizontal flips.

    Args:
        root: folder holding (or receiving) ``cifar-10-batches-py``.
        download: download the files into ``root`` in ``prepare_data`` (needs network).
        val_fraction: share of each training class kept for validation (``0``: validate on the
            test images).
        augment: random crop + horizontal flip on training items.
        **kwargs: the other arguments of :class:`~lightning_forget.datamodules.SplitDataModule`
            (``classes_per_task``, ``num_tasks``, ``class_order``, ``shuffle_classes``) and the
            loader arguments of :class:`~lightning_forget.datamodules.ContinualDataModule`.

    Raises:
        ImportError: torchvision is not installed.
        FileNotFoundError: ``root`` lacks the files and ``download=False``.
        ValueError: see :class:`~lightning_forget.datamodules.SplitDataModule`.

    Note:
        Logs nothing and saves no state. Arrays are cached per process.
    """

    _NAME = "CIFAR10"
    _INPUT_SHAPE = (3, 32, 32)
    _NUM_CLASSES = 10
    _DEFAULT_NUM_TASKS = 5
    _MEAN: tuple[float, ...] = CIFAR10_MEAN
    _STD: tuple[float, ...] = CIFAR10_STD

    def __init__(
        self, root: str, download: bool = False, val_fraction: float = 0.0, augment: bool = False, **kwargs: Any
    ) -> None:
        if root is None:
            raise ValueError(
                f"{type(self).__name__}: `root` is required: the folder that holds (or, with "
                f"`download=True`, receives) the {self._NAME} files."
            )
        check_torchvision_source(self._NAME, type(self).__name__, root, download)
        self.root = os.fspath(root)
        self.download = download
        self.augment = augment
        super().__init__(train=None, val=None, test=None, val_fraction=val_fraction, **kwargs)

    def _builtin_has_test(self) -> bool:
        return True

    def _load_builtin(self) -> tuple[SamplePool, Optional[SamplePool]]:
        if self.download and not torchvision_files_present(self._NAME, self.root):
            torchvision_download(self._NAME, self.root)
        return torchvision_pools(self._NAME, self.root, Normalise(255.0, self._MEAN, self._STD))

    def prepare_data(self) -> None:
        """Download the files into ``root`` when ``download=True`` (once per node)."""
        if self.download and not torchvision_files_present(self._NAME, self.root):
            torchvision_download(self._NAME, self.root)

    def _augmentation(self) -> Optional[Callable[[Tensor], Tensor]]:
        return RandomCropFlip() if self.augment else None


class SplitCIFAR100(SplitCIFAR10):
    """Split CIFAR-100: the hundred CIFAR-100 classes in class-incremental tasks (default 10 × 10).

    Rebuffi, Kolesnikov, Sperl & Lampert, "iCaRL: Incremental Classifier and Representation
    Learning" (CVPR 2017).

    Mechanism (and constructor, inherited): as :class:`SplitCIFAR10`, over torchvision's CIFAR-100 (fine labels), normalised
    with ``CIFAR100_MEAN``/``CIFAR100_STD``. iCaRL's protocol shuffles the class order with a
    fixed seed: use ``shuffle_classes=True`` (seeded by ``seed``) or an explicit
    ``class_order``.

    Args:
        root: folder holding (or receiving) ``cifar-100-python``.
        download: download the files into ``root`` in ``prepare_data`` (needs network).
        val_fraction: share of each training class kept for validation (``0``: validate on the
            test images).
        augment: random crop + horizontal flip on training items.
        **kwargs: see :class:`SplitCIFAR10`.

    Raises:
        ImportError: torchvision is not installed.
        FileNotFoundError: ``root`` lacks the files and ``download=False``.
        ValueError: see :class:`~lightning_forget.datamodules.SplitDataModule`.

    Note:
        Logs nothing and saves no state. Arrays are cached per process.
    """

    _NAME = "CIFAR100"
    _NUM_CLASSES = 100
    _DEFAULT_NUM_TASKS = 10
    _MEAN, _STD = CIFAR100_MEAN, CIFAR100_STD

