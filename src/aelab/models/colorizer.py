"""The colorization network: a small U-Net from luminance to the two Lab chroma channels."""

from __future__ import annotations

import torch
from torch import nn


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())


class Colorizer(nn.Module):
    """Encoder-decoder with skip connections: L (N, 1, H, W) in [0, 1] -> ab (N, 2, H, W) in [-1, 1].

    One conv block per entry of ``channels``, halving the resolution between blocks; the decoder upsamples with
    transposed convs and concatenates the encoder map of the same resolution (the skip), so edges found in the
    luminance reach the output at full resolution. H and W must be divisible by ``2 ** (len(channels) - 1)``.
    """

    def __init__(self, channels: list[int] | tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        channels = list(channels)
        self.down = nn.ModuleList(_block(c_in, c_out) for c_in, c_out in zip([1, *channels], channels))
        self.pool = nn.MaxPool2d(2)
        rev = channels[::-1]
        self.up = nn.ModuleList(nn.ConvTranspose2d(c_in, c_out, 2, stride=2) for c_in, c_out in zip(rev, rev[1:]))
        self.merge = nn.ModuleList(_block(2 * c, c) for c in rev[1:])
        self.head = nn.Conv2d(channels[0], 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, skips[-2::-1]):
            x = merge(torch.cat([up(x), skip], dim=1))
        return torch.tanh(self.head(x))
