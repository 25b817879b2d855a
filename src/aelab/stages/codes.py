"""Study codes: which autoencoder's codes make the best features (``dvc repro studies/dvc.yaml``; not part of the
default pipeline, which runs the chosen one).

Each variant (``codes.variants``: name -> overrides, a mapping value replacing a node such as ``model``) is an
autoencoder trained as the pretrain stage trains the default one: the unlabelled training split, ``trainer.max_epochs``,
the best validation checkpoint; ``codes.input_noise`` > 0 makes it a denoising autoencoder. Its codes of all training
and test images are scored by XGBoost (the downstream stage's booster and parameters) and by a linear probe (logistic
regression on standardized codes, the usual measure of a representation), beside PCA with as many components and the
raw pixels (``codes.references``); its test reconstruction MSE too. One MLflow run, a child run per variant.

Outputs: ``reports/codes.md``, ``reports/metrics/codes.json``.
"""

from __future__ import annotations

import logging
import tempfile

import hydra
import lightning as L
import mlflow
import numpy as np
from omegaconf import DictConfig
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from aelab.config import validate
from aelab.data.images import ImageDataModule, load_split, raw_dir, split_indices
from aelab.lit.autoencoder import autoencoder_module, encode
from aelab.lit.trainer import fit_best
from aelab.paths import atomic_path, require, write_json
from aelab.stages import CONF_DIR, output_root, publishes_outputs
from aelab.stages.downstream import fit_and_score
from aelab.sweep import markdown_table, variant_configs
from aelab.tracking import lightning_logger, start_run
from aelab.xgb import xgb_client, xgb_device

log = logging.getLogger(__name__)
TABLE_KEYS = ("features", "n_features", "test_mse", "xgb_accuracy", "probe_accuracy", "train_seconds")


def linear_probe_accuracy(cfg: DictConfig, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                          y_test: np.ndarray) -> float:
    """Test accuracy of a multinomial logistic regression on standardized features."""
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=cfg.codes.probe_max_iter))
    return float(probe.fit(x_train, y_train).score(x_test, y_test))


def score_features(cfg: DictConfig, device: str, client, name: str, x_train, y_train, x_test, y_test) -> dict:
    """XGBoost's and the linear probe's test accuracy (and XGBoost's macro-F1) on one feature set, the same rows
    for both."""
    _, xgb, _ = fit_and_score(cfg, device, client, x_train, y_train, x_test, y_test)
    probe = linear_probe_accuracy(cfg, x_train, y_train, x_test, y_test)
    log.info("%s: XGBoost %.4f, linear probe %.4f", name, xgb["accuracy"], probe)
    return {"features": name, "n_features": int(x_train.shape[1]), "xgb_accuracy": xgb["accuracy"],
            "xgb_macro_f1": xgb["macro_f1"], "probe_accuracy": probe}


def train_variant(name: str, vcfg: DictConfig, images: tuple[np.ndarray, ...], workdir: str, device: str,
                  client) -> dict:
    """Train one variant's autoencoder in a child run; return its row: reconstruction and feature scores."""
    x_train, y_train, x_test, y_test = images
    L.seed_everything(vcfg.seed, workers=True)
    with mlflow.start_run(run_name=name, nested=True, tags={"stage": "codes", "variant": name}) as run:
        mlflow.log_params({"variant": name, "overrides": " ".join(vcfg.codes.variants[name]) or "(none)"})
        data = ImageDataModule(vcfg.data, vcfg.pretrain.batch_size, vcfg.seed)
        module, history, best = fit_best(autoencoder_module(vcfg, vcfg.codes.input_noise), data, vcfg.trainer,
                                         lightning_logger(vcfg, run), f"{workdir}/{name}.ckpt",
                                         keys=("train_loss", "val_loss", "val_mse"))
        codes_train, _ = encode(module, x_train, vcfg.features.batch_size)
        codes_test, test_mse = encode(module, x_test, vcfg.features.batch_size)
        row = {**score_features(vcfg, device, client, name, codes_train, y_train, codes_test, y_test),
               "test_mse": test_mse, "best_val_loss": best, **history.summary(module)}
        mlflow.log_metrics({k: float(v) for k, v in row.items() if isinstance(v, int | float)})
    return row


def reference_rows(cfg: DictConfig, n_components: int, images: tuple[np.ndarray, ...], device: str,
                   client) -> list[dict]:
    """The rows of ``codes.references``: PCA with ``n_components`` (fitted on the autoencoders' training split, with
    its test reconstruction MSE) and the raw pixels."""
    x_train, y_train, x_test, y_test = (a.reshape(len(a), -1) if a.ndim > 1 else a for a in images)
    flat_train, flat_test = x_train.astype(np.float32) / 255, x_test.astype(np.float32) / 255
    rows = []
    if "pca" in cfg.codes.references:
        fit_idx, _ = split_indices(len(flat_train), cfg.data.val_fraction, cfg.seed)
        pca = PCA(n_components=n_components, random_state=cfg.seed).fit(flat_train[fit_idx])
        pca_test = pca.transform(flat_test)
        mse = float(((pca.inverse_transform(pca_test) - flat_test) ** 2).mean())
        rows.append({**score_features(cfg, device, client, f"pca_{n_components}", pca.transform(flat_train), y_train,
                                      pca_test, y_test), "test_mse": mse})
    if "raw" in cfg.codes.references:
        rows.append(score_features(cfg, device, client, "raw", flat_train, y_train, flat_test, y_test))
    return rows


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
@publishes_outputs
def main(cfg: DictConfig) -> list[dict]:
    validate(cfg)
    device = xgb_device(cfg.downstream.device, "downstream.device")  # fails here if it cannot run
    root = output_root()
    manifest = require(raw_dir(cfg.data) / "manifest.json", "download")
    configs = variant_configs(cfg, "codes", {})
    images = (*load_split(cfg.data, "train"), *load_split(cfg.data, "test"))
    rows = []
    with (start_run(cfg, "codes", manifest), tempfile.TemporaryDirectory() as workdir,
          xgb_client(cfg.downstream.engine, cfg.dask) as client):
        for name, vcfg in configs.items():
            rows.append(train_variant(name, vcfg, images, workdir, device, client))
        rows += reference_rows(cfg, rows[0]["n_features"], images, device, client)
        text = markdown_table([{k: row.get(k) for k in TABLE_KEYS} for row in rows])  # None: does not apply
        with atomic_path(root / "reports/codes.md") as tmp:
            tmp.write_text(text)
        write_json(root / "reports/metrics/codes.json", {row["features"]: row for row in rows})
        mlflow.log_text(text, "codes.md")
    print(text)
    return rows


if __name__ == "__main__":
    main()
