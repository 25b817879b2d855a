"""LightningModule for the MLP classifier: softmax cross-entropy (+ L1 on the weights), the configured optimizer,
max-norm after every step, accuracy tracked with torchmetrics."""

from __future__ import annotations

import hydra
import torch
import torch.nn.functional as F
import torchmetrics
from omegaconf import OmegaConf

from aelab.lit.fast import DEFAULT_OPTIM, FastModule
from aelab.models.classifier import apply_max_norm
from aelab.models.penalties import weight_l1


class ClassifierModule(FastModule):
    """Trains the classifier of ``model_cfg`` (a Hydra ``_target_`` dict) on (image, label) batches.

    The loss is the mean cross-entropy of the logits (``train_loss``, ``val_loss``, ``test_loss``); ``l1_weight``
    adds lasso on the weights to the minimised loss; L2 is the optimizer's ``weight_decay``. Accuracy is logged as
    ``train_acc`` (of the training batches, dropout on), ``val_acc`` and ``test_acc``.
    """

    def __init__(self, model_cfg: dict, optim: dict | None = None, l1_weight: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        self.optim = {**DEFAULT_OPTIM, **(optim or {})}
        self.model = hydra.utils.instantiate(model_cfg)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=self.model.n_classes)
        self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=self.model.n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of ``x``."""
        return self.model(x)

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cross-entropy, penalty, logits) of one batch; training minimises cross-entropy + penalty."""
        logits = self.model(x).float()
        l1 = self.hparams.l1_weight
        penalty = l1 * weight_l1(self.model) if l1 else logits.new_zeros(())
        return F.cross_entropy(logits, y), penalty, logits

    def search_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """What the recipe's searches (aelab.search) score: the minimised loss in train mode, the cross-entropy in
        eval mode."""
        ce, penalty, _ = self.losses(x, y)
        return ce + penalty if self.training else ce

    def train_losses(self, batch) -> dict[str, torch.Tensor]:
        x, y = batch
        ce, penalty, logits = self.losses(x, y)
        out = {"loss": ce + penalty, "train_loss": ce, "train_acc": (logits.argmax(1) == y).float().mean()}
        if penalty.requires_grad:
            out["train_penalty"] = penalty
        return out

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        apply_max_norm(self.model)

    def _eval_step(self, batch, prefix: str, accuracy: torchmetrics.Accuracy) -> None:
        x, y = batch
        logits = self.model(x).float()
        self.log(f"{prefix}_loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        accuracy(logits, y)
        self.log(f"{prefix}_acc", accuracy, prog_bar=prefix == "val")

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test", self.test_acc)

    def configure_optimizers(self):
        return self.optimizers_from(self.optim)


def classifier_module(cfg) -> ClassifierModule:
    """The module for the composed config's ``classify`` section."""
    c = OmegaConf.to_container(cfg.classify, resolve=True)
    return ClassifierModule(c["model"], c["optim"], c["l1_weight"])


@torch.inference_mode()
def accuracy_and_loss(module: ClassifierModule, x: torch.Tensor, y: torch.Tensor,
                      batch_size: int = 2048) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``module`` (in eval mode) on images ``x`` and labels ``y``."""
    was_training = module.training
    module.eval()
    correct, total_ce = 0, 0.0
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size].to(module.device)
        yb = y[start:start + batch_size].to(module.device)
        logits = module(xb).float()
        correct += int((logits.argmax(1) == yb).sum())
        total_ce += float(F.cross_entropy(logits, yb, reduction="sum"))
    module.train(was_training)
    return correct / len(x), total_ce / len(x)
