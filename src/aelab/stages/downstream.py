"""Stage downstream: XGBoost on raw pixels, PCA-k and AE-k features; accuracy, macro-F1 and fit time of each.

Outputs: ``reports/metrics/downstream.json``, ``reports/plots/confusion_<features>.csv`` (DVC confusion plots),
``reports/figures/confusion_ae.png``, ``reports/downstream.md`` (the comparison table); one MLflow run with the
three boosters logged through ``mlflow.xgboost``, the one on the AE codes registered as ``aelab-xgb-ae``.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import time

import hydra
import mlflow
import mlflow.xgboost
import numpy as np
import xgboost
from mlflow.models import infer_signature
from omegaconf import DictConfig
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
from xgboost import XGBClassifier

from aelab import figures
from aelab.config import validate
from aelab.data.catalog import get_spec
from aelab.data.images import load_split, raw_dir
from aelab.paths import atomic_path, require, write_json
from aelab.stages import CONF_DIR, output_root, publishes_outputs
from aelab.tracking import publish, start_run
from aelab.xgb import fit_xgb, xgb_client, xgb_device

log = logging.getLogger(__name__)


def load_feature_sets(cfg: DictConfig) -> dict[str, tuple[np.ndarray, ...]]:
    """{"raw": ..., "pca": ..., "ae": ...} each as (x_train, y_train, x_test, y_test)."""
    x_train, y_train = load_split(cfg.data, "train")
    x_test, y_test = load_split(cfg.data, "test")
    sets = {"raw": (x_train.reshape(len(x_train), -1), y_train, x_test.reshape(len(x_test), -1), y_test)}
    for name in ("pca", "ae"):
        with np.load(require(f"{cfg.features.out_dir}/{name}.npz", "features")) as f:
            sets[name] = (f["train"], f["y_train"], f["test"], f["y_test"])
    return sets


def fit_and_score(cfg: DictConfig, device: str, client, x_train, y_train, x_test,
                  y_test) -> tuple[XGBClassifier, dict, np.ndarray]:
    """Train one booster on ``device`` (on ``client``'s dask cluster when there is one); return it, its test metrics
    and its test predictions."""
    params = cfg.downstream
    start = time.perf_counter()
    clf = fit_xgb({"n_estimators": params.n_estimators, "max_depth": params.max_depth,
                   "learning_rate": params.learning_rate, "max_bin": params.max_bin, "n_jobs": params.n_jobs,
                   "tree_method": "hist", "device": device, "random_state": cfg.seed}, x_train, y_train, client)
    fit_seconds = time.perf_counter() - start
    pred = clf.predict(x_test)
    metrics = {"accuracy": float(accuracy_score(y_test, pred)), "macro_f1": float(f1_score(y_test, pred, average="macro")),
               "fit_seconds": round(fit_seconds, 2), "n_features": int(x_train.shape[1])}
    return clf, metrics, pred


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
@publishes_outputs
def main(cfg: DictConfig) -> dict:
    validate(cfg)
    device = xgb_device(cfg.downstream.device, "downstream.device")
    root = output_root()
    manifest = require(raw_dir(cfg.data) / "manifest.json", "download")
    classes = list(get_spec(cfg.data.name).classes)
    sets = load_feature_sets(cfg)
    results = {}
    with start_run(cfg, "downstream", manifest), xgb_client(cfg.downstream.engine, cfg.dask) as client:
        mlflow.log_params({"xgb_device": device, "xgb_engine": cfg.downstream.engine})
        # fit first: logging competes for CPU
        fitted = {name: fit_and_score(cfg, device, client, *arrays) for name, arrays in sets.items()}
        for name, (clf, metrics, pred) in fitted.items():
            y_test = sets[name][3]
            results[name] = {**metrics, "xgb_device": device}
            log.info("XGBoost on %s (%s): %s", name, device, metrics)
            mlflow.log_metrics({f"{name}_{k}": v for k, v in metrics.items()})
            x_test = sets[name][2][:5]
            args = {"xgb_model": clf, "pip_requirements": [f"xgboost=={xgboost.__version__}"],
                    "signature": infer_signature(x_test, pred[:5]), "input_example": x_test}
            if name == "ae":  # the registered one: the classifier on the autoencoder's codes
                publish("xgb_ae", mlflow.xgboost.log_model, args,
                        {f"test_{k}": metrics[k] for k in ("accuracy", "macro_f1")},
                        hashlib.sha256(clf.get_booster().save_raw()).hexdigest())
            else:
                mlflow.xgboost.log_model(name=f"xgb_{name}", **args)
            _write_confusion_csv(root / f"reports/plots/confusion_{name}.csv", y_test, pred, classes)
            if name == "ae":
                fig = figures.confusion_matrix(root / "reports/figures/confusion_ae.png",
                                               confusion_matrix(y_test, pred, labels=range(len(classes))),
                                               classes, f"XGBoost on AE-{metrics['n_features']} codes")
                mlflow.log_artifact(str(fig))
        write_json(root / "reports/metrics/downstream.json", results)
        table = _markdown_table(results)
        with atomic_path(root / "reports/downstream.md") as tmp:
            tmp.write_text(table)
        mlflow.log_text(table, "downstream.md")
    print(table)
    return results


def _write_confusion_csv(path, y_true, y_pred, classes: list[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["actual", "predicted"])
        writer.writerows((classes[t], classes[p]) for t, p in zip(y_true, y_pred))


def _markdown_table(results: dict[str, dict]) -> str:
    lines = ["| features | n features | test accuracy | macro-F1 | fit seconds |", "|---|---:|---:|---:|---:|"]
    for name, m in results.items():
        lines.append(f"| {name} | {m['n_features']} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} | {m['fit_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
