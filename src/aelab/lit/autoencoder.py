"""LightningModule for autoencoders: reconstruction loss + penalties, the configured optimizer and LR schedule."""

from __future__ import annotations

import hydra
import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics
from omegaconf import OmegaConf

from aelab.data.images import to_tensor
from aelab.lit.fast import DEFAULT_OPTIM, FastModule
from aelab.models.penalties import activity_l1, kl_sparsity, weight_l1

DEFAULT_PENALTY = {"l1_weight": 0.0, "activity_l1": 0.0, "sparsity_kl": 0.0, "sparsity_target": 0.05}


class AutoencoderModule(FastModule):
    """Trains the model described by ``model_cfg`` (a Hydra ``_target_`` dict) to reproduce its input.

    The model outputs logits; ``sigmoid(logits)`` is the reconstruction in [0, 1]. ``loss="bce"`` is binary
    cross-entropy on the logits, ``loss="mse"`` the squared error of the reconstruction, and ``loss="mse_linear"``
    the squared error of the raw output (for standardized tables, whose values are not in [0, 1]). ``penalty`` adds L1 on
    the weights, L1 on the code activity and a KL sparsity term toward ``sparsity_target``; L2 is the optimizer's
    ``weight_decay``. Whatever the loss, the per-pixel MSE is tracked as ``val_mse`` / ``test_mse``.
    ``input_noise`` > 0 trains a denoising autoencoder: in training, that fraction of the input's pixels is set to
    zero (the lecture's zero-mask noise) and the clean input is the target; validation and test stay clean.
    """

    def __init__(self, model_cfg: dict, loss: str = "bce", optim: dict | None = None, penalty: dict | None = None,
                 input_noise: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        self.optim = {**DEFAULT_OPTIM, **(optim or {})}
        self.penalty = {**DEFAULT_PENALTY, **(penalty or {})}
        self.model = hydra.utils.instantiate(model_cfg)
        self.val_mse = torchmetrics.MeanSquaredError()
        self.test_mse = torchmetrics.MeanSquaredError()

    def output(self, logits: torch.Tensor) -> torch.Tensor:
        """The reconstruction from the model's raw output: sigmoid, except for ``mse_linear``."""
        return logits.float() if self.hparams.loss == "mse_linear" else torch.sigmoid(logits.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of ``x``."""
        return self.output(self.model(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x)

    def reconstruction_loss(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.loss == "bce":
            return F.binary_cross_entropy_with_logits(logits.float(), x)
        return F.mse_loss(self.output(logits), x)

    def penalty_loss(self, code: torch.Tensor) -> torch.Tensor:
        """The configured penalties for one batch's ``code`` (0 when all weights are 0)."""
        p, total = self.penalty, code.new_zeros(())
        if p["l1_weight"]:
            total = total + p["l1_weight"] * weight_l1(self.model)
        if p["activity_l1"]:
            total = total + p["activity_l1"] * activity_l1(code)
        if p["sparsity_kl"]:
            total = total + p["sparsity_kl"] * kl_sparsity(code.float(), p["sparsity_target"])
        return total

    def losses(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction loss, penalty) of one batch; training minimises their sum."""
        noise = self.hparams.input_noise
        code = self.model.encode(x.masked_fill(torch.rand_like(x) < noise, 0.0) if noise and self.training else x)
        return self.reconstruction_loss(self.model.decoder(code), x), self.penalty_loss(code)

    def search_loss(self, x: torch.Tensor) -> torch.Tensor:
        """What the recipe's searches (aelab.search) score: reconstruction + penalties in train mode, the
        reconstruction loss in eval mode."""
        if not self.training:
            return self.reconstruction_loss(self.model(x), x)
        recon, penalty = self.losses(x)
        return recon + penalty

    def train_losses(self, batch) -> dict[str, torch.Tensor]:
        """The minimised sum, the reconstruction loss (``train_loss``) and, when configured, the penalty."""
        recon, penalty = self.losses(batch[0])
        out = {"loss": recon + penalty, "train_loss": recon}
        if penalty.requires_grad:
            out["train_penalty"] = penalty
        return out

    def _eval_step(self, batch, prefix: str, mse: torchmetrics.MeanSquaredError) -> None:
        x = batch[0]
        logits = self.model(x)
        self.log(f"{prefix}_loss", self.reconstruction_loss(logits, x), prog_bar=True, sync_dist=True)
        mse(self.output(logits).flatten(), x.flatten())
        self.log(f"{prefix}_mse", mse)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val", self.val_mse)

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test", self.test_mse)

    def configure_optimizers(self):
        return self.optimizers_from(self.optim)


def autoencoder_module(cfg, input_noise: float = 0.0) -> AutoencoderModule:
    """The module for the composed config's ``model`` and ``pretrain`` sections (denoising with ``input_noise``)."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    return AutoencoderModule(plain["model"], plain["pretrain"]["loss"], plain["pretrain"]["optim"],
                             plain["pretrain"]["penalty"], input_noise)


@torch.inference_mode()
def encode(module: AutoencoderModule, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, float]:
    """Codes of ``images`` (uint8 N×28×28) and the mean per-pixel squared reconstruction error."""
    codes, sq_err = [], 0.0
    for start in range(0, len(images), batch_size):
        x = to_tensor(images[start:start + batch_size]).to(module.device)
        code = module.encode(x)
        codes.append(code.float().cpu().numpy())
        sq_err += float(((module.output(module.model.decoder(code)) - x) ** 2).sum())
    return np.concatenate(codes), sq_err / images.size
