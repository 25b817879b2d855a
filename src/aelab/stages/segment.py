"""Stage segment: train the configured segmenter (SegNet, or the smp U-Net baseline) on ``segment.data``.

Measures the SegNet paper's global pixel accuracy (G), class-average accuracy (C) and mean/per-class IoU on val
every epoch and on test at the end (with the checkpoint of the best validation mIoU), the cross-entropy optionally
weighted by median-frequency balancing.

Outputs: ``<segment.out_dir>/segmenter.ckpt``, ``reports/metrics/segment.json``, ``reports/plots/segment_history.csv``,
``reports/plots/segment_iou.csv`` (per-class IoU), ``reports/plots/segment_confusion.csv`` (test confusion for
DVC's confusion templates: 100 rows per true class, split in proportion to the predicted pixels, so it shows the
row-normalised rates in percent without one row per pixel), ``reports/figures/segment_overlays.png`` (test images,
true and predicted labels, a legend of the class colours) and ``reports/figures/segment_confusion.png`` (the
confusion matrix beside a per-class IoU bar chart); one MLflow run with all of them.
"""

from __future__ import annotations

import logging
import math
import re

import hydra
import lightning as L
import mlflow
import torch
from omegaconf import DictConfig, OmegaConf

from aelab import figures
from aelab.config import validate
from aelab.data.segmentation import SegmentationDataModule
from aelab.distributed import leave_process_group
from aelab.lit.segmentation import SegmentationModule
from aelab.lit.trainer import fit_best, resolve_precision, resume_folder, score_test_split
from aelab.paths import write_csv, write_json
from aelab.pyfunc import SegmenterModel, log_network, uses_channels_last
from aelab.stages import CONF_DIR, output_root, publishes_outputs
from aelab.tracking import lightning_logger, start_run

log = logging.getLogger(__name__)

HISTORY_KEYS = ("train_loss", "val_loss", "val_miou", "val_global_acc", "val_class_acc")


def confusion_rows(matrix: torch.Tensor, classes: list[str], per_class: int = 100) -> list[tuple[str, str]]:
    """(actual, predicted) rows: ``per_class`` for each true class present, split as its pixels were predicted."""
    rows = []
    for i, row in enumerate(matrix.double()):
        if row.sum() > 0:
            counts = (row / row.sum() * per_class).round().long()
            rows += [(classes[i], classes[j]) for j, n in enumerate(counts.tolist()) for _ in range(n)]
    return rows


@torch.inference_mode()
def overlays(path, module: SegmentationModule, data: SegmentationDataModule, n: int):
    """The first ``n`` test images with their true and predicted labels, as ``figures.segmentation_overlays``."""
    test = data.sets["test"]
    images, truth = (torch.stack(t) for t in zip(*(test[i] for i in range(min(n, len(test))))))
    pred = module(images.to(module.device)).argmax(1).cpu()
    return figures.segmentation_overlays(path, images, truth, pred, data.info["classes"], data.info["ignore_index"])


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
@publishes_outputs
def main(cfg: DictConfig) -> dict:
    validate(cfg)
    root = output_root()
    p = cfg.segment
    L.seed_everything(cfg.seed, workers=True)
    data = SegmentationDataModule(p.data, p.batch_size, cfg.seed, cfg.data.num_workers)
    classes = data.info["classes"]
    weights = data.class_weights() if p.class_weights == "median_frequency" else None
    module = SegmentationModule(OmegaConf.to_container(p.model, resolve=True), data.info["channels"], classes,
                                data.info["ignore_index"], None if weights is None else weights.tolist(),
                                p.lr, p.weight_decay, p.optimizer, p.momentum, p.schedule, p.loss_normalization)
    trainer_cfg = OmegaConf.merge(cfg.trainer, {"max_epochs": p.max_epochs})
    ckpt = root / p.out_dir / "segmenter.ckpt"

    with start_run(cfg, "segment", data.info["manifest"], dataset=data.info["name"]) as run:
        logger = lightning_logger(cfg, run)
        module, history, best_val_miou = fit_best(module, data, trainer_cfg, logger, ckpt, keys=HISTORY_KEYS,
                                                  monitor="val_miou", mode="max", resume=resume_folder(cfg, "segment"))
        test = score_test_split(module, data, trainer_cfg, logger)
        if not leave_process_group():
            return {}  # another DDP rank: its share of the fit and test is done; rank 0 writes the outputs
        iou = {name: None if math.isnan(v) else v for name, v in zip(classes, module.test_iou.tolist())}
        rows = history.rows
        best = max(rows, key=lambda row: row["val_miou"])
        metrics = {"model": p.model.name, "test_global_acc": test["test_global_acc"],
                   "test_class_acc": test["test_class_acc"], "test_miou": test["test_miou"], "test_iou": iou,
                   "best_epoch": best["epoch"], "best_val_miou": best_val_miou, "best_val_loss": best["val_loss"],
                   **history.summary(module), "class_weights": p.class_weights}
        log.info("segment %s on test: G %.4f, C %.4f, mIoU %.4f in %.0f s of training", p.model.name,
                 metrics["test_global_acc"], metrics["test_class_acc"], metrics["test_miou"], metrics["train_seconds"])

        confusion = module.test_confusion_counts
        write_json(root / "reports/metrics/segment.json", metrics)
        write_csv(root / "reports/plots/segment_history.csv", rows)
        write_csv(root / "reports/plots/segment_iou.csv",
                  [{"class": name, "iou": v if v is not None else ""} for name, v in iou.items()])
        write_csv(root / "reports/plots/segment_confusion.csv",
                  [{"actual": a, "predicted": b} for a, b in confusion_rows(confusion, classes)])
        mlflow.log_metrics({**{k: v for k, v in metrics.items() if isinstance(v, float)},
                            **{re.sub(r"[^\w\-. /]", "_", f"test_iou_{name}"): v for name, v in iou.items()
                               if v is not None}})
        paths = [overlays(root / "reports/figures/segment_overlays.png", module, data, p.overlays),
                 figures.segmentation_scores(root / "reports/figures/segment_confusion.png", confusion.numpy(),
                                             classes, module.test_iou.tolist(),
                                             f"{p.model.name} on the test pixels: G {metrics['test_global_acc']:.3f}, "
                                             f"C {metrics['test_class_acc']:.3f}, mIoU {metrics['test_miou']:.3f}"),
                 ckpt, *(root / f"reports/plots/segment_{name}.csv" for name in ("history", "iou", "confusion"))]
        for path in paths:
            mlflow.log_artifact(str(path))
        example = torch.stack([data.sets["test"][i][0] for i in range(min(4, len(data.sets["test"])))])
        log_network("segmenter", SegmenterModel(resolve_precision(trainer_cfg, module), uses_channels_last(module)),
                    ckpt, example.numpy(), {k: metrics[k] for k in ("test_global_acc", "test_class_acc", "test_miou")})
    return metrics


if __name__ == "__main__":
    main()
