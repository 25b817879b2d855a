"""LightningModule for autoencoders: reconstruction loss (BCE with logits or MSE), Adam, test MSE."""

from __future__ import annotations

import hydra
import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics


class AutoencoderModule(L.LightningModule):
    """Trains the model described by ``model_cfg`` (a Hydra ``_target_`` dict) to reproduce its input.

    The model outputs logits; ``sigmoid(logits)`` is the reconstruction in [0, 1]. ``loss="bce"`` is binary
    cross-entropy on the logits, ``loss="mse"`` the squared error of the reconstruction. Whatever the loss, the
    per-pixel MSE is tracked as ``val_mse`` / ``test_mse`` so models (and PCA) compare on one scale.
    """

    def __init__(self, model_cfg: dict, loss: str = "bce", lr: float = 1e-3, weight_decay: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        self.model = hydra.utils.instantiate(model_cfg)
        self.val_mse = torchmetrics.MeanSquaredError()
        self.test_mse = torchmetrics.MeanSquaredError()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction in [0, 1]."""
        return torch.sigmoid(self.model(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x)

    def _loss(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.loss == "bce":
            return F.binary_cross_entropy_with_logits(logits.float(), x)
        return F.mse_loss(torch.sigmoid(logits.float()), x)

    def training_step(self, batch, batch_idx):
        x, _ = batch
        loss = self._loss(self.model(x), x)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def _eval_step(self, batch, prefix: str, mse: torchmetrics.MeanSquaredError) -> None:
        x, _ = batch
        logits = self.model(x)
        self.log(f"{prefix}_loss", self._loss(logits, x), prog_bar=True)
        mse(torch.sigmoid(logits.float()).flatten(), x.flatten())
        self.log(f"{prefix}_mse", mse)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val", self.val_mse)

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test", self.test_mse)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
