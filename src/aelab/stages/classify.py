"""Stage classify: the lecture's supervised network, an MLP classifier, and its regularizers side by side.

The network (``classify.model``, softmax + cross-entropy, He init, Adam) trains on a small label budget
(``classify.train_labels`` images), where the plain net overfits. Each variant (``classify.variants``: name ->
overrides) is a child MLflow run of one ``classify`` run, from the same seed. Without early stopping a variant's
model is its last epoch's. The table: test error, best validation error, the generalization gap (train − test
accuracy, both in eval mode), test cross-entropy, the optimizer steps each variant needed to reach the first
variant's best validation error (BN's "same accuracy in fewer steps"), and wall time.

Outputs: ``reports/classify.md``, ``reports/metrics/classify.json``, ``reports/plots/classify_val_error.csv``,
``reports/figures/classify_curves.png``.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable

import hydra
import lightning as L
import mlflow
from lightning.pytorch.callbacks import EarlyStopping
from omegaconf import DictConfig, OmegaConf

from aelab.config import check_label_budget, validate
from aelab.data.images import ImageDataModule, raw_dir
from aelab.figures import plt, save_figure
from aelab.lit.classifier import ClassifierModule, accuracy_and_loss, classifier_module
from aelab.lit.trainer import fit_best, score_test_split
from aelab.paths import atomic_path, require, write_csv, write_json
from aelab.stages import CONF_DIR, output_root, publishes_outputs
from aelab.sweep import compare, markdown_table, variant_configs
from aelab.tracking import lightning_logger, start_run

log = logging.getLogger(__name__)
HISTORY_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc")
TABLE_KEYS = ("variant", "test_error", "best_val_error", "gap_train_minus_test", "test_cross_entropy",
              "steps_to_baseline", "epochs", "train_seconds")


def train_variant(name: str, vcfg: DictConfig, overrides: list[str], workdir: str, stage: str = "classify",
                  prepare: Callable[[ClassifierModule], None] | None = None,
                  stratify: bool = False) -> tuple[dict, list[dict]]:
    """Train the classifier of ``vcfg`` (``overrides`` made it a variant) in a child run; return its row (the
    table's columns and more) and its per-epoch history (step, train/val loss and accuracy). ``prepare`` changes the
    initialized module before training (e.g. loads a pretrained encoder); ``stratify`` draws the label budget
    class-stratified."""
    c = vcfg.classify
    L.seed_everything(vcfg.seed, workers=True)
    trainer_cfg = OmegaConf.merge(vcfg.trainer, {"max_epochs": c.max_epochs})
    with mlflow.start_run(run_name=name, nested=True, tags={"stage": stage, "variant": name}) as run:
        mlflow.log_params({"variant": name, "overrides": " ".join(overrides) or "(none)"})
        data = ImageDataModule(vcfg.data, c.batch_size, vcfg.seed, train_labels=c.train_labels, val_limit=c.val_limit,
                               stratify=stratify)
        stop = [EarlyStopping(monitor="val_loss", patience=c.early_stopping)] if c.early_stopping else []
        module = classifier_module(vcfg)
        if prepare is not None:
            prepare(module)
        module, history, _ = fit_best(module, data, trainer_cfg, lightning_logger(vcfg, run),
                                      f"{workdir}/{name}.ckpt", keys=HISTORY_KEYS,
                                      monitor="val_loss" if stop else None, callbacks=stop)
        test = score_test_split(module, data, trainer_cfg)
        train_acc, train_ce = accuracy_and_loss(module, *data.train_set.tensors)
        val_errors = [1 - r["val_acc"] for r in history.rows]
        row = {"variant": name, "test_error": 1 - test["test_acc"], "best_val_error": min(val_errors),
               "gap_train_minus_test": train_acc - test["test_acc"], "test_cross_entropy": test["test_loss"],
               "train_accuracy": train_acc, "train_cross_entropy": train_ce, "test_accuracy": test["test_acc"],
               **history.summary(module)}
        mlflow.log_metrics({k: float(v) for k, v in row.items() if isinstance(v, int | float)})
    steps_per_epoch = len(data.train_dataloader())
    return row, [{"step": (r["epoch"] + 1) * steps_per_epoch, **r} for r in history.rows]


def with_steps_to_baseline(rows: list[dict], histories: list[list[dict]]) -> tuple[list[dict], float]:
    """Each row with ``steps_to_baseline`` and ``epochs_to_baseline``: what its validation error needed to reach
    the first variant's best (None: never); and that target."""
    curves = [[(h["step"], 1 - h["val_acc"]) for h in history] for history in histories]
    target = min(v for _, v in curves[0])
    for row in compare(rows, curves, target=target):
        row.pop("target_val_loss")
        row["epochs_to_baseline"], row["steps_to_baseline"] = row.pop("epochs_to_target"), row.pop("steps_to_target")
    return rows, target


def curves_figure(path, histories: dict[str, list[dict]], reference: str):
    """Validation error per epoch of every variant; train vs validation accuracy of ``reference`` beside it."""
    fig, (ax, ax_ref) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, history in histories.items():
        ax.plot([h["epoch"] + 1 for h in history], [1 - h["val_acc"] for h in history], label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation error")
    ax.set_title("validation error per epoch")
    ax.legend(fontsize=7, ncol=2)
    ref = histories[reference]
    epochs = [h["epoch"] + 1 for h in ref]
    ax_ref.plot(epochs, [h["train_acc"] for h in ref], label="train accuracy (training batches, train mode)")
    ax_ref.plot(epochs, [h["val_acc"] for h in ref], label="validation accuracy")
    ax_ref.plot(epochs, [h["val_loss"] for h in ref], label="validation cross-entropy", linestyle="--")
    ax_ref.set_xlabel("epoch")
    ax_ref.set_title(f"{reference}: train vs validation")
    ax_ref.legend(fontsize=8)
    return save_figure(fig, path)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
@publishes_outputs
def main(cfg: DictConfig) -> list[dict]:
    validate(cfg)
    check_label_budget(cfg)
    root = output_root()
    manifest = require(raw_dir(cfg.data) / "manifest.json", "download")
    configs = variant_configs(cfg, "classify", {})
    rows, histories = [], {}
    with start_run(cfg, "classify", manifest), tempfile.TemporaryDirectory() as workdir:
        mlflow.log_params({"train_labels": cfg.classify.train_labels})
        for name, vcfg in configs.items():
            row, histories[name] = train_variant(name, vcfg, list(cfg.classify.variants[name]), workdir)
            rows.append(row)
            log.info("%s: test error %.4f, gap %.4f", name, row["test_error"], row["gap_train_minus_test"])
        rows, target = with_steps_to_baseline(rows, list(histories.values()))
        table = markdown_table([{k: row[k] for k in TABLE_KEYS} for row in rows])
        with atomic_path(root / "reports/classify.md") as tmp:
            tmp.write_text(table)
        write_json(root / "reports/metrics/classify.json",
                   {"train_labels": cfg.classify.train_labels, "baseline_best_val_error": target,
                    **{row["variant"]: row for row in rows}})
        n_epochs = max(len(h) for h in histories.values())
        write_csv(root / "reports/plots/classify_val_error.csv",
                  [{"epoch": e + 1, **{n: round(1 - h[e]["val_acc"], 6) if e < len(h) else ""
                                       for n, h in histories.items()}} for e in range(n_epochs)])
        mlflow.log_artifact(str(curves_figure(root / "reports/figures/classify_curves.png", histories, rows[0]["variant"])))
        mlflow.log_text(table, "classify.md")
    print(table)
    return rows


if __name__ == "__main__":
    main()
