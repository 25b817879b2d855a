"""Autoencoders with the lecture's regularization knobs. Each has ``encode`` (input -> code) and ``forward``
(input -> logits of the reconstruction).

Knobs shared by both architectures:
- ``dropout_input`` / ``dropout_hidden``: dropout on the input and after every hidden layer (lecture: 10% / 50%);
- ``norm``: ``none``, ``bn_pre`` (batch norm after the linear summation, before the ReLU) or ``bn_post`` (after
  the ReLU) on every hidden layer;
- ``init``: ``default`` (PyTorch's), ``xavier`` or ``he`` for every weight matrix/kernel, zero biases;
- ``code_activation``: ``relu`` (Keras-blog default), ``sigmoid`` (codes in (0, 1), needed for a KL sparsity
  target) or ``linear``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

NORMS = ("none", "bn_pre", "bn_post")
INITS = ("default", "xavier", "he")
CODE_ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "linear": nn.Identity}


def hidden_block(layer: nn.Module, width: int, norm: str, dropout: float, conv: bool = False) -> list[nn.Module]:
    """``layer`` followed by ReLU, batch norm before or after it (``norm``) and dropout."""
    bn = (nn.BatchNorm2d if conv else nn.BatchNorm1d)(width)
    block = {"bn_pre": [layer, bn, nn.ReLU()], "bn_post": [layer, nn.ReLU(), bn]}.get(norm, [layer, nn.ReLU()])
    return block + ([nn.Dropout(dropout)] if dropout > 0 else [])


def init_weights(module: nn.Module, scheme: str) -> None:
    """Xavier (Glorot) or He (Kaiming) uniform init of every Linear/Conv weight, zero biases (if any); ``default`` keeps
    PyTorch's."""
    if scheme == "default":
        return
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            if scheme == "xavier":
                nn.init.xavier_uniform_(m.weight)
            else:
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class _Autoencoder(nn.Module):
    encoder: nn.Module
    decoder: nn.Module

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class DenseAutoencoder(_Autoencoder):
    """input -> hidden... -> code_dim -> reversed(hidden)... -> input, fully connected, logit output.

    ``input_shape`` is (1, 28, 28) for the images or (n_features,) for a table; ``code_dim`` larger than the
    input makes an over-complete autoencoder (useful only with a sparsity penalty or noise).
    """

    def __init__(self, code_dim: int = 32, hidden: list[int] | tuple[int, ...] = (), name: str = "dense",
                 input_shape: list[int] | tuple[int, ...] = (1, 28, 28), dropout_input: float = 0.0,
                 dropout_hidden: float = 0.0, norm: str = "none", init: str = "default", code_activation: str = "relu"):
        super().__init__()
        self.name, self.code_dim = name, code_dim
        hidden, n_in = list(hidden), math.prod(input_shape)
        widths = [n_in, *hidden]
        enc: list[nn.Module] = [nn.Flatten(), nn.Dropout(dropout_input)] if dropout_input > 0 else [nn.Flatten()]
        for a, b in zip(widths, widths[1:]):
            enc += hidden_block(nn.Linear(a, b), b, norm, dropout_hidden)
        self.encoder = nn.Sequential(*enc, nn.Linear(widths[-1], code_dim), CODE_ACTIVATIONS[code_activation]())
        dec: list[nn.Module] = []
        for a, b in zip([code_dim, *hidden[::-1]], hidden[::-1]):
            dec += hidden_block(nn.Linear(a, b), b, norm, dropout_hidden)
        self.decoder = nn.Sequential(*dec, nn.Linear(hidden[0] if hidden else code_dim, n_in),
                                     nn.Unflatten(1, tuple(input_shape)))
        init_weights(self, init)


class ConvAutoencoder(_Autoencoder):
    """Two stride-2 convs (28 -> 14 -> 7), a dense code, and the mirror image with transposed convs."""

    def __init__(self, code_dim: int = 32, channels: list[int] | tuple[int, int] = (16, 32), name: str = "conv",
                 dropout_input: float = 0.0, dropout_hidden: float = 0.0, norm: str = "none", init: str = "default",
                 code_activation: str = "relu"):
        super().__init__()
        self.name, self.code_dim = name, code_dim
        c1, c2 = channels
        self.encoder = nn.Sequential(
            *([nn.Dropout(dropout_input)] if dropout_input > 0 else []),
            *hidden_block(nn.Conv2d(1, c1, 3, stride=2, padding=1), c1, norm, dropout_hidden, conv=True),
            *hidden_block(nn.Conv2d(c1, c2, 3, stride=2, padding=1), c2, norm, dropout_hidden, conv=True),
            nn.Flatten(), nn.Linear(c2 * 7 * 7, code_dim), CODE_ACTIVATIONS[code_activation](),
        )
        self.decoder = nn.Sequential(
            *hidden_block(nn.Linear(code_dim, c2 * 7 * 7), c2 * 7 * 7, norm, dropout_hidden), nn.Unflatten(1, (c2, 7, 7)),
            *hidden_block(nn.ConvTranspose2d(c2, c1, 3, stride=2, padding=1, output_padding=1), c1, norm,
                          dropout_hidden, conv=True),
            nn.ConvTranspose2d(c1, 1, 3, stride=2, padding=1, output_padding=1),
        )
        init_weights(self, init)
