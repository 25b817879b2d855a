"""The lecture's supervised network: an MLP classifier with the regularization knobs of the autoencoders.

``hidden`` widths of ReLU units, softmax output (the module outputs logits; cross-entropy is the loss). The knobs are
the autoencoders' (``dropout_input``, ``dropout_hidden``, ``norm``, ``init``; see aelab.models.autoencoders) plus
``max_norm``: the dropout paper's constraint that every hidden unit's incoming weight vector has an L2 norm of at
most ``max_norm``, applied after each optimizer step by :func:`apply_max_norm`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from aelab.models.autoencoders import hidden_block, init_weights


class MLPClassifier(nn.Module):
    """input -> hidden... -> n_classes logits, fully connected. ``code_norm=False`` leaves batch norm out of the
    last hidden layer, as an autoencoder's code layer has none (the shape :meth:`load_encoder` needs)."""

    def __init__(self, hidden: list[int] | tuple[int, ...] = (1024, 1024), n_classes: int = 10, name: str = "mlp",
                 input_shape: list[int] | tuple[int, ...] = (1, 28, 28), dropout_input: float = 0.0,
                 dropout_hidden: float = 0.0, norm: str = "none", init: str = "he", max_norm: float | None = None,
                 code_norm: bool = True):
        super().__init__()
        self.name, self.max_norm, self.n_classes = name, max_norm, n_classes
        widths = [math.prod(input_shape), *hidden]
        layers: list[nn.Module] = [nn.Flatten(), *([nn.Dropout(dropout_input)] if dropout_input > 0 else [])]
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            last = i == len(hidden) - 1
            layers += hidden_block(nn.Linear(a, b), b, norm if code_norm or not last else "none", dropout_hidden)
        self.net = nn.Sequential(*layers, nn.Linear(widths[-1], n_classes))
        init_weights(self, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def load_encoder(self, encoder: nn.Sequential, freeze: bool = False) -> None:
        """Initialize the first layers from an autoencoder's ``encoder`` (the same layers: hidden widths = its hidden
        widths and code, its code layer the last hidden layer, the same norm, ``code_norm=False`` and a ReLU code);
        ``freeze`` takes their weights out of training (linear evaluation: only the softmax head learns)."""
        first = self.net[:len(encoder)]
        if [type(m) for m in first] != [type(m) for m in encoder]:
            raise ValueError(f"the classifier's first layers {[type(m).__name__ for m in first]} are not the "
                             f"encoder's {[type(m).__name__ for m in encoder]}")
        try:
            first.load_state_dict(encoder.state_dict())
        except RuntimeError as err:
            raise ValueError(f"the classifier's first layers do not match the encoder's: {err}") from None
        first.requires_grad_(not freeze)

    def hidden_layers(self) -> list[nn.Linear]:
        """The Linear layers that feed hidden units (all but the output layer)."""
        return [m for m in self.net if isinstance(m, nn.Linear)][:-1]


@torch.no_grad()
def max_norm_(weight: torch.Tensor, bound: float) -> None:
    """Rescale, in place, every row (last dimension: one unit's incoming weights) of ``weight`` whose L2 norm is
    above ``bound`` to norm ``bound``. Leading dimensions are kept: (units, inputs), or stacked candidates'
    (candidates, units, inputs)."""
    weight.copy_(torch.renorm(weight.flatten(0, -2), p=2, dim=0, maxnorm=bound).view_as(weight))


def apply_max_norm(model: nn.Module) -> None:
    """Bound each hidden unit's incoming weights (a row of its Linear weight) by ``model.max_norm``; nothing for a
    model without a ``max_norm`` or with None."""
    if getattr(model, "max_norm", None) is None:
        return
    for layer in model.hidden_layers():
        max_norm_(layer.weight, model.max_norm)
