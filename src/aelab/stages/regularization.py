"""Study regularization (studies/dvc.yaml): the lecture's regularizers on the autoencoder, side by side on one small
training set.

Each variant (``regularization.variants``: name -> overrides of the composed config) trains the configured
autoencoder, with ``regularization.norm`` (none: batch norm is a variant, not part of the baseline), on the first
``train_limit`` training images — few enough that regularization has overfitting to fight —
as a child MLflow run of one ``regularization`` run. The table answers the lecture's questions: best validation
loss and the generalization gap (val - train loss), test MSE, the epochs/steps each variant needs to reach the
baseline's best validation loss (BN's "fewer steps" claim), the code's sparsity (mean activation, fraction of units
near zero) and what an XGBoost classifier makes of the codes.

Outputs: ``reports/regularization.md``, ``reports/metrics/regularization.json``, ``reports/plots/regularization_val_loss.csv``.
"""

from __future__ import annotations

import logging
import tempfile

import hydra
import lightning as L
import mlflow
import torch
from omegaconf import DictConfig
from sklearn.metrics import accuracy_score

from aelab.config import validate
from aelab.data.images import ImageDataModule, load_split, raw_dir, split_indices
from aelab.lit.autoencoder import autoencoder_module, encode
from aelab.lit.trainer import fit_best, score_test_split
from aelab.models.penalties import code_sparsity
from aelab.paths import atomic_path, require, write_csv, write_json
from aelab.stages import CONF_DIR, output_root, publishes_outputs
from aelab.sweep import compare, markdown_table, variant_configs
from aelab.tracking import lightning_logger, start_run
from aelab.xgb import fit_xgb, xgb_client, xgb_device

log = logging.getLogger(__name__)


def train_variant(name: str, vcfg: DictConfig, workdir: str, client=None) -> tuple[dict, list[tuple[int, float]]]:
    """Train one variant in a child run; return its row of the table and its (step, val loss) history. XGBoost
    trains on ``client``'s dask cluster when there is one.

    Every variant starts from the same seed: same initial weights where the architecture allows, same batches."""
    L.seed_everything(vcfg.seed, workers=True)
    with mlflow.start_run(run_name=name, nested=True, tags={"stage": "regularization", "variant": name}) as run:
        mlflow.log_params({"variant": name, "overrides": " ".join(vcfg.regularization.variants[name]) or "(none)"})
        data = ImageDataModule(vcfg.data, vcfg.pretrain.batch_size, vcfg.seed)
        module, history, best = fit_best(autoencoder_module(vcfg), data, vcfg.trainer, lightning_logger(vcfg, run),
                                         f"{workdir}/{name}.ckpt", keys=("train_loss", "val_loss"))
        test_mse = score_test_split(module, data, vcfg.trainer)["test_mse"]
        x_train, y_train = load_split(vcfg.data, "train")
        fit_idx, _ = split_indices(len(x_train), vcfg.data.val_fraction, vcfg.seed)
        x_test, y_test = load_split(vcfg.data, "test")
        codes_train, _ = encode(module.eval(), x_train[fit_idx], 1024)
        codes_test, _ = encode(module, x_test, 1024)
        xgb = fit_xgb({"n_estimators": vcfg.regularization.xgb_estimators, "max_depth": 4, "tree_method": "hist",
                       "device": xgb_device(vcfg.regularization.xgb_device, "regularization.xgb_device"),
                       "random_state": vcfg.seed}, codes_train, y_train[fit_idx], client)
        last = history.rows[-1]
        row = {"variant": name, "best_val_loss": best, "final_train_loss": last["train_loss"],
               "final_val_loss": last["val_loss"], "gap_val_minus_train": last["val_loss"] - last["train_loss"],
               "test_mse": test_mse, **code_sparsity(torch.from_numpy(codes_test)),
               "xgb_accuracy_on_codes": float(accuracy_score(y_test, xgb.predict(codes_test)))}
        mlflow.log_metrics({k: v for k, v in row.items() if isinstance(v, float)})
    steps_per_epoch = len(data.train_dataloader())
    return row, [((r["epoch"] + 1) * steps_per_epoch, r["val_loss"]) for r in history.rows]


def study_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """Each variant's full config: the study's training set, epochs and norm under the variant's overrides."""
    study = cfg.regularization
    return variant_configs(cfg, "regularization", {"data": {"train_limit": study.train_limit},
                                                   "trainer": {"max_epochs": study.max_epochs},
                                                   "model": {"norm": study.norm}})


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
@publishes_outputs
def main(cfg: DictConfig) -> list[dict]:
    validate(cfg)
    device = xgb_device(cfg.regularization.xgb_device, "regularization.xgb_device")  # fails here if it cannot run
    root = output_root()
    manifest = require(raw_dir(cfg.data) / "manifest.json", "download")
    configs = study_configs(cfg)
    rows, histories = [], []
    engine = cfg.regularization.xgb_engine
    with (start_run(cfg, "regularization", manifest), tempfile.TemporaryDirectory() as workdir,
          xgb_client(engine, cfg.dask) as client):
        mlflow.log_params({"xgb_device": device, "xgb_engine": engine})
        for name, vcfg in configs.items():
            row, history = train_variant(name, vcfg, workdir, client)
            rows.append(row)
            histories.append(history)
            log.info("%s: %s", name, row)
        baseline = min(loss for _, loss in histories[0])  # the first variant's best epoch is the reference
        rows = compare(rows, histories, target=baseline)
        table = markdown_table(rows)
        with atomic_path(root / "reports/regularization.md") as tmp:
            tmp.write_text(table)
        write_json(root / "reports/metrics/regularization.json", {row["variant"]: row for row in rows})
        write_csv(root / "reports/plots/regularization_val_loss.csv",
                  [{"epoch": e + 1, **{r["variant"]: h[e][1] if e < len(h) else "" for r, h in zip(rows, histories)}}
                   for e in range(max(len(h) for h in histories))])
        mlflow.log_text(table, "regularization.md")
    print(table)
    return rows


if __name__ == "__main__":
    main()
