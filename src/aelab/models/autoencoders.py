"""Autoencoders for 1x28x28 images. Each has ``encode`` (image -> code) and ``forward`` (image -> logits)."""

from __future__ import annotations

import torch
from torch import nn

IMAGE_SHAPE = (1, 28, 28)
N_PIXELS = 28 * 28


def _dense_stack(sizes: list[int], last_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if last_activation or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DenseAutoencoder(nn.Module):
    """784 -> hidden... -> code_dim -> reversed(hidden)... -> 784 with ReLU codes and a logit output."""

    def __init__(self, code_dim: int = 32, hidden: list[int] | tuple[int, ...] = (), name: str = "dense"):
        super().__init__()
        self.name = name
        self.code_dim = code_dim
        sizes = [N_PIXELS, *hidden, code_dim]
        self.encoder = nn.Sequential(nn.Flatten(), _dense_stack(sizes, last_activation=True))
        self.decoder = nn.Sequential(_dense_stack(sizes[::-1], last_activation=False), nn.Unflatten(1, IMAGE_SHAPE))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class ConvAutoencoder(nn.Module):
    """Two stride-2 convs (28 -> 14 -> 7), a dense code, and the mirror image with transposed convs."""

    def __init__(self, code_dim: int = 32, channels: list[int] | tuple[int, int] = (16, 32), name: str = "conv"):
        super().__init__()
        self.name = name
        self.code_dim = code_dim
        c1, c2 = channels
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c1, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(c2 * 7 * 7, code_dim), nn.ReLU(),
        )
        self.decoder = nn.Sequential(
            nn.Linear(code_dim, c2 * 7 * 7), nn.ReLU(), nn.Unflatten(1, (c2, 7, 7)),
            nn.ConvTranspose2d(c2, c1, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
            nn.ConvTranspose2d(c1, 1, 3, stride=2, padding=1, output_padding=1),
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))
