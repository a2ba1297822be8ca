"""Built-in feature extractors for :class:`~lightning_forget.modules.ContinualClassifier`.

Each backbone maps an input batch to a flat feature vector and exposes ``out_features``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["MLP", "ResNet", "build_backbone"]


class MLP(nn.Module):
    """Flatten, then ``Linear → ReLU (→ Dropout)`` per hidden size (the Split-MNIST standard).

    Args:
        input_shape: shape of one input (without the batch dimension).
        hidden_sizes: width of each hidden layer.
        dropout: dropout probability after each hidden layer (0 disables it).
    """

    def __init__(self, input_shape: Sequence[int], hidden_sizes: Sequence[int] = (256, 256), dropout: float = 0.0) -> None:
        super().__init__()
        if not hidden_sizes:
            raise ValueError("`hidden_sizes` must name at least one hidden layer, e.g. [256, 256].")
        in_features = math.prod(int(d) for d in input_shape)
        layers: list[nn.Module] = [nn.Flatten()]
        for width in hidden_sizes:
            layers += [nn.Linear(in_features, int(width)), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_features = int(width)
        self.layers = nn.Sequential(*layers)
        self.out_features = in_features

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class _BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A small CIFAR-style ResNet (3×3 stem, four stages of basic blocks, global pooling).

    With ``blocks=(2, 2, 2, 2)`` and ``width=64`` it is ResNet-18; the continual-learning
    literature's "reduced ResNet-18" uses ``width=20``. Stage modules are named
    ``layer1`` … ``layer4`` like torchvision's, so depth-aware tools find the blocks.

    Args:
        input_shape: ``(channels, height, width)`` of one input.
        blocks: basic blocks per stage.
        width: channels of the first stage (doubled at each later stage).
    """

    def __init__(self, input_shape: Sequence[int], blocks: Sequence[int] = (2, 2, 2, 2), width: int = 20) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"ResNet needs image inputs `input_shape=(C, H, W)`, got {tuple(input_shape)!r}.")
        self.conv1 = nn.Conv2d(int(input_shape[0]), width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        in_planes = width
        for i, num in enumerate(blocks):
            planes = width * 2**i
            stage = []
            for j in range(int(num)):
                stage.append(_BasicBlock(in_planes, planes, stride=(1 if i == 0 or j > 0 else 2)))
                in_planes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.num_stages = len(blocks)
        self.out_features = in_planes

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            out = getattr(self, f"layer{i + 1}")(out)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)


def build_backbone(name: str, input_shape: Sequence[int], **kwargs: object) -> nn.Module:
    """Build a built-in backbone by name (``"mlp"`` or ``"resnet"``)."""
    if name == "mlp":
        return MLP(input_shape, **kwargs)  # type: ignore[arg-type]
    if name == "resnet":
        return ResNet(input_shape, **kwargs)  # type: ignore[arg-type]
    raise ValueError(
        f"Unknown backbone {name!r}: use 'mlp', 'resnet', or pass an nn.Module "
        "(in YAML: `backbone: {class_path: my.module.Net, init_args: {...}}`)."
    )
