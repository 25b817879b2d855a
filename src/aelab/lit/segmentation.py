"""LightningModule for semantic segmentation (SegNet or an smp U-Net): weighted cross-entropy, AdamW or SGD with a
one-cycle or fixed learning rate, and the SegNet paper's measures: global pixel accuracy (G), class-average accuracy
(C), mean and per-class IoU."""

from __future__ import annotations

import hydra
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassJaccardIndex

from aelab.lit.fast import FastModule


def build_model(model_cfg: dict, in_channels: int, classes: int) -> nn.Module:
    """The ``_target_`` model of ``model_cfg`` (its ``name`` key is a label, not an argument)."""
    kwargs = {k: v for k, v in model_cfg.items() if k != "name"}
    return hydra.utils.instantiate(kwargs, in_channels=in_channels, classes=classes)


def segmentation_metrics(num_classes: int, ignore_index: int | None) -> MetricCollection:
    """G (pixel accuracy), C (mean per-class recall) and per-class IoU (NaN for a class in neither truth nor
    prediction); classes absent from the truth do not count in C, nor absent classes in the mean IoU."""
    return MetricCollection({
        "global_acc": MulticlassAccuracy(num_classes, average="micro", ignore_index=ignore_index),
        "class_acc": MulticlassAccuracy(num_classes, average="macro", ignore_index=ignore_index),
        "iou": MulticlassJaccardIndex(num_classes, average="none", ignore_index=ignore_index,
                                      zero_division=float("nan")),
    })


def summarize(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """{"global_acc", "class_acc", "miou"} as floats from a computed ``segmentation_metrics``."""
    return {"global_acc": float(values["global_acc"]), "class_acc": float(values["class_acc"]),
            "miou": float(values["iou"].nanmean())}


class SegmentationModule(FastModule):
    """Trains ``model_cfg`` to label every pixel with one of ``class_names``; ``ignore_index`` pixels are skipped
    by the loss and the metrics. ``class_weights`` (one per class) weight the cross-entropy, whose sum is divided by
    the labelled pixels' summed weights (``loss_normalization="weights"``, PyTorch's mean) or by their number
    (``"pixels"``, Caffe's SegNet loss). ``optimizer`` ``adamw`` or ``sgd`` (with ``momentum``), at ``lr`` fixed
    (``schedule="none"``) or as the peak of a one-cycle schedule over the fit (``"onecycle"``)."""

    cuda_precision = "bf16-mixed"
    cpu_precision = "bf16-mixed"

    def __init__(self, model_cfg: dict, in_channels: int, class_names: list[str], ignore_index: int | None = None,
                 class_weights: list[float] | None = None, lr: float = 1e-3, weight_decay: float = 0.0,
                 optimizer: str = "adamw", momentum: float = 0.9, schedule: str = "onecycle",
                 loss_normalization: str = "weights"):
        super().__init__()
        self.save_hyperparameters()
        n = len(class_names)
        self.model = build_model(model_cfg, in_channels, n)
        self.register_buffer("class_weights", torch.tensor(class_weights) if class_weights else None)
        self.val_metrics = segmentation_metrics(n, ignore_index)
        self.test_metrics = segmentation_metrics(n, ignore_index)
        self.test_confusion = MulticlassConfusionMatrix(n, ignore_index=ignore_index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel class logits (N, classes, H, W)."""
        return self.model(x)

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ignore = -100 if self.hparams.ignore_index is None else self.hparams.ignore_index
        if self.hparams.loss_normalization == "weights":
            return F.cross_entropy(logits.float(), y, weight=self.class_weights, ignore_index=ignore)
        summed = F.cross_entropy(logits.float(), y, weight=self.class_weights, ignore_index=ignore, reduction="sum")
        return summed / (y != ignore).sum().clamp(min=1)

    def train_losses(self, batch) -> dict[str, torch.Tensor]:
        x, y = batch
        loss = self._loss(self.model(x), y)
        return {"loss": loss, "train_loss": loss}

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x)
        self.log("val_loss", self._loss(logits, y), prog_bar=True, sync_dist=True)
        self.val_metrics.update(logits.argmax(1), y)

    def on_validation_epoch_end(self) -> None:
        values = summarize(self.val_metrics.compute())
        self.val_metrics.reset()
        self.log_dict({f"val_{k}": v for k, v in values.items()}, prog_bar=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        pred = self.model(x).argmax(1)
        self.test_metrics.update(pred, y)
        self.test_confusion.update(pred, y)

    def on_test_epoch_end(self) -> None:
        values = self.test_metrics.compute()
        self.test_iou = values["iou"].cpu()
        self.test_confusion_counts = self.test_confusion.compute().cpu()  # over all ranks under DDP
        self.log_dict({f"test_{k}": v for k, v in summarize(values).items()})
        self.test_metrics.reset()

    def configure_optimizers(self):
        h = self.hparams
        opt = self.make_optimizer(h.optimizer, lr=h.lr, weight_decay=h.weight_decay,
                                  **({"momentum": h.momentum} if h.optimizer == "sgd" else {}))
        if h.schedule == "none":
            return opt
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=h.lr,
                                                    total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
