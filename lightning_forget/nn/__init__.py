"""Layers and backbones (no Lightning)."""

from lightning_forget.nn.backbones import MLP, ConvNet, ResNet, ViT, build_backbone

__all__ = ["MLP", "ConvNet", "ResNet", "ViT", "build_backbone"]
