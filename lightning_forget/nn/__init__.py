"""Layers and backbones (no Lightning)."""

from lightning_forget.nn.adab2n import AdaB2NBatchNorm2d, adab2n_layers, convert_adab2n, revert_adab2n
from lightning_forget.nn.backbones import MLP, ConvNet, ResNet, ViT, build_backbone

__all__ = ["AdaB2NBatchNorm2d", "ConvNet", "MLP", "ResNet", "ViT", "adab2n_layers", "build_backbone", "convert_adab2n",
           "revert_adab2n"]
