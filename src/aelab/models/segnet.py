"""SegNet (Badrinarayanan et al., arXiv 1511.00561): an encoder-decoder whose decoder upsamples with the max-pooling
indices the encoder saved, so boundaries come back where the encoder found them, with no learned upsampling.

Encoder stage i: ``convs[i]`` x (conv k x k - BN - ReLU) to ``channels[i]``, then 2x2 max-pool keeping the indices.
Decoder stage i (mirrored): max-unpool with stage i's indices to its pre-pool size, then ``convs[i]`` x
(conv - BN - ReLU) back to the previous stage's width; a 1x1 conv classifies every pixel. Unpooling to the
recorded size makes the output as large as the input for any size of at least 2**len(channels).
"""

from __future__ import annotations

import torch
from torch import nn


def conv_block(c_in: int, c_out: int, n: int, kernel_size: int) -> nn.Sequential:
    """``n`` x (conv - BN - ReLU); the first conv maps ``c_in`` to ``c_out``."""
    layers: list[nn.Module] = []
    for i in range(n):
        layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, kernel_size, padding=kernel_size // 2, bias=False),
                   nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class SegNet(nn.Module):
    """Per-pixel class logits (N, classes, H, W) for images (N, in_channels, H, W).

    ``channels``/``convs``: width and number of convs of each encoder stage (mirrored by the decoder). SegNet-Basic
    is 4 stages of 64; the VGG-16-bn shape is channels (64, 128, 256, 512, 512) with convs (2, 2, 3, 3, 3).
    """

    def __init__(self, in_channels: int, classes: int, channels: list[int] | tuple[int, ...] = (64, 64, 64, 64),
                 convs: list[int] | tuple[int, ...] = (2, 2, 2, 2), kernel_size: int = 3, name: str = "segnet"):
        super().__init__()
        if len(channels) != len(convs):
            raise ValueError(f"channels {list(channels)} and convs {list(convs)} need one entry per stage")
        self.name = name
        self.encoders = nn.ModuleList(conv_block(c_in, c_out, n, kernel_size)
                                      for c_in, c_out, n in zip([in_channels, *channels], channels, convs))
        self.decoders = nn.ModuleList(conv_block(c_in, c_out, n, kernel_size)  # stage i back to stage i-1's width
                                      for c_in, c_out, n in zip(channels, [channels[0], *channels], convs))
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2)
        self.classifier = nn.Conv2d(channels[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        saved = []
        for encoder in self.encoders:
            x = encoder(x)
            size = x.shape[-2:]
            x, indices = self.pool(x)
            saved.append((indices, size))
        for decoder, (indices, size) in zip(reversed(self.decoders), reversed(saved)):
            x = decoder(self.unpool(x, indices, output_size=size))
        return self.classifier(x)
