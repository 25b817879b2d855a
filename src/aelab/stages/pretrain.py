"""Stage pretrain: train the configured autoencoder on the training split; keep the best checkpoint.

Outputs: ``models/pretrain/ae.ckpt``, ``reports/metrics/pretrain.json``, ``reports/plots/pretrain_loss.csv``,
``reports/figures/pretrain_recon.png``; one MLflow run with per-epoch losses, the grid and the checkpoint.
"""

from __future__ import annotations

import csv
import logging
import os
import tempfile

import hydra
import lightning as L
import mlflow
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig, OmegaConf

from aelab.config import validate
from aelab.data.images import ImageDataModule, raw_dir
from aelab.figures import image_rows
from aelab.lit.autoencoder import AutoencoderModule, autoencoder_module
from aelab.lit.trainer import EpochHistory, build_trainer
from aelab.paths import atomic_path, require, write_json
from aelab.stages import CONF_DIR, output_root
from aelab.tracking import start_run, tracking_uri

log = logging.getLogger(__name__)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    validate(cfg)
    root = output_root()
    manifest = require(raw_dir(cfg.data) / "manifest.json", "download")
    L.seed_everything(cfg.seed, workers=True)
    data = ImageDataModule(cfg.data, cfg.pretrain.batch_size, cfg.seed)
    module = autoencoder_module(cfg)
    out_dir = root / cfg.pretrain.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)

    with start_run(cfg, "pretrain", manifest) as run, tempfile.TemporaryDirectory(dir=out_dir) as ckpt_dir:
        logger = MLFlowLogger(experiment_name=cfg.mlflow.experiment, tracking_uri=tracking_uri(cfg),
                              run_id=run.info.run_id)
        best = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val_loss", mode="min", save_top_k=1)
        history = EpochHistory()
        trainer = build_trainer(cfg.trainer, logger, [best, history])
        trainer.fit(module, datamodule=data)

        module = AutoencoderModule.load_from_checkpoint(best.best_model_path)
        test = trainer.test(module, datamodule=data, verbose=False)[0]
        best_row = min(history.rows, key=lambda row: row.get("val_loss", float("inf")))
        metrics = {"best_epoch": best_row["epoch"], "best_val_loss": float(best.best_model_score),
                   "test_loss": test["test_loss"], "test_mse": test["test_mse"], "epochs": trainer.current_epoch,
                   "mean_epoch_seconds": round(sum(r["epoch_seconds"] for r in history.rows) / len(history.rows), 3),
                   "n_params": sum(p.numel() for p in module.parameters())}
        mlflow.log_metrics({k: v for k, v in metrics.items() if k != "epochs"})
        log.info("pretrain %s: %s", cfg.model.name, metrics)

        x = next(iter(data.test_dataloader()))[0][:16].to(module.device)
        grid = image_rows(root / "reports/figures/pretrain_recon.png",
                          {"original": x, f"{cfg.model.name} AE": module(x)})
        _write_history(root / "reports/plots/pretrain_loss.csv", history.rows)
        write_json(root / "reports/metrics/pretrain.json", metrics)
        ckpt = out_dir / "ae.ckpt"
        os.replace(best.best_model_path, ckpt)
        for path in (grid, ckpt, root / "reports/plots/pretrain_loss.csv"):
            mlflow.log_artifact(str(path))
    return metrics


def _write_history(path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
