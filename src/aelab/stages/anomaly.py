"""Stage anomaly: an autoencoder's reconstruction error as an anomaly score, one class at a time.

``anomaly.protocol=one_out`` (the default): for each class c, the configured autoencoder (``model``, with
``pretrain``'s loss and optimizer) trains on the training images of the other classes; every test image is scored
by its reconstruction error, with c as the anomaly (positive). ``one_in`` is the reverse: train on c alone, the other
classes are the anomalies. The baselines fit the same training images: PCA with as many components as the code
(its reconstruction error) and scikit-learn's IsolationForest on the pixels. ROC-AUC and PR-AUC (average precision)
come from torchmetrics.

Outputs: ``reports/anomaly.md``, ``reports/metrics/anomaly.json``, ``reports/plots/anomaly_roc.csv`` (ROC curves
averaged over the classes), ``reports/figures/anomaly_roc.png`` (one panel per class); one MLflow run for the
stage with a child run per class (its epoch losses and scores).
"""

from __future__ import annotations

import logging
import tempfile

import hydra
import lightning as L
import mlflow
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest
from torch.utils.data import TensorDataset
from torchmetrics.functional.classification import binary_auroc, binary_average_precision, binary_roc

from aelab.config import ConfigError, anomaly_classes, validate
from aelab.data.catalog import get_spec
from aelab.data.images import load_split, raw_dir, split_indices, to_tensor
from aelab.data.resident import ResidentDataModule
from aelab.figures import roc_panels
from aelab.lit.autoencoder import AutoencoderModule, autoencoder_module
from aelab.lit.trainer import fit_best
from aelab.paths import atomic_path, require, write_csv, write_json
from aelab.stages import CONF_DIR, output_root, publishes_outputs
from aelab.sweep import markdown_table
from aelab.tracking import flatten, lightning_logger, start_run

log = logging.getLogger(__name__)

METHODS = ("ae", "pca", "iforest")
FPR = np.linspace(0, 1, 101)  # the ROC curves are reported as TPR at these false positive rates


