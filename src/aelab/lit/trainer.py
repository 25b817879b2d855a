"""The Lightning Trainer as the config describes it, and a callback that keeps per-epoch metrics."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar

from aelab.lit.fast import FastPath
from aelab.paths import atomic_path


PROGRESS_EVERY = 10  # batches between progress-bar redraws (a redraw per step costs the GPU its lead)


def train_device(trainer_cfg) -> torch.device:
    """The device a Trainer built from ``trainer_cfg`` trains on: the GPU when there is one and the config allows
    it, the CPU otherwise (for the stages and helpers that run their own loops or inference)."""
    on_cuda = torch.cuda.is_available() and trainer_cfg.accelerator in ("auto", "gpu", "cuda")
    return torch.device("cuda" if on_cuda else "cpu")


def resolve_precision(trainer_cfg, module: L.LightningModule | None = None) -> str:
    """``auto`` means the module's ``cuda_precision`` (measured per model; bf16-mixed when it has none) when
    training on CUDA, 32-true otherwise."""
    if trainer_cfg.precision != "auto":
        return trainer_cfg.precision
    if train_device(trainer_cfg).type != "cuda":
        return "32-true"
    return getattr(module, "cuda_precision", "bf16-mixed")


def build_trainer(trainer_cfg, module: L.LightningModule, logger, callbacks: list[Callback] = ()) -> L.Trainer:
    """A Trainer for ``module`` on the best available device, with the fast path of ``trainer.fast``; checkpoints
    are the caller's ``ModelCheckpoint``."""
    on_cuda = train_device(trainer_cfg).type == "cuda"
    if on_cuda:
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for 32-true on tensor cores
    return L.Trainer(
        max_epochs=trainer_cfg.max_epochs,
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        precision=resolve_precision(trainer_cfg, module),
        limit_train_batches=trainer_cfg.limit_train_batches,
        enable_progress_bar=trainer_cfg.enable_progress_bar,
        logger=logger,
        callbacks=[FastPath(trainer_cfg.fast), *callbacks,
                   *([TQDMProgressBar(refresh_rate=PROGRESS_EVERY)] if trainer_cfg.enable_progress_bar else [])],
        default_root_dir=None,
        log_every_n_steps=10,
        deterministic=False,
        benchmark=on_cuda,  # batch shapes are fixed: let cuDNN pick its fastest convolutions once
    )


def score_test_split(module: L.LightningModule, datamodule: L.LightningDataModule, trainer_cfg, logger=False) -> dict:
    """``module``'s test-step metrics on ``datamodule``'s test split."""
    return build_trainer(trainer_cfg, module, logger).test(module, datamodule=datamodule, verbose=False)[0]


class EpochHistory(Callback):
    """Collects ``keys`` from the logged metrics and the epoch's wall time at the end of each training epoch, and
    the wall time of the whole fit."""

    def __init__(self, keys: tuple[str, ...] = ("train_loss", "val_loss", "val_mse")):
        self.keys = keys
        self.rows: list[dict[str, float]] = []
        self.fit_seconds = 0.0
        self._start = self._fit_start = 0.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.fit_seconds = time.perf_counter() - self._fit_start

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch, "epoch_seconds": round(time.perf_counter() - self._start, 3)}
        row.update({k: round(float(metrics[k]), 6) for k in self.keys if k in metrics})
        self.rows.append(row)

    def summary(self, module: L.LightningModule) -> dict:
        """Epochs, training wall time, mean epoch time and ``module``'s parameter count, for a stage's metrics."""
        return {"epochs": len(self.rows), "train_seconds": round(self.fit_seconds, 1),
                "mean_epoch_seconds": round(sum(r["epoch_seconds"] for r in self.rows) / len(self.rows), 2),
                "n_params": sum(t.numel() for t in module.parameters())}


def fit_best(module: L.LightningModule, datamodule: L.LightningDataModule, trainer_cfg, logger, ckpt: Path | str,
             keys: tuple[str, ...] = ("train_loss", "val_loss"), monitor: str = "val_loss",
             mode: str = "min") -> tuple[L.LightningModule, EpochHistory, float]:
    """Fit ``module``; keep the checkpoint with the lowest ``val_loss`` (or the ``mode`` of ``monitor``) at ``ckpt``
    (nothing else is left behind).

    Returns that checkpoint reloaded in eval mode (on the GPU if there is one), the per-epoch history of ``keys``
    and the best monitored value.
    """
    with tempfile.TemporaryDirectory(prefix="aelab-fit-") as tmp:  # not in the stage's outputs: a kill leaves none
        best = ModelCheckpoint(dirpath=tmp, filename="best", monitor=monitor, mode=mode, save_top_k=1)
        history = EpochHistory(keys)
        build_trainer(trainer_cfg, module, logger, [best, history]).fit(module, datamodule=datamodule)
        with atomic_path(ckpt) as part:
            shutil.copyfile(best.best_model_path, part)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return (type(module).load_from_checkpoint(ckpt, map_location=device).eval(), history,
            float(best.best_model_score))
