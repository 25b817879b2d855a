"""SegNet (Badrinarayanan et al., arXiv 1511.00561): an encoder-decoder whose decoder upsamples with the max-pooling
indices the encoder saved, so boundaries come back where the encoder found them, with no learned upsampling.

Encoder stage i: ``convs[i]`` x (conv k x k - BN - ReLU) to ``channels[i]``, then 2x2 max-pool keeping the indices.
Decoder stage i (mirrored): max-unpool with stage i's indices to its pre-pool size, then ``convs[i]`` x
(conv - BN, and ReLU when ``decoder_relu``) back to the previous stage's width; a 1x1 conv classifies every pixel.
Unpooling to the recorded size makes the output as large as the input for any size of at least 2**len(channels).

The paper's SegNet-Basic (its Caffe model ``segnet_basic_train.prototxt``) is ``channels=[64]*4, convs=[1]*4,
kernel_size=7, decoder_relu=False`` with local response normalisation of the input (``input_lrn``) and He
initialisation (uniform here; Caffe's "msra" filler draws from a normal of the same variance): 1,416,075 parameters
for 3 input channels and 11 classes. Caffe's convolutions also have biases (+512), which the batch norm right after
each cancels, so they are left out here.
"""

from __future__ import annotations

import torch
from torch import nn

from aelab.models.autoencoders import INITS, init_weights


def conv_block(c_in: int, c_out: int, n: int, kernel_size: int, relu: bool = True) -> nn.Sequential:
    """``n`` x (conv - BN - ReLU), or conv - BN without ``relu``; the first conv maps ``c_in`` to ``c_out``."""
    layers: list[nn.Module] = []
    for i in range(n):
        layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, kernel_size, padding=kernel_size // 2, bias=False),
                   nn.BatchNorm2d(c_out), *([nn.ReLU(inplace=True)] if relu else [])]
    return nn.Sequential(*layers)


class SegNet(nn.Module):
    """Per-pixel class logits (N, classes, H, W) for images (N, in_channels, H, W).

    ``channels``/``convs``: width and number of convs of each encoder stage (mirrored by the decoder); ``kernel_size``
    of every conv but the 1x1 classifier; ``decoder_relu``: ReLU after the decoder's batch norms (the paper's
    decoders have none); ``input_lrn``: ``nn.LocalResponseNorm`` arguments (size, alpha, beta, k) applied to the
    input, or None; ``init``: ``default`` (PyTorch's), ``xavier`` or ``he`` for the conv kernels.
    """

    def __init__(self, in_channels: int, classes: int, channels: list[int] | tuple[int, ...] = (64, 64, 64, 64),
                 convs: list[int] | tuple[int, ...] = (2, 2, 2, 2), kernel_size: int = 3, decoder_relu: bool = True,
                 input_lrn: dict | None = None, init: str = "default", name: str = "segnet"):
        super().__init__()
        if len(channels) != len(convs):
            raise ValueError(f"channels {list(channels)} and convs {list(convs)} need one entry per stage")
        if init not in INITS:
            raise ValueError(f"init {init!r} is not one of {', '.join(INITS)}")
        self.name = name
        self.input_norm = nn.LocalResponseNorm(**input_lrn) if input_lrn else nn.Identity()
        self.encoders = nn.ModuleList(conv_block(c_in, c_out, n, kernel_size)
                                      for c_in, c_out, n in zip([in_channels, *channels], channels, convs))
        self.decoders = nn.ModuleList(conv_block(c_in, c_out, n, kernel_size, decoder_relu)  # back to stage i-1's width
                                      for c_in, c_out, n in zip(channels, [channels[0], *channels], convs))
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2)
        self.classifier = nn.Conv2d(channels[0], classes, 1)
        init_weights(self, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_norm(x)
        saved = []
        for encoder in self.encoders:
            x = encoder(x)
            size = x.shape[-2:]
            x, indices = self.pool(x)
            saved.append((indices, size))
        for decoder, (indices, size) in zip(reversed(self.decoders), reversed(saved)):
            x = decoder(self.unpool(x, indices, output_size=size))
        return self.classifier(x)
