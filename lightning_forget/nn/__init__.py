"""Layers and backbones (no Lightning)."""

from lightning_forget.nn.backbones import MLP, ResNet, build_backbone

__all__ = ["MLP", "ResNet", "build_backbone"]
