"""Split CIFAR-10 and Split CIFAR-100: class-incremental streams over torchvision's CIFAR files.

The files are read through torchvision from an explicit ``root`` (and downloaded only with
``download=True``); nothing here runs without them. For offline tests and demos use
:class:`~lightning_forget.datamodules.SplitMNIST` or
:class:`~lightning_forget.datamodules.SplitDigits`.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_forget.datamodules.split import (
    SplitDataModule,
    _check_torchvision_source,
    _Normalise,
    _Pool,
    _torchvision_download,
    _torchvision_files_present,
    _torchvision_pools,
)

__all__ = ["SplitCIFAR10", "SplitCIFAR100", "RandomCropFlip"]

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


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


class _SplitCIFAR(SplitDataModule):
    """Shared loading of the CIFAR streams (``_NAME``, statistics and defaults per subclass)."""

    _NAME = "CIFAR10"
    _INPUT_SHAPE = (3, 32, 32)
    _MEAN: tuple[float, ...] = CIFAR10_MEAN
    _STD: tuple[float, ...] = CIFAR10_STD

    def _init_cifar(self, root: str, download: bool, augment: bool, **kwargs: object) -> None:
        if root is None:
            raise ValueError(
                f"{type(self).__name__}: `root` is required: the folder that holds (or, with "
                f"`download=True`, receives) the {self._NAME} files."
            )
        _check_torchvision_source(self._NAME, type(self).__name__, root, download)
        self.root = os.fspath(root)
        self.download = download
        self.augment = augment
        SplitDataModule.__init__(self, **kwargs)  # type: ignore[arg-type]

    def _builtin_has_test(self) -> bool:
        return True

    def _load_builtin(self) -> tuple[_Pool, Optional[_Pool]]:
        if self.download and not _torchvision_files_present(self._NAME, self.root):
            _torchvision_download(self._NAME, self.root)
        return _torchvision_pools(self._NAME, self.root, _Normalise(255.0, self._MEAN, self._STD))

    def prepare_data(self) -> None:
        """Download the files into ``root`` when ``download=True`` (once per node)."""
        if self.download and not _torchvision_files_present(self._NAME, self.root):
            _torchvision_download(self._NAME, self.root)

    def _augmentation(self) -> Optional[Callable[[Tensor], Tensor]]:
        return RandomCropFlip() if self.augment else None


class SplitCIFAR10(_SplitCIFAR):
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
        classes_per_task: classes per task (int dividing 10, or a list summing to 10).
        num_tasks: number of tasks (default 5 when neither this nor ``classes_per_task`` is set).
        class_order: explicit order of the classes.
        shuffle_classes: seeded permutation of the classes.
        val_fraction: share of each training class kept for validation (``0``: validate on the
            test images).
        augment: random crop + horizontal flip on training items.
        epochs_per_task: training epochs spent on each task.
        batch_size: training and evaluation batch size.
        num_workers: ``DataLoader`` workers.
        joint: train on all tasks at once (upper-bound baseline).
        task: serve only this task's training data.
        seed: seed of the split, class shuffle and loader shuffles.
        eval_batch_size: evaluation batch size.
        drop_last: drop the last incomplete training batch.

    Raises:
        ImportError: torchvision is not installed.
        FileNotFoundError: ``root`` lacks the files and ``download=False``.
        ValueError: see :class:`~lightning_forget.datamodules.SplitDataModule`.

    Note:
        Logs nothing and saves no state. Arrays are cached per process.
    """

    _NAME = "CIFAR10"
    _NUM_CLASSES = 10
    _DEFAULT_NUM_TASKS = 5
    _MEAN, _STD = CIFAR10_MEAN, CIFAR10_STD

    def __init__(
        self,
        root: str,
        download: bool = False,
        classes_per_task: Optional[Union[int, list[int]]] = None,
        num_tasks: Optional[int] = None,
        class_order: Optional[list[int]] = None,
        shuffle_classes: bool = False,
        val_fraction: float = 0.0,
        augment: bool = False,
        epochs_per_task: int = 1,
        batch_size: int = 32,
        num_workers: int = 0,
        joint: bool = False,
        task: Optional[int] = None,
        seed: int = 0,
        eval_batch_size: Optional[int] = None,
        drop_last: bool = False,
    ) -> None:
        self._init_cifar(
            root,
            download,
            augment,
            classes_per_task=classes_per_task,
            num_tasks=num_tasks,
            class_order=class_order,
            shuffle_classes=shuffle_classes,
            val_fraction=val_fraction,
            epochs_per_task=epochs_per_task,
            batch_size=batch_size,
            num_workers=num_workers,
            joint=joint,
            task=task,
            seed=seed,
            eval_batch_size=eval_batch_size,
            drop_last=drop_last,
        )


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
        classes_per_task: classes per task (int dividing 100, or a list summing to 100).
        num_tasks: number of tasks (default 10 when neither this nor ``classes_per_task`` is set).
        class_order: explicit order of the classes.
        shuffle_classes: seeded permutation of the classes.
        val_fraction: share of each training class kept for validation (``0``: validate on the
            test images).
        augment: random crop + horizontal flip on training items.
        epochs_per_task: training epochs spent on each task.
        batch_size: training and evaluation batch size.
        num_workers: ``DataLoader`` workers.
        joint: train on all tasks at once (upper-bound baseline).
        task: serve only this task's training data.
        seed: seed of the split, class shuffle and loader shuffles.
        eval_batch_size: evaluation batch size.
        drop_last: drop the last incomplete training batch.

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

