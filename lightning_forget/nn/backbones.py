"""Built-in feature extractors for :class:`~lightning_forget.modules.ContinualClassifier`.

Each backbone maps an input batch to a flat feature vector and exposes ``out_features``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from lightning_forget.validation import check_float, check_int, check_int_sequence

__all__ = ["MLP", "ConvNet", "ResNet", "ViT", "build_backbone"]


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
        input_shape = check_int_sequence("input_shape", input_shape, min=1, fix="pass the shape of one input, e.g. [784]")
        hidden_sizes = check_int_sequence("hidden_sizes", hidden_sizes, min=1, fix="e.g. hidden_sizes=[256, 256]")
        dropout = check_float("dropout", dropout, min=0.0, max=1.0, max_inclusive=False, fix="pass a probability in [0, 1)")
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
        check_int_sequence("input_shape", input_shape, min=1, fix="pass (channels, height, width), e.g. (3, 32, 32)")
        blocks = check_int_sequence("blocks", blocks, min=1, fix="pass the basic blocks per stage, e.g. (2, 2, 2, 2)")
        width = check_int("width", width, min=1, fix="pass the channels of the first stage, e.g. 20 or 64")
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


class ConvNet(nn.Module):
    """A small CNN with linear layers on top: ``[Conv3×3 → ReLU → MaxPool2]×2 → fc1 → ReLU → fc2 → ReLU``.

    The two linears are named ``fc1`` and ``fc2`` (targets for LoRA, e.g.
    ``GSLoRA(target_modules=["backbone.fc1", "backbone.fc2"])``).

    Args:
        input_shape: ``(channels, height, width)``.
        channels: output channels of the two convolutions (default ``(16, 32)``).
        hidden_sizes: widths of ``fc1`` and ``fc2`` (default ``(128, 64)``).
    """

    def __init__(self, input_shape: Sequence[int] = (1, 28, 28), channels: Sequence[int] = (16, 32),
                 hidden_sizes: Sequence[int] = (128, 64)) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"ConvNet needs image inputs `input_shape=(C, H, W)`, got {tuple(input_shape)!r}.")
        c, h, w = check_int_sequence("input_shape", input_shape, min=1, fix="pass (channels, height, width)")
        channels = check_int_sequence("channels", channels, min=1, fix="pass the two convolutions' channels, e.g. (16, 32)")
        hidden_sizes = check_int_sequence("hidden_sizes", hidden_sizes, min=1, fix="pass the widths of fc1 and fc2")
        for name, value in (("channels", channels), ("hidden_sizes", hidden_sizes)):
            if len(value) != 2:
                raise ValueError(f"`{name}` must have 2 entries (one per layer), got {value!r}.")
        self.features = nn.Sequential(
            nn.Conv2d(c, channels[0], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(channels[0], channels[1], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        flat = channels[1] * (h // 4) * (w // 4)
        self.fc1 = nn.Linear(flat, hidden_sizes[0])
        self.fc2 = nn.Linear(hidden_sizes[0], hidden_sizes[1])
        self.out_features = int(hidden_sizes[1])

    def forward(self, x: Tensor) -> Tensor:
        h = torch.flatten(self.features(x), 1)
        return torch.relu(self.fc2(torch.relu(self.fc1(h))))


class ViT(nn.Module):
    """A small Vision Transformer built from a transformers ``ViTConfig`` (no download): images to the [CLS] feature.

    The encoder is ``transformers.ViTModel`` without its pooler; the feature is the final
    LayerNorm's [CLS] token, as ``ViTForImageClassification`` feeds its head. The Transformer
    blocks and their feed-forward pair (the linears :class:`~lightning_forget.callbacks.GSLoRA`
    adapts by default) are found by structure; their module names depend on the transformers
    version (``vit.layers.N.mlp.fc1/fc2`` in 5.x, ``vit.encoder.layer.N.intermediate.dense`` /
    ``output.dense`` before).

    Args:
        input_shape: ``(channels, height, width)``; square images whose side ``patch_size`` divides.
        patch_size: side of a patch (default 7: 16 patches on MNIST).
        hidden_size: token width (default 64).
        num_hidden_layers: number of Transformer blocks (default 4).
        num_attention_heads: heads per block (default 4; must divide ``hidden_size``).
        intermediate_size: feed-forward width (default ``2 * hidden_size``).
        dropout: hidden and attention dropout (default 0).

    Raises:
        ValueError: a non-square image, a patch size that does not divide it, heads that do not
            divide ``hidden_size``.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 28, 28),
        patch_size: int = 7,
        hidden_size: int = 64,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        intermediate_size: Optional[int] = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTModel

        if len(input_shape) != 3 or input_shape[1] != input_shape[2] or input_shape[1] % patch_size:
            raise ValueError(
                f"ViT: `input_shape` must be (channels, side, side) with `patch_size={patch_size}` dividing the side, "
                f"got {tuple(input_shape)}. Fix: pick a patch size that divides the image side (e.g. 7 or 4 for 28)."
            )
        if hidden_size % num_attention_heads:
            raise ValueError(f"ViT: `num_attention_heads={num_attention_heads}` must divide `hidden_size={hidden_size}`.")
        config = ViTConfig(
            image_size=int(input_shape[1]), patch_size=patch_size, num_channels=int(input_shape[0]), hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
            intermediate_size=intermediate_size or 2 * hidden_size, hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
        )
        self.vit = ViTModel(config, add_pooling_layer=False)
        self.out_features = hidden_size

    def forward(self, x: Tensor) -> Tensor:
        return self.vit(pixel_values=x).last_hidden_state[:, 0]


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
