"""Datamodules for task streams."""

from lightning_forget.datamodules.base import ContinualDataModule

__all__ = ["ContinualDataModule"]