def detection_scores(scores: np.ndarray, anomalous: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
    """ROC-AUC and PR-AUC of ``scores`` (higher: more anomalous) against the 0/1 labels ``anomalous``, and the ROC
    curve's TPR at ``FPR``."""
    s = torch.as_tensor(scores, dtype=torch.float64)
    s = (s - s.min()) / (s.max() - s.min()).clamp_min(1e-300)  # in [0, 1], or torchmetrics takes them for logits
    t = torch.as_tensor(anomalous, dtype=torch.long)
    fpr, tpr, _ = binary_roc(s, t)
    return ({"roc_auc": float(binary_auroc(s, t)), "pr_auc": float(binary_average_precision(s, t))},
            np.interp(FPR, fpr.numpy(), tpr.numpy()))


def split_masks(protocol: str, c: int, y_train: np.ndarray, y_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(training images to fit on, test images that are anomalies) for class ``c`` under ``protocol``."""
    if protocol == "one_out":
        return y_train != c, y_test == c
    return y_train == c, y_test != c


def flat(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float32) / 255


@torch.inference_mode()
def reconstruction_errors(module: AutoencoderModule, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Each image's mean squared reconstruction error."""
    return torch.cat([(module(x.to(module.device)).cpu() - x).pow(2).flatten(1).mean(1)
                      for x in to_tensor(images).split(batch_size)]).numpy()


def run_class(cfg: DictConfig, name: str, train: np.ndarray, x_test: np.ndarray, anomalous: np.ndarray,
              workdir: str) -> tuple[dict, dict, float]:
    """Fit the AE and the baselines on ``train``, score ``x_test`` in a child run: (scores, ROC curves, AE fit s)."""
    fit_idx, val_idx = split_indices(len(train), cfg.data.val_fraction, cfg.seed)
    L.seed_everything(cfg.seed, workers=True)  # each class alike, whichever others run
    data = ResidentDataModule(cfg.pretrain.batch_size, cfg.seed, TensorDataset(to_tensor(train[fit_idx])),
                              TensorDataset(to_tensor(train[val_idx])))
    trainer_cfg = OmegaConf.merge(cfg.trainer, {"max_epochs": cfg.anomaly.max_epochs})
    with mlflow.start_run(run_name=name, nested=True, tags={"stage": "anomaly", "anomaly_class": name}) as run:
        module, history, _ = fit_best(autoencoder_module(cfg), data, trainer_cfg, lightning_logger(cfg, run),
                                      f"{workdir}/ae.ckpt")
        seconds = history.fit_seconds
        pixels, test = flat(train[fit_idx]), flat(x_test)
        pca = PCA(cfg.model.code_dim, random_state=cfg.seed).fit(pixels)
        forest = IsolationForest(n_estimators=cfg.anomaly.iforest_estimators, random_state=cfg.seed).fit(pixels)
        results = {"ae": detection_scores(reconstruction_errors(module, x_test), anomalous),
                   "pca": detection_scores(((pca.inverse_transform(pca.transform(test)) - test) ** 2).mean(1),
                                           anomalous),
                   "iforest": detection_scores(-forest.score_samples(test), anomalous)}
        scores = {m: results[m][0] for m in METHODS}
        mlflow.log_metrics({**flatten(scores), "train_seconds": seconds, "n_train": len(fit_idx)})
    return scores, {m: results[m][1] for m in METHODS}, seconds


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
@publishes_outputs
def main(cfg: DictConfig) -> dict:
    validate(cfg)
    root = output_root()
    manifest = require(raw_dir(cfg.data) / "manifest.json", "download")
    p = cfg.anomaly
    names = get_spec(cfg.data.name).classes
    classes = anomaly_classes(p.classes, cfg.data.name)
    x_train, y_train = load_split(cfg.data, "train")
    x_test, y_test = load_split(cfg.data, "test")
    for c in classes:
        if not (0 < (y_train == c).sum() < len(y_train) and 0 < (y_test == c).sum() < len(y_test)):
            raise ConfigError(f"anomaly.classes: {names[c]!r} needs training and test images of its own and of other "
                              "classes; data.train_limit / data.test_limit leave too few")

    per_class, curves, rates, train_seconds = {}, {}, {}, 0.0
    with start_run(cfg, "anomaly", manifest), tempfile.TemporaryDirectory() as workdir:
        for c in classes:
            normal, anomalous = split_masks(p.protocol, c, y_train, y_test)
            name = names[c]
            per_class[name], curves[name], seconds = run_class(cfg, name, x_train[normal][:p.train_limit], x_test,
                                                               anomalous, workdir)
            rates[name], train_seconds = float(anomalous.mean()), train_seconds + seconds
            log.info("anomaly %s (%s): %s", name, p.protocol, per_class[name])
        mean = {m: {k: float(np.mean([r[m][k] for r in per_class.values()])) for k in ("roc_auc", "pr_auc")}
                for m in METHODS}
        metrics = {"protocol": p.protocol, "classes": list(per_class), "per_class": per_class, "mean": mean,
                   "train_seconds": round(train_seconds, 1), "epochs": p.max_epochs}

        rows = [{"class": name, "anomaly_rate": rates.get(name),
                 **{f"{m}_{k}": v for m in METHODS for k, v in result[m].items()}}
                for name, result in [*per_class.items(), ("mean", mean)]]
        fit_on = "the other classes" if p.protocol == "one_out" else "this class"
        table = (f"# Anomaly detection, protocol {p.protocol}\n\nEach row: an autoencoder ({cfg.model.name}, "
                 f"{p.max_epochs} epochs), PCA-{cfg.model.code_dim} and IsolationForest fit on training images of "
                 f"{fit_on}; test images scored, anomalies positive. PR-AUC by chance = anomaly_rate.\n\n"
                 + markdown_table(rows))
        with atomic_path(root / "reports/anomaly.md") as tmp:
            tmp.write_text(table)
        write_json(root / "reports/metrics/anomaly.json", metrics)
        mean_tpr = np.mean([[c[m] for m in METHODS] for c in curves.values()], axis=0).round(4)  # (method, FPR)
        write_csv(root / "reports/plots/anomaly_roc.csv",
                  [{"fpr": round(f, 2), **dict(zip(METHODS, map(float, tpr)))} for f, tpr in zip(FPR, mean_tpr.T)])
        figure = roc_panels(root / "reports/figures/anomaly_roc.png", FPR, curves,
                            {name: {m: r[m]["roc_auc"] for m in METHODS} for name, r in per_class.items()})
        mlflow.log_metrics(flatten({"mean": mean, "per_class": per_class, "train_seconds": train_seconds}))
        mlflow.log_text(table, "anomaly.md")
        for path in (figure, root / "reports/plots/anomaly_roc.csv", root / "reports/metrics/anomaly.json"):
            mlflow.log_artifact(str(path))
    print(table)
    return metrics


if __name__ == "__main__":
    main()
