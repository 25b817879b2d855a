"""LightningModule for image-to-image networks (denoising, colorization): input batch -> target batch."""

from __future__ import annotations

import hydra
import torch
import torch.nn.functional as F

from aelab.lit.fast import FastModule

LOSSES = {"mse": F.mse_loss, "l1": F.l1_loss}


class ImageToImageModule(FastModule):
    """Trains the network ``model_cfg`` describes (a Hydra ``_target_`` dict) on (input, target) batches.

    The network's output is already in the target's range (sigmoid for images, tanh for chroma); ``loss`` is
    ``mse`` or ``l1`` between output and target. Adam with a cosine learning-rate decay over the run.
    """

    cpu_precision = "bf16-mixed"

    def __init__(self, model_cfg: dict, loss: str = "mse", lr: float = 1e-3, weight_decay: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        self.model = hydra.utils.instantiate(model_cfg)
        self.loss_fn = LOSSES[loss]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def train_losses(self, batch) -> dict[str, torch.Tensor]:
        x, y = batch
        loss = self.loss_fn(self(x).float(), y)
        return {"loss": loss, "train_loss": loss}

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", self.loss_fn(self(x).float(), y), prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        opt = self.make_optimizer("adam", lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(self.trainer.max_epochs, 1))
        return {"optimizer": opt, "lr_scheduler": sched}
