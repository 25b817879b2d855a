"""Stage tabular: the lecture's feature-engineering example, a sparse over-complete autoencoder feeding XGBoost.

On a binary table (scikit-learn's breast-cancer set by default, any CSV by config), per stratified fold: standardize
with the training part's statistics, train the autoencoder (30 -> 100 sigmoid codes by default, KL sparsity) on the
training part, then XGBoost on the raw features, the codes and both; ROC-AUC on the held-out part.

Outputs: ``reports/metrics/tabular.json`` (ROC-AUC mean ± std over folds, fit times, code sparsity),
``reports/tabular.md`` (the comparison table); one MLflow run with the per-fold metrics (step = fold).
"""

from __future__ import annotations

import logging
import time
import warnings
from contextlib import contextmanager

import hydra
import lightning as L
import mlflow
import numpy as np
import torch
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from omegaconf import DictConfig, OmegaConf
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader, TensorDataset

from aelab.config import validate
from aelab.data.tabular import Table, check_folds, load_table
from aelab.lit.autoencoder import AutoencoderModule
from aelab.models.penalties import code_sparsity
from aelab.paths import atomic_path, write_json
from aelab.stages import CONF_DIR, output_root, publishes_outputs
from aelab.tracking import flatten, start_run
from aelab.xgb import fit_xgb, xgb_client, xgb_device

log = logging.getLogger(__name__)
FEATURE_SETS = {"raw": "raw", "codes": "codes", "raw_codes": "raw + codes"}


@contextmanager
def quiet_lightning():
    """Silence Lightning's per-fit banners (devices, tips) and its no-validation hints: one fit per fold."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=PossibleUserWarning)
            warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated", category=FutureWarning)
            yield
    finally:
        logger.setLevel(level)


@contextmanager
def torch_threads(n: int):
    """Run the block on ``n`` torch CPU threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_autoencoder(params: dict, x: torch.Tensor, seed: int) -> tuple[AutoencoderModule, float]:
    """Train the configured autoencoder on the standardized rows ``x``; return it (eval mode) and its final train loss.

    On one CPU thread on purpose: with a few hundred rows of a few dozen features, a GPU only adds transfers and
    more threads only add hand-offs (measured on 2 busy cores: 0.7 s on one thread, 8.7 s on two).
    """
    L.seed_everything(seed, verbose=False)
    model_cfg = {**params["model"], "input_shape": [x.shape[1]]}
    module = AutoencoderModule(model_cfg, "mse_linear", params["optim"], params["penalty"])
    # drop the ragged last batch: a batch of one row would make the KL term per-row and break batch norm
    loader = DataLoader(TensorDataset(x), batch_size=params["batch_size"], shuffle=True,
                        drop_last=len(x) > params["batch_size"])
    with quiet_lightning(), torch_threads(1):
        trainer = L.Trainer(max_epochs=params["epochs"], accelerator="cpu", devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, loader)
    return module.eval(), float(trainer.callback_metrics["train_loss"])


def run_fold(params: dict, seed: int, x_train, y_train, x_test, y_test, client=None) -> dict[str, float]:
    """One fold: the scaler, the autoencoder and the boosters see the training part only; scores on the test part.
    The boosters train on ``client``'s dask cluster when there is one."""
    scaler = StandardScaler().fit(x_train)
    s_train, s_test = (torch.from_numpy(scaler.transform(x).astype(np.float32)) for x in (x_train, x_test))
    start = time.perf_counter()
    module, train_loss = train_autoencoder(params, s_train, seed)
    row = {"ae_fit_seconds": time.perf_counter() - start, "ae_train_loss": train_loss}
    with torch.inference_mode():
        c_train, c_test = module.encode(s_train).numpy(), module.encode(s_test).numpy()
        row["ae_test_mse"] = float(((module(s_test) - s_test) ** 2).mean())
    row.update({f"code_{k}": v for k, v in code_sparsity(torch.from_numpy(c_test)).items()})
    sets = {"raw": (x_train, x_test), "codes": (c_train, c_test),
            "raw_codes": (np.hstack([x_train, c_train]), np.hstack([x_test, c_test]))}
    xgb = {**params["xgb"], "device": xgb_device(params["xgb"]["device"], "tabular.xgb.device"),
           "tree_method": "hist", "random_state": seed}
    del xgb["engine"]
    for name, (f_train, f_test) in sets.items():
        start = time.perf_counter()
        clf = fit_xgb(xgb, f_train, y_train, client)
        row[f"{name}_fit_seconds"] = time.perf_counter() - start
        row[f"{name}_roc_auc"] = float(roc_auc_score(y_test, clf.predict_proba(f_test)[:, 1]))
    return row


