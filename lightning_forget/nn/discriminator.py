"""A PatchGAN discriminator (no Lightning), as DoCo's concept domain correction uses on predicted ``x̂₀``."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from lightning_forget.validation import check_int, message

__all__ = ["PatchGANDiscriminator", "patchgan_blocks"]


def patchgan_blocks(image_size: int, max_blocks: int = 4) -> int:
    """The most stride-2 blocks (at most ``max_blocks``) that leave a ≥ 2×2 map for the final 4×4 convolution."""
    blocks = 0
    size = int(image_size)
    while blocks < max_blocks and size // 2 >= 2:
        size //= 2
        blocks += 1
    if blocks == 0:
        raise ValueError(message("image_size", "at least 4 for a PatchGAN discriminator", image_size))
    return blocks


class PatchGANDiscriminator(nn.Module):
    """Stride-2 4×4 convolutions with LeakyReLU(0.2) (BatchNorm after all but the first), then a 4×4 convolution to one logit per patch.

    The DoCo code's discriminator (``PatchGANDiscriminator`` in the reimplementations): widths
    64, 128, 256, 512 over four blocks. ``blocks`` shortens it for small images; BatchNorm keeps no
    running statistics (the DoCo code never switches the discriminator to eval mode, so only batch
    statistics are used; without running buffers its state is the same on every DDP rank).

    Args:
        in_channels: image (or latent) channels.
        blocks: stride-2 blocks (4 in the DoCo code; see :func:`patchgan_blocks`).
        width: channels of the first block, doubled per block up to 8× (64 in the DoCo code).
    """

    def __init__(self, in_channels: int, blocks: int = 4, width: int = 64) -> None:
        super().__init__()
        in_channels = check_int("in_channels", in_channels, min=1)
        blocks = check_int("blocks", blocks, min=1)
        width = check_int("width", width, min=1)
        layers: list[nn.Module] = []
        channels: Optional[int] = None
        for i in range(blocks):
            out = width * min(2 ** i, 8)
            layers.append(nn.Conv2d(in_channels if channels is None else channels, out, 4, stride=2, padding=1))
            if i > 0:
                layers.append(nn.BatchNorm2d(out, track_running_stats=False))
            layers.append(nn.LeakyReLU(0.2))
            channels = out
        layers.append(nn.Conv2d(channels, 1, 4, padding=1))  # type: ignore[arg-type]
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)
