"""Datamodules for task streams."""

from lightning_forget.datamodules.base import ContinualDataModule
from lightning_forget.datamodules.split import (
    DomainIncrementalDataModule,
    PermutedMNIST,
    RotatedMNIST,
    SplitDataModule,
    SplitDigits,
    SplitMNIST,
)
from lightning_forget.datamodules.text import ByteTokenizer, TextStreamDataModule
from lightning_forget.datamodules.vision import SplitCIFAR10, SplitCIFAR100

__all__ = [
    "ByteTokenizer",
    "ContinualDataModule",
    "DomainIncrementalDataModule",
    "PermutedMNIST",
    "RotatedMNIST",
    "SplitCIFAR10",
    "SplitCIFAR100",
    "SplitDataModule",
    "SplitDigits",
    "SplitMNIST",
    "TextStreamDataModule",
]
