"""The convolutional denoising autoencoder (the Keras blog's, with the width configurable)."""

from __future__ import annotations

import torch
from torch import nn


def _conv(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]


class DenoisingAutoencoder(nn.Module):
    """conv + 2x max-pool per entry of ``channels`` (28 -> 14 -> 7), then the mirror image with 2x upsampling.

    The code is the spatial map at the bottom (``channels[-1]`` x 7 x 7 for two levels); there are no skip
    connections, so everything the decoder knows about the clean image passes through it. Input and output are
    1-channel images in [0, 1] (sigmoid output); height and width must be divisible by ``2 ** len(channels)``.
    """

    def __init__(self, channels: list[int] | tuple[int, ...] = (32, 32)):
        super().__init__()
        channels = list(channels)
        down: list[nn.Module] = []
        for c_in, c_out in zip([1, *channels], channels):
            down += [*_conv(c_in, c_out), nn.MaxPool2d(2)]
        up: list[nn.Module] = []
        rev = channels[::-1]
        for c_in, c_out in zip(rev, [*rev[1:], rev[-1]]):
            up += [*_conv(c_in, c_out), nn.Upsample(scale_factor=2, mode="nearest")]
        self.encoder = nn.Sequential(*down)
        self.decoder = nn.Sequential(*up, nn.Conv2d(channels[0], 1, 3, padding=1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))
