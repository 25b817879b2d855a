"""Stage colorize: a U-Net predicts the Lab chroma (ab) of an image from its luminance (L).

Why Lab: see aelab.data.color; the output keeps the input's luminance exactly and the loss measures color only.
Scored on the test images against the baseline "grayscale replicated to three channels" (L with ab = 0):
PSNR and SSIM of the RGB image, mean absolute error of ab (Lab units), and the Hasler-Suesstrunk colorfulness
of predicted, true and gray images. Training stops after ``colorize.patience`` epochs without a lower validation
loss (the best epoch is kept). When make_color_set fell back to photograph patches the metrics say so
(``fallback``: 1) and so do the MLflow tag ``color_source`` and the figure; the test photographs are then also
scored one by one (``per_photo``, and the standard deviation of the gains over them, ``per_photo_std``).

Outputs: ``models/colorize/colorizer.ckpt``, ``reports/metrics/colorize.json``, ``reports/plots/colorize_loss.csv``,
``reports/figures/colorize_grid.png``; one MLflow run with all of them.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

import hydra
import lightning as L
import mlflow
import torch
from lightning.pytorch.callbacks import EarlyStopping
from omegaconf import DictConfig, OmegaConf

from aelab.config import validate
from aelab.data.color import AB_SCALE, ColorDataModule, to_rgb
from aelab.distributed import leave_process_group
from aelab.figures import image_rows
from aelab.lit.image2image import ImageToImageModule
from aelab.lit.trainer import fit_best, resume_folder
from aelab.metrics import ImageQuality, colorfulness
from aelab.paths import require, write_csv, write_json
from aelab.pyfunc import ColorizerModel, log_network, uses_channels_last
from aelab.stages import CONF_DIR, output_root, publishes_outputs
from aelab.tracking import flatten, lightning_logger, start_run

log = logging.getLogger(__name__)


@torch.inference_mode()
def evaluate(module: ImageToImageModule, l_in: torch.Tensor, ab: torch.Tensor, rgb: torch.Tensor,
             batch_size: int = 500) -> dict:
    """Predicted and gray images against the true ``rgb``: PSNR, SSIM, ab MAE and colorfulness (means)."""
    quality = ImageQuality(["model", "gray"])
    ab_abs_err = {"model": 0.0, "gray": 0.0}
    colorful = {"model": 0.0, "gray": 0.0, "true": 0.0}
    for start in range(0, len(l_in), batch_size):
        x, y, true = (t[start:start + batch_size] for t in (l_in, ab, rgb))
        pred_ab = module(x.to(module.device)).float().cpu()
        images = {"model": to_rgb(x, pred_ab), "gray": to_rgb(x, torch.zeros_like(y))}
        quality.update(true, images)
        for name, guess in (("model", pred_ab), ("gray", torch.zeros_like(y))):
            ab_abs_err[name] += float((guess - y).abs().sum()) * AB_SCALE
        for name, image in (*images.items(), ("true", true)):
            colorful[name] += float(colorfulness(image).sum())
    return {**quality.compute(), "ab_mae": {k: v / ab.numel() for k, v in ab_abs_err.items()},
            "colorfulness": {k: v / len(l_in) for k, v in colorful.items()}}


def with_gains(result: dict) -> dict:
    """``evaluate``'s result with the model's PSNR and SSIM gains over the gray baseline."""
    return {**result, "psnr_gain_vs_gray": result["psnr"]["model"] - result["psnr"]["gray"],
            "ssim_gain_vs_gray": result["ssim"]["model"] - result["ssim"]["gray"]}


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
@publishes_outputs
def main(cfg: DictConfig) -> dict:
    validate(cfg)
    root = output_root()
    c = cfg.colorize
    manifest_path = require(Path(c.data.out_dir) / "manifest.json", "make_color_set")
    source = json.loads(manifest_path.read_text())["source"]
    fallback = source == "fallback"
    L.seed_everything(cfg.seed, workers=True)
    data = ColorDataModule(c, c.batch_size, cfg.seed)
    module = ImageToImageModule(OmegaConf.to_container(c.model, resolve=True), c.loss, c.lr, c.weight_decay)
    trainer_cfg = OmegaConf.merge(cfg.trainer, {"max_epochs": c.max_epochs})

    with start_run(cfg, "colorize", manifest_path, dataset=c.data.dataset) as run:
        module, history, best_val = fit_best(module, data, trainer_cfg, lightning_logger(cfg, run),
                                             root / c.out_dir / "colorizer.ckpt", resume=resume_folder(cfg, "colorize"),
                                             callbacks=[EarlyStopping(monitor="val_loss", patience=c.patience)]
                                             if c.patience else [])
        if not leave_process_group():
            return {}  # another DDP rank: its share of the fit is done; rank 0 writes the outputs
        mlflow.set_tag("color_source", source)

        l_in, ab = data.test_set.tensors
        result = with_gains(evaluate(module, l_in, ab, data.test_rgb))
        per_photo = {name: with_gains(evaluate(module, l_in[idx], ab[idx], data.test_rgb[idx]))
                     for name, idx in data.test_groups.items()}
        metrics = {**result, "fallback": int(fallback), "test_images": len(l_in), "train_images": len(data.train_set),
                   "best_val_loss": best_val, **history.summary(module)}
        if per_photo:
            metrics["per_photo"] = per_photo
        if len(per_photo) > 1:
            metrics["per_photo_std"] = {key: statistics.stdev(p[key] for p in per_photo.values())
                                        for key in ("psnr_gain_vs_gray", "ssim_gain_vs_gray")}
        label = "fallback photo patches" if fallback else c.data.dataset
        log.info("colorize (%s) on %d test images: %s", label, len(l_in),
                 {k: result[k] for k in ("psnr", "ssim", "ab_mae", "colorfulness")})
        for name, scores in per_photo.items():
            log.info("  test photograph %s: PSNR %.2f dB (gray %.2f), gain %+.2f dB", name, scores["psnr"]["model"],
                     scores["psnr"]["gray"], scores["psnr_gain_vs_gray"])

        write_json(root / "reports/metrics/colorize.json", metrics)
        write_csv(root / "reports/plots/colorize_loss.csv", history.rows)
        mlflow.log_metrics({k: v for k, v in flatten(metrics).items() if k != "epochs"})

        pick = torch.linspace(0, len(l_in) - 1, 12).long()  # spread over the test set (and its photographs)
        x = l_in[pick]
        grid = image_rows(root / "reports/figures/colorize_grid.png", {
            "gray": to_rgb(x, torch.zeros_like(ab[pick])),
            "predicted": to_rgb(x, module(x.to(module.device)).float().cpu()),
            f"true ({label})": data.test_rgb[pick],
        })
        for path in (grid, root / c.out_dir / "colorizer.ckpt", root / "reports/plots/colorize_loss.csv"):
            mlflow.log_artifact(str(path))
        log_network("colorizer", ColorizerModel(channels_last=uses_channels_last(module)),
                    root / c.out_dir / "colorizer.ckpt", data.test_rgb[pick[:4]].numpy(),
                    {f"test_{m}": result[m]["model"] for m in ("psnr", "ssim")})
    return metrics


if __name__ == "__main__":
    main()