def summarize(table: Table, params: dict, rows: list[dict[str, float]]) -> dict:
    """Mean (and std, for ROC-AUC) over the folds of each per-fold number."""
    def mean(key: str) -> float:
        return round(float(np.mean([r[key] for r in rows])), 4)

    n_features = {"raw": table.x.shape[1], "codes": params["model"]["code_dim"]}
    n_features["raw_codes"] = n_features["raw"] + n_features["codes"]
    results = {"dataset": table.name, "rows": len(table.y), "positive_class": table.classes[1], "folds": len(rows),
               "ae": {"code_dim": params["model"]["code_dim"], "fit_seconds": mean("ae_fit_seconds"),
                      "train_loss": mean("ae_train_loss"), "test_mse": mean("ae_test_mse"),
                      "sparsity": {k: mean(f"code_{k}") for k in ("mean_activation", "frac_near_zero")}}}
    for name in FEATURE_SETS:
        aucs = [r[f"{name}_roc_auc"] for r in rows]
        results[name] = {"n_features": n_features[name], "roc_auc_mean": round(float(np.mean(aucs)), 4),
                         "roc_auc_std": round(float(np.std(aucs)), 4), "fit_seconds": mean(f"{name}_fit_seconds")}
    return results


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
@publishes_outputs
def main(cfg: DictConfig) -> dict:
    validate(cfg)
    root = output_root()
    params = OmegaConf.to_container(cfg.tabular, resolve=True)
    device = xgb_device(params["xgb"]["device"], "tabular.xgb.device")  # fails here if it cannot run
    table = load_table(cfg.tabular)
    check_folds(table, params["folds"])
    splits = StratifiedKFold(params["folds"], shuffle=True, random_state=cfg.seed).split(table.x, table.y)

    with (start_run(cfg, "tabular", table.source_file, dataset=table.name),
          xgb_client(params["xgb"]["engine"], cfg.dask) as client):
        rows = []
        for fold, (train, test) in enumerate(splits):
            row = run_fold(params, cfg.seed + fold, table.x[train], table.y[train], table.x[test], table.y[test],
                           client)
            log.info("fold %d: ROC-AUC raw %.4f, codes %.4f, raw+codes %.4f; AE %.1f s", fold, row["raw_roc_auc"],
                     row["codes_roc_auc"], row["raw_codes_roc_auc"], row["ae_fit_seconds"])
            mlflow.log_metrics(row, step=fold)
            rows.append(row)
        results = {**summarize(table, params, rows), "xgb_device": device}
        mlflow.log_params({"xgb_device": device, "xgb_engine": params["xgb"]["engine"]})
        mlflow.log_metrics({k: v for k, v in flatten(results).items() if isinstance(v, float)})
        write_json(root / "reports/metrics/tabular.json", results)
        report = markdown_report(results, params)
        with atomic_path(root / "reports/tabular.md") as tmp:
            tmp.write_text(report)
        mlflow.log_text(report, "tabular.md")
    print(report)
    return results


def markdown_report(results: dict, params: dict) -> str:
    """The comparison table and one line on the autoencoder."""
    ae, raw = results["ae"], results["raw"]
    lines = [f"Sparse over-complete autoencoder {raw['n_features']} -> {ae['code_dim']} codes, then XGBoost; "
             f"{results['dataset']} ({results['rows']} rows, positive class {results['positive_class']!r}), "
             f"stratified {results['folds']}-fold CV, ROC-AUC on the held-out fold.", "",
             "| features | n features | ROC-AUC (mean ± std) | XGBoost fit s/fold |", "|---|---:|---:|---:|"]
    for name, label in FEATURE_SETS.items():
        m = results[name]
        lines.append(f"| {label} | {m['n_features']} | {m['roc_auc_mean']:.4f} ± {m['roc_auc_std']:.4f} "
                     f"| {m['fit_seconds']:.2f} |")
    penalty = params["penalty"]
    lines += ["", f"Autoencoder (KL weight {penalty['sparsity_kl']}, target {penalty['sparsity_target']}, "
              f"activity L1 {penalty['activity_l1']}): {ae['fit_seconds']:.1f} s/fold, held-out reconstruction MSE "
              f"{ae['test_mse']:.4f} (standardized units); held-out codes: mean activation "
              f"{ae['sparsity']['mean_activation']:.4f}, {100 * ae['sparsity']['frac_near_zero']:.1f}% below 0.01."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
