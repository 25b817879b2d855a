"""Regularization terms added to a reconstruction loss, and measures of how sparse a code is."""

from __future__ import annotations

import torch
from torch import nn


def weight_l1(model: nn.Module) -> torch.Tensor:
    """Lasso: sum of |w| over every weight matrix/kernel (biases and norm scales excluded)."""
    return sum(p.abs().sum() for p in model.parameters() if p.ndim > 1)


def activity_l1(code: torch.Tensor) -> torch.Tensor:
    """L1 activity penalty (Keras ``activity_regularizer=l1``): sum of |code| per sample, batch mean."""
    return code.abs().flatten(1).sum(1).mean()


def kl_sparsity(code: torch.Tensor, rho: float, eps: float = 1e-6) -> torch.Tensor:
    """sum_j KL(rho || rho_hat_j), rho_hat_j = mean activation of unit j over the batch (codes in (0, 1))."""
    rho_hat = code.flatten(1).mean(0).clamp(eps, 1 - eps)
    return (rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))).sum()


def code_sparsity(codes: torch.Tensor, threshold: float = 0.01) -> dict[str, float]:
    """Mean activation, mean |activation| and the fraction of activations with |a| < threshold."""
    codes = codes.float()
    return {"mean_activation": float(codes.mean()), "mean_abs_activation": float(codes.abs().mean()),
            "frac_near_zero": float((codes.abs() < threshold).float().mean())}
