"""Stage pretrain: train the configured autoencoder on the training split; keep the best checkpoint.

Outputs: ``models/pretrain/ae.ckpt``, ``reports/metrics/pretrain.json``, ``reports/plots/pretrain_loss.csv``,
``reports/figures/pretrain_recon.png``; one MLflow run with per-epoch losses, the grid and the checkpoint.
"""

from __future__ import annotations

import logging

import hydra
import lightning as L
import mlflow
import numpy as np
import torch
from omegaconf import DictConfig

from aelab.config import validate
from aelab.data.images import ImageDataModule, raw_dir
from aelab.distributed import leave_process_group
from aelab.figures import image_rows
from aelab.lit.autoencoder import autoencoder_module
from aelab.lit.trainer import fit_best, resolve_precision, resume_folder, score_test_split
from aelab.paths import require, write_csv, write_json
from aelab.pyfunc import AutoencoderModel, log_network, uses_channels_last
from aelab.stages import CONF_DIR, output_root, publishes_outputs
from aelab.tracking import lightning_logger, start_run

log = logging.getLogger(__name__)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
@publishes_outputs
def main(cfg: DictConfig) -> dict:
    validate(cfg)
    root = output_root()
    manifest = require(raw_dir(cfg.data) / "manifest.json", "download")
    L.seed_everything(cfg.seed, workers=True)
    data = ImageDataModule(cfg.data, cfg.pretrain.batch_size, cfg.seed)
    module = autoencoder_module(cfg)
    ckpt = root / cfg.pretrain.out_dir / "ae.ckpt"

    with start_run(cfg, "pretrain", manifest) as run:
        logger = lightning_logger(cfg, run)
        module, history, best_val = fit_best(module, data, cfg.trainer, logger, ckpt,
                                             keys=("train_loss", "val_loss", "val_mse"),
                                             resume=resume_folder(cfg, "pretrain"))
        test = score_test_split(module, data, cfg.trainer, logger)
        if not leave_process_group():
            return {}  # another DDP rank: its share of the fit and test is done; rank 0 writes the outputs
        rows = history.rows
        metrics = {"best_epoch": min(rows, key=lambda row: row["val_loss"])["epoch"], "best_val_loss": best_val,
                   "test_loss": test["test_loss"], "test_mse": test["test_mse"], **history.summary(module)}
        mlflow.log_metrics({k: v for k, v in metrics.items() if k != "epochs"})
        log.info("pretrain %s: %s", cfg.model.name, metrics)

        x = next(iter(data.test_dataloader()))[0][:16].to(module.device)
        grid = image_rows(root / "reports/figures/pretrain_recon.png",
                          {"original": x, f"{cfg.model.name} AE": module(x)})
        write_csv(root / "reports/plots/pretrain_loss.csv", rows)
        write_json(root / "reports/metrics/pretrain.json", metrics)
        for path in (grid, ckpt, root / "reports/plots/pretrain_loss.csv"):
            mlflow.log_artifact(str(path))
        test_images = torch.cat([batch[0] for batch in data.test_dataloader()]).cpu().numpy()
        model = AutoencoderModel(resolve_precision(cfg.trainer, module), uses_channels_last(module)).load(ckpt)
        model.reference = np.percentile(model.predict(None, test_images, {"output": "error"}), np.arange(101))
        log_network("autoencoder", model, ckpt, test_images[:4],
                    {k: metrics[k] for k in ("test_loss", "test_mse")}, params={"output": "code"})
    return metrics


if __name__ == "__main__":
    main()
