"""Stage denoise: a convolutional denoising autoencoder on the downloaded images, against classical baselines.

Every training batch is corrupted afresh with ``denoise.noise`` at ``denoise.level``. The whole held-out test set is
scored at that noise (the headline), and its first ``denoise.eval_images`` across ``denoise.eval_levels`` of
``denoise.eval_noise`` (robustness), each time next to two baselines: the noisy input as is, and median and Gaussian
filters whose sizes are picked on the validation split for that noise. PSNR and SSIM are per-image means against the
clean image.

Outputs: ``models/denoise/denoiser.ckpt``, ``reports/metrics/denoise.json``, ``reports/plots/denoise_loss.csv``,
``reports/plots/denoise_robustness.csv``, ``reports/figures/denoise_grid.png``; one MLflow run with all of them.
"""

from __future__ import annotations

import logging
import time

import hydra
import lightning as L
import mlflow
import torch
from omegaconf import DictConfig, OmegaConf
from torchmetrics.image import PeakSignalNoiseRatio

from aelab.config import validate
from aelab.data.images import raw_dir
from aelab.data.noise import CLASSICAL_FILTERS, NoisyImageDataModule
from aelab.distributed import leave_process_group
from aelab.figures import image_rows
from aelab.lit.image2image import ImageToImageModule
from aelab.lit.trainer import fit_best, resume_folder
from aelab.metrics import ImageQuality
from aelab.paths import require, write_csv, write_json
from aelab.pyfunc import DenoiserModel, log_network, uses_channels_last
from aelab.stages import CONF_DIR, output_root, publishes_outputs
from aelab.tracking import flatten, lightning_logger, start_run

log = logging.getLogger(__name__)

TUNE_IMAGES = 2000  # validation images used to pick each filter's size


@torch.inference_mode()
def pick_filter_sizes(noisy: torch.Tensor, clean: torch.Tensor, sizes: list[int], batch_size: int) -> dict[str, int]:
    """For each classical filter, the size in ``sizes`` with the best mean PSNR on (noisy, clean)."""
    psnr = {(name, size): PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3)).to(clean.device)
            for name in CLASSICAL_FILTERS for size in sizes}
    for start in range(0, len(clean), batch_size):
        x, y = noisy[start:start + batch_size], clean[start:start + batch_size]
        for (name, size), meter in psnr.items():
            meter.update(CLASSICAL_FILTERS[name](x, size), y)
    return {name: max(sizes, key=lambda size: float(psnr[(name, size)].compute())) for name in CLASSICAL_FILTERS}


@torch.inference_mode()
def score(module: ImageToImageModule, noisy: torch.Tensor, clean: torch.Tensor, filter_sizes: dict[str, int],
          batch_size: int) -> dict[str, dict[str, float]]:
    """PSNR and SSIM against ``clean`` of the model's output, the noisy input and each filter's output (on the
    module's device)."""
    quality = ImageQuality(["model", "noisy", *filter_sizes], device=module.device)
    for start in range(0, len(clean), batch_size):
        x, y = (t[start:start + batch_size].to(module.device) for t in (noisy, clean))
        outputs = {"model": module(x).float(), "noisy": x}
        outputs.update({name: CLASSICAL_FILTERS[name](x, size) for name, size in filter_sizes.items()})
        quality.update(y, outputs)
    return quality.compute()


def evaluate(module: ImageToImageModule, data: NoisyImageDataModule, kind: str, level: float,
             cfg: DictConfig, images: int | None = None) -> dict:
    """Scores on the test set (its first ``images``; all when None) at one noise; the filters' sizes are tuned on the
    validation split first (both on the module's device)."""
    sizes = pick_filter_sizes(*(t[:TUNE_IMAGES].to(module.device) for t in data.fixed_noise("val", kind, level)),
                              list(cfg.denoise.filter_sizes), 500)
    noisy, clean = (t[:images] for t in data.fixed_noise("test", kind, level))
    return {**score(module, noisy, clean, sizes, 500), "filter_size": sizes, "images": len(clean)}


