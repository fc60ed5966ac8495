"""A small 3D U-Net (two levels, few channels) in plain torch: the example packaged network."""

from __future__ import annotations

import torch
from torch import nn


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.LeakyReLU(0.01),
        nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1),
        nn.LeakyReLU(0.01),
    )


class UNet3d(nn.Module):
    """(B, in_channels, z, y, x) to (B, classes, z, y, x); each of z, y, x must be even."""

    def __init__(self, in_channels: int = 1, classes: int = 3, width: int = 4) -> None:
        super().__init__()
        self.down = _block(in_channels, width)
        self.pool = nn.MaxPool3d(2)
        self.bottom = _block(width, 2 * width)
        self.up = nn.ConvTranspose3d(2 * width, width, kernel_size=2, stride=2)
        self.merge = _block(2 * width, width)
        self.head = nn.Conv3d(width, classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.down(x)
        deep = self.bottom(self.pool(skip))
        return self.head(self.merge(torch.cat([self.up(deep), skip], dim=1)))
