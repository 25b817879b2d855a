"""Stage features: encode train and test with the trained encoder; PCA with as many components as the baseline.

Outputs: ``data/features/{ae,pca}.npz`` (train, test, y_train, y_test), ``reports/metrics/features.json`` (test
reconstruction MSE of AE and PCA side by side), ``reports/figures/features_recon.png`` (original / AE / PCA),
``reports/figures/latent_map.png`` (2-D maps of a fixed-seed test subsample coloured by class: PCA-2 and t-SNE of the
AE codes next to PCA-2 of the pixels).
"""

from __future__ import annotations

import logging

import hydra
import mlflow
import numpy as np
import torch
from omegaconf import DictConfig
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

from aelab import figures
from aelab.config import validate
from aelab.data.catalog import get_spec
from aelab.data.images import load_split, raw_dir, split_indices, to_tensor
from aelab.figures import image_rows
from aelab.lit.autoencoder import AutoencoderModule, encode
from aelab.lit.trainer import train_device
from aelab.paths import atomic_path, require, write_json
from aelab.stages import CONF_DIR, output_root, publishes_outputs
from aelab.tracking import start_run

log = logging.getLogger(__name__)

LATENT_MAP_SAMPLES = 2000  # test images in the latent map (t-SNE of 2,000 points: a few seconds on two cores)


def save_features(path, train: np.ndarray, test: np.ndarray, y_train: np.ndarray, y_test: np.ndarray) -> None:
    """One feature set as an .npz with the arrays the downstream stage reads."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, train=train, test=test, y_train=y_train, y_test=y_test)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
@publishes_outputs
def main(cfg: DictConfig) -> dict:
    validate(cfg)
    root = output_root()
    manifest = require(raw_dir(cfg.data) / "manifest.json", "download")
    ckpt = require(f"{cfg.pretrain.out_dir}/ae.ckpt", "pretrain")
    module = AutoencoderModule.load_from_checkpoint(ckpt, map_location=train_device(cfg.trainer)).eval()
    x_train, y_train = load_split(cfg.data, "train")
    x_test, y_test = load_split(cfg.data, "test")
    fit_idx, _ = split_indices(len(x_train), cfg.data.val_fraction, cfg.seed)  # the images the AE trained on

    with start_run(cfg, "features", manifest):
        ae_train, _ = encode(module, x_train, cfg.features.batch_size)
        ae_test, ae_mse = encode(module, x_test, cfg.features.batch_size)
        k = ae_train.shape[1]
        flat_train = x_train.reshape(len(x_train), -1).astype(np.float32) / 255
        flat_test = x_test.reshape(len(x_test), -1).astype(np.float32) / 255
        pca = PCA(n_components=k, random_state=cfg.seed).fit(flat_train[fit_idx])
        pca_test = pca.transform(flat_test)
        pca_recon = pca.inverse_transform(pca_test)
        pca_mse = float(((pca_recon - flat_test) ** 2).mean())

        out = root / cfg.features.out_dir
        save_features(out / "ae.npz", ae_train, ae_test, y_train, y_test)
        save_features(out / "pca.npz", pca.transform(flat_train), pca_test, y_train, y_test)
        metrics = {"code_dim": k, "ae_test_mse": ae_mse, "pca_test_mse": pca_mse,
                   "pca_explained_variance": float(pca.explained_variance_ratio_.sum()),
                   "ae_minus_pca_mse": ae_mse - pca_mse}
        write_json(root / "reports/metrics/features.json", metrics)
        mlflow.log_metrics(metrics)
        log.info("reconstruction MSE on test: AE %.5f vs PCA-%d %.5f", ae_mse, k, pca_mse)

        x = to_tensor(x_test[:16]).to(module.device)
        pca_images = torch.from_numpy(pca_recon[:16].reshape(-1, 1, 28, 28))
        fig = image_rows(root / "reports/figures/features_recon.png",
                         {"original": x, f"AE-{k}": module(x), f"PCA-{k}": pca_images})
        mlflow.log_artifact(str(fig))
        # the first two PCA components of the pixels are PCA-2 of the pixels
        fig = latent_map(root / "reports/figures/latent_map.png", ae_test, pca_test[:, :2], y_test,
                         list(get_spec(cfg.data.name).classes), cfg.seed)
        mlflow.log_artifact(str(fig))
    return metrics


def latent_map(path, codes: np.ndarray, pixels_pca2: np.ndarray, labels: np.ndarray, classes: list[str],
               seed: int, n: int = LATENT_MAP_SAMPLES):
    """Three scatter plots of the same fixed-seed subsample, coloured by class: PCA-2 and t-SNE of the AE
    codes, PCA-2 of the pixels."""
    idx = np.random.default_rng(seed).permutation(len(codes))[:n]
    codes, labels = codes[idx], labels[idx]
    perplexity = min(30.0, (len(idx) - 1) / 3)  # t-SNE needs perplexity < n_samples
    maps = {f"AE-{codes.shape[1]} codes, PCA-2": PCA(n_components=2, random_state=seed).fit_transform(codes),
            f"AE-{codes.shape[1]} codes, t-SNE": TSNE(n_components=2, perplexity=perplexity, init="pca",
                                                      random_state=seed).fit_transform(codes),
            "pixels, PCA-2": pixels_pca2[idx]}
    fig, axes = figures.plt.subplots(1, 3, figsize=(16, 5.4))
    cmap = figures.plt.get_cmap("tab10", len(classes))
    for ax, (title, xy) in zip(axes, maps.items()):
        for c, name in enumerate(classes):
            mask = labels == c
            ax.scatter(xy[mask, 0], xy[mask, 1], s=4, color=cmap(c), label=name)
        ax.set_title(f"{title} ({len(idx)} test images)")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[-1].legend(loc="center left", bbox_to_anchor=(1, 0.5), markerscale=3, frameon=False)
    return figures.save_figure(fig, path)


if __name__ == "__main__":
    main()
