"""Study finetune: what autoencoder pretraining buys a classifier as its initialization (``dvc repro
studies/dvc.yaml``; not part of the default pipeline).

The classifier is the classify stage's (``classify.optim``, ``classify.batch_size``, softmax + cross-entropy) in the
pretrained encoder's shape: hidden widths = the autoencoder's hidden widths and code (784-128-64-32-10 for the
default deep AE), its norm, no dropout. For each label budget (``finetune.budgets``: a seeded class-stratified sample
of the training split, the same for every init) it trains from each init (``finetune.inits``): PyTorch's
``default``, ``he`` or ``xavier``; ``pretrained``: the first layers are the pretrain stage's encoder (trained on all
training images, without labels), fine-tuned end to end; ``frozen``: that encoder fixed, only the softmax head
trained (linear evaluation). A training has at most ``finetune.steps`` optimizer steps (and ``finetune.max_epochs``
epochs), stops after ``finetune.patience`` epochs without a lower validation cross-entropy and keeps its best
epoch. One MLflow run, a child run per budget and init.

Outputs: ``reports/finetune.md``, ``reports/metrics/finetune.json`` (budget -> init -> metrics),
``reports/plots/finetune_accuracy.csv`` (a DVC plot), ``reports/figures/finetune_accuracy.png``.
"""

from __future__ import annotations

import logging
import math
import tempfile

import hydra
import mlflow
from omegaconf import DictConfig, OmegaConf

from aelab.config import ConfigError, check_label_budget, validate
from aelab.data.images import raw_dir
from aelab.figures import plt, save_figure
from aelab.lit.autoencoder import AutoencoderModule
from aelab.paths import atomic_path, require, write_csv, write_json
from aelab.stages import CONF_DIR, output_root, publishes_outputs
from aelab.stages.classify import train_variant
from aelab.sweep import markdown_table
from aelab.tracking import start_run

log = logging.getLogger(__name__)
PRETRAINED = ("pretrained", "frozen")
KEPT = ("test_accuracy", "test_error", "test_cross_entropy", "best_val_error", "train_accuracy", "epochs",
        "train_seconds")


def encoder_shaped(cfg: DictConfig, init: str, budget: int) -> DictConfig:
    """``cfg`` whose ``classify`` section trains the encoder-shaped classifier from ``init`` on ``budget`` labels
    (the pretrained inits start from He: only their head keeps it)."""
    batches = math.ceil(budget / cfg.classify.batch_size)
    epochs = min(cfg.finetune.max_epochs, max(1, math.ceil(cfg.finetune.steps / batches)))
    net = {"hidden": [*cfg.model.hidden, cfg.model.code_dim], "norm": cfg.model.norm, "dropout_input": 0.0,
           "dropout_hidden": 0.0, "max_norm": None, "init": "he" if init in PRETRAINED else init,
           "code_norm": False}
    return OmegaConf.merge(cfg, {"classify": {"model": net, "train_labels": budget, "max_epochs": epochs,
                                              "val_limit": cfg.finetune.val_limit, "l1_weight": 0.0,
                                              "early_stopping": cfg.finetune.patience}})


def check_study(cfg: DictConfig) -> None:
    """Fail before any work on a budget larger than the split, or a pretrained init with an encoder that is not an
    MLP with a ReLU code (the classifier's shape)."""
    for i, budget in enumerate(cfg.finetune.budgets):
        check_label_budget(cfg, f"finetune.budgets[{i}]", budget)
    if set(cfg.finetune.inits) & set(PRETRAINED) and (cfg.model.get("hidden") is None
                                                       or cfg.model.code_activation != "relu"):
        raise ConfigError(f"invalid config:\n  finetune.inits: {list(cfg.finetune.inits)} start from the pretrained "
                          f"encoder, which must be a dense autoencoder with a ReLU code (model: {cfg.model.name}, "
                          f"code_activation {cfg.model.code_activation})")


def accuracy_figure(path, results: dict[int, dict[str, dict]]):
    """Test accuracy against labelled images (log x), one line per init."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    budgets = sorted(results)
    for init in results[budgets[0]]:
        ax.plot(budgets, [results[b][init]["test_accuracy"] for b in budgets], marker="o", label=init)
    ax.set_xscale("log")
    ax.set_xlabel("labelled training images")
    ax.set_ylabel("test accuracy")
    ax.set_title("classifier initialization: random vs the pretrained encoder")
    ax.legend()
    return save_figure(fig, path)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
@publishes_outputs
def main(cfg: DictConfig) -> dict[int, dict[str, dict]]:
    validate(cfg)
    check_study(cfg)
    root = output_root()
    manifest = require(raw_dir(cfg.data) / "manifest.json", "download")
    encoder = None
    if set(cfg.finetune.inits) & set(PRETRAINED):
        ckpt = require(f"{cfg.pretrain.out_dir}/ae.ckpt", "pretrain")
        encoder = AutoencoderModule.load_from_checkpoint(ckpt, map_location="cpu").model.encoder

    def load(freeze: bool):
        return lambda module: module.model.load_encoder(encoder, freeze)

    results: dict[int, dict[str, dict]] = {}
    with start_run(cfg, "finetune", manifest), tempfile.TemporaryDirectory() as workdir:
        for budget in cfg.finetune.budgets:
            results[budget] = {}
            for init in cfg.finetune.inits:
                prepare = load(init == "frozen") if init in PRETRAINED else None
                row, _ = train_variant(f"{budget}_{init}", encoder_shaped(cfg, init, budget), [], workdir,
                                       stage="finetune", prepare=prepare, stratify=True)
                results[budget][init] = {k: row[k] for k in KEPT}
                log.info("%d labels, %s init: test accuracy %.4f", budget, init, row["test_accuracy"])
        rows = [{"labels": b, "log10_labels": round(math.log10(b), 4), **{i: r["test_accuracy"] for i, r in by_init.items()}}
                for b, by_init in results.items()]
        table = markdown_table(rows)
        with atomic_path(root / "reports/finetune.md") as tmp:
            tmp.write_text(table)
        write_json(root / "reports/metrics/finetune.json", {str(b): r for b, r in results.items()})
        write_csv(root / "reports/plots/finetune_accuracy.csv", rows)
        mlflow.log_artifact(str(accuracy_figure(root / "reports/figures/finetune_accuracy.png", results)))
        mlflow.log_text(table, "finetune.md")
    print(table)
    return results


if __name__ == "__main__":
    main()