def gains(result: dict) -> dict[str, float]:
    """How much the model beats the noisy input and the better classical filter, in PSNR (dB) and SSIM."""
    out = {}
    for metric in ("psnr", "ssim"):
        values = result[metric]
        best_filter = max(values[name] for name in CLASSICAL_FILTERS)
        out[f"{metric}_gain_vs_noisy"] = values["model"] - values["noisy"]
        out[f"{metric}_gain_vs_best_filter"] = values["model"] - best_filter
    return out


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
@publishes_outputs
def main(cfg: DictConfig) -> dict:
    validate(cfg)
    root = output_root()
    manifest = require(raw_dir(cfg.data) / "manifest.json", "download")
    p = cfg.denoise
    L.seed_everything(cfg.seed, workers=True)
    data = NoisyImageDataModule(cfg.data, p.batch_size, cfg.seed, p.noise, p.level)
    module = ImageToImageModule(OmegaConf.to_container(p.model, resolve=True), p.loss, p.lr, p.weight_decay)
    trainer_cfg = OmegaConf.merge(cfg.trainer, {"max_epochs": p.max_epochs})

    with start_run(cfg, "denoise", manifest) as run:
        module, history, best_val = fit_best(module, data, trainer_cfg, lightning_logger(cfg, run),
                                             root / p.out_dir / "denoiser.ckpt", resume=resume_folder(cfg, "denoise"))
        if not leave_process_group():
            return {}  # another DDP rank: its share of the fit is done; rank 0 writes the outputs
        start = time.perf_counter()
        headline = evaluate(module, data, p.noise, p.level, cfg)
        whole = (p.eval_images or headline["images"]) >= headline["images"]  # the sweep scores every test image
        robustness = {level: headline if whole and (p.eval_noise, level) == (p.noise, p.level)  # scored once
                      else evaluate(module, data, p.eval_noise, level, cfg, p.eval_images)
                      for level in dict.fromkeys(p.eval_levels)}
        metrics = {**headline, **gains(headline),
                   "robustness": {f"{p.eval_noise}_{level:g}": result for level, result in robustness.items()},
                   "best_val_loss": best_val,
                   **history.summary(module), "eval_seconds": round(time.perf_counter() - start, 1)}
        log.info("denoise %s %g on test: PSNR %s, SSIM %s; model beats the noisy input by %.2f dB and the best "
                 "filter by %.2f dB", p.noise, p.level, headline["psnr"], headline["ssim"],
                 metrics["psnr_gain_vs_noisy"], metrics["psnr_gain_vs_best_filter"])
        if metrics["psnr_gain_vs_best_filter"] <= 0 or metrics["psnr_gain_vs_noisy"] <= 0:
            log.warning("the denoiser does not beat every baseline at its training noise")

        write_json(root / "reports/metrics/denoise.json", metrics)
        write_csv(root / "reports/plots/denoise_loss.csv", history.rows)
        write_csv(root / "reports/plots/denoise_robustness.csv",
                  [{"level": level, **{f"{m}_{name}": value for m in ("psnr", "ssim")
                                       for name, value in result[m].items()}}
                   for level, result in robustness.items()])
        mlflow.log_metrics({k: v for k, v in flatten(metrics).items() if k != "epochs"})

        noisy, clean = (t[:12] for t in data.fixed_noise("test"))
        best = max(CLASSICAL_FILTERS, key=lambda name: headline["psnr"][name])
        size = headline["filter_size"][best]
        grid = image_rows(root / "reports/figures/denoise_grid.png", {
            f"noisy ({p.noise} {p.level:g})": noisy,
            "denoised": module(noisy.to(module.device)),
            f"{best} {size}x{size}": CLASSICAL_FILTERS[best](noisy, size),
            "clean": clean,
        })
        for path in (grid, root / p.out_dir / "denoiser.ckpt", root / "reports/plots/denoise_loss.csv",
                     root / "reports/plots/denoise_robustness.csv"):
            mlflow.log_artifact(str(path))
        log_network("denoiser", DenoiserModel(channels_last=uses_channels_last(module)),
                    root / p.out_dir / "denoiser.ckpt", noisy[:4].numpy(), {f"test_{m}": headline[m]["model"] for m in ("psnr", "ssim")})
    return metrics


if __name__ == "__main__":
    main()
