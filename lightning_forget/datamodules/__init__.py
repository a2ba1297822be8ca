"""Datamodules for task streams.

Layers, bottom up: :mod:`.base` (``ContinualDataModule``: the task schedule and the loaders),
:mod:`.pools` and :mod:`.sources` (labelled samples and where they come from),
:mod:`.class_incremental` and :mod:`.domain_incremental` (streams over any labelled data),
:mod:`.presets` and :mod:`.vision` (named benchmarks), :mod:`.text` (text streams),
:mod:`.forget` (forget/retain streams for continual forgetting), :mod:`.instructions`
(prompt/answer task streams for language models) and :mod:`.fictitious_qa` (a network-free
TOFU-like QA benchmark for LM unlearning).
"""

from lightning_forget.datamodules.base import ContinualDataModule
from lightning_forget.datamodules.class_incremental import SplitDataModule
from lightning_forget.datamodules.domain_incremental import DomainIncrementalDataModule
from lightning_forget.datamodules.fictitious_qa import FictitiousQADataModule
from lightning_forget.datamodules.forget import ForgetRetainDataModule
from lightning_forget.datamodules.instructions import InstructionStreamDataModule
from lightning_forget.datamodules.presets import PermutedMNIST, RotatedMNIST, SplitDigits, SplitMNIST
from lightning_forget.datamodules.text import ByteTokenizer, TextStreamDataModule
from lightning_forget.datamodules.vision import SplitCIFAR10, SplitCIFAR100

__all__ = [
    "ByteTokenizer",
    "ContinualDataModule",
    "DomainIncrementalDataModule",
    "FictitiousQADataModule",
    "ForgetRetainDataModule",
    "InstructionStreamDataModule",
    "PermutedMNIST",
    "RotatedMNIST",
    "SplitCIFAR10",
    "SplitCIFAR100",
    "SplitDataModule",
    "SplitDigits",
    "SplitMNIST",
    "TextStreamDataModule",
]
