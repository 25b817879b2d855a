"""Noise functions, classical baselines and metrics on tiny generated images, and the denoise stage end to end."""

from __future__ import annotations

import math
from types import SimpleNamespace

import hydra
import mlflow
import pytest
import torch

from aelab.config import ConfigError, validate
from aelab.data.noise import NoiseLevelError, NoisyImageDataModule, corrupt, gaussian_filter, median_filter
from aelab.lit.image2image import ImageToImageModule
from aelab.lit.trainer import resolve_precision
from aelab.metrics import ImageQuality
from aelab.models.denoise import DenoisingAutoencoder
from aelab.stages import denoise
from conftest import compose_cfg, read_metrics


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_zero_mask_zeroes_about_p_of_the_pixels(p):
    x = torch.full((100, 1, 28, 28), 0.7)
    noisy = corrupt(x, "zero_mask", p, gen())
    assert (noisy == 0).float().mean().item() == pytest.approx(p, abs=0.01)
    assert torch.all((noisy == 0) | (noisy == x))  # untouched pixels keep their value


def test_noise_is_deterministic_with_a_seed_and_differs_across_seeds():
    x = torch.rand(8, 1, 28, 28)
    for kind in ("zero_mask", "gaussian", "salt_pepper"):
        assert torch.equal(corrupt(x, kind, 0.3, gen(1)), corrupt(x, kind, 0.3, gen(1)))
        assert not torch.equal(corrupt(x, kind, 0.3, gen(1)), corrupt(x, kind, 0.3, gen(2)))


def test_gaussian_noise_has_sigma_and_is_clipped():
    x = torch.full((50, 1, 28, 28), 0.5)
    assert (corrupt(x, "gaussian", 0.05, gen()) - x).std().item() == pytest.approx(0.05, rel=0.03)
    strong = corrupt(x, "gaussian", 0.9, gen())
    assert strong.min() == 0 and strong.max() == 1  # clipped, not wrapped or out of range


def test_salt_and_pepper_replaces_p_of_the_pixels_by_0_or_1_evenly():
    x = torch.full((100, 1, 28, 28), 0.5)
    noisy = corrupt(x, "salt_pepper", 0.2, gen())
    assert (noisy != 0.5).float().mean().item() == pytest.approx(0.2, abs=0.01)
    assert (noisy == 1).sum().item() == pytest.approx((noisy == 0).sum().item(), rel=0.05)
    assert set(noisy.unique().tolist()) == {0.0, 0.5, 1.0}


@pytest.mark.parametrize("kind, level", [("zero_mask", 1.0), ("gaussian", -0.1), ("salt_pepper", 0), ("speckle", 0.5)])
def test_noise_outside_its_range_is_refused(kind, level):
    with pytest.raises(NoiseLevelError, match=kind):
        corrupt(torch.rand(1, 1, 4, 4), kind, level, gen())


def test_training_batches_get_fresh_noise_and_val_test_fixed_noise(tiny_raw):
    data = NoisyImageDataModule(compose_cfg().data, 32, seed=0, kind="zero_mask", level=0.5)
    data.setup()
    clean, labels = next(iter(data.train_dataloader()))
    data.trainer = SimpleNamespace(training=True)
    first, target = data.on_after_batch_transfer((clean, labels), 0)
    second, _ = data.on_after_batch_transfer((clean, labels), 0)
    assert torch.equal(target, clean) and not torch.equal(first, second)
    assert (first[clean > 0] == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
    data.trainer = SimpleNamespace(training=False)
    assert data.on_after_batch_transfer((clean, labels), 0) == (clean, labels)  # validation batches: untouched

    noisy, clean_val = data.val_set.tensors
    assert torch.equal(noisy, data.fixed_noise("val")[0]) and len(clean_val) == 16  # 10% of 160
    assert torch.equal(data.test_set.tensors[0], data.fixed_noise("test")[0])
    assert not torch.equal(data.fixed_noise("test", "zero_mask", 0.2)[0], data.fixed_noise("test")[0])


def test_metric_baselines_on_tiny_images():
    clean = torch.full((4, 1, 28, 28), 0.5)
    noisy = clean.clone()
    noisy[:, :, 10, 10] = 1.0  # one isolated impulse per image
    noisy[:, :, 20, 5] = 0.0
    quality = ImageQuality(["noisy", "median", "gaussian"])
    quality.update(clean, {"noisy": noisy, "median": median_filter(noisy, 3), "gaussian": gaussian_filter(noisy, 3)})
    scores = quality.compute()
    mse = 2 * 0.25 / (28 * 28)  # two pixels off by 0.5 each
    assert scores["psnr"]["noisy"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-4)
    assert math.isinf(scores["psnr"]["median"]) and scores["ssim"]["median"] == pytest.approx(1.0)  # exact repair
    assert scores["psnr"]["noisy"] < scores["psnr"]["gaussian"] < scores["psnr"]["median"]  # blur spreads, not removes
    assert torch.equal(median_filter(clean, 5), clean) and torch.allclose(gaussian_filter(clean, 5), clean)


def test_filter_sizes_are_picked_by_validation_psnr():
    clean = torch.full((40, 1, 28, 28), 0.5)
    noisy = corrupt(clean, "salt_pepper", 0.3, gen())  # dense impulses: the bigger median window wins
    assert denoise.pick_filter_sizes(noisy, clean, [3, 5], batch_size=16) == {"median": 5, "gaussian": 5}


@pytest.mark.parametrize("group", ["default", "gpu"])
def test_denoiser_configs_validate_and_map_images_to_images(group):
    cfg = compose_cfg(f"denoise={group}")
    validate(cfg)
    model = hydra.utils.instantiate(cfg.denoise.model)
    assert isinstance(model, DenoisingAutoencoder)
    out = model(torch.rand(3, 1, 28, 28))
    assert out.shape == (3, 1, 28, 28) and 0 <= out.min() and out.max() <= 1


def test_denoise_stage_on_tiny_data(tiny_raw, smoke_overrides):
    cfg = compose_cfg(*smoke_overrides, "denoise.max_epochs=2", "denoise.batch_size=32", "denoise.model.channels=[8,8]",
                      "denoise.eval_images=20")
    metrics = denoise.main(cfg)

    for metric in ("psnr", "ssim"):
        assert set(metrics[metric]) == {"model", "noisy", "median", "gaussian"}
        assert all(math.isfinite(v) for v in metrics[metric].values())
    assert metrics["psnr_gain_vs_noisy"] == pytest.approx(metrics["psnr"]["model"] - metrics["psnr"]["noisy"])
    assert set(metrics["robustness"]) == {"zero_mask_0.3", "zero_mask_0.7"}  # the smoke profile's eval_levels
    assert metrics["images"] > 20  # the headline on the whole test set, the levels on its first eval_images
    assert all(r["images"] == 20 for r in metrics["robustness"].values())
    low, high = (metrics["robustness"][k]["psnr"]["noisy"] for k in ("zero_mask_0.3", "zero_mask_0.7"))
    assert low > high  # more noise, worse input
    assert set(metrics["filter_size"].values()) <= {3, 5} and metrics["epochs"] == 2
    assert read_metrics(tiny_raw / "reports/metrics/denoise.json") == metrics
    rows = (tiny_raw / "reports/plots/denoise_robustness.csv").read_text().splitlines()
    assert rows[0].startswith("level,psnr_model,psnr_noisy,psnr_median,psnr_gaussian,ssim_model") and len(rows) == 3
    history = (tiny_raw / "reports/plots/denoise_loss.csv").read_text()
    assert history.startswith("epoch,epoch_seconds,train_loss,val_loss")
    assert (tiny_raw / "reports/figures/denoise_grid.png").stat().st_size > 1000
    assert sorted(p.name for p in (tiny_raw / "models/denoise").iterdir()) == ["denoiser.ckpt", "model"]

    (run,) = mlflow.search_runs(experiment_names=["aelab"], output_format="list")
    assert run.data.tags["stage"] == "denoise" and run.data.params["denoise.noise"] == "zero_mask"
    assert run.data.tags["channels_last"] == "True"  # what trainer.fast and trainer.precision resolved to
    assert run.data.tags["precision"] == resolve_precision(cfg.trainer, ImageToImageModule)  # bf16 on a bf16 CPU
    assert run.data.metrics["psnr.model"] == pytest.approx(metrics["psnr"]["model"])
    client = mlflow.MlflowClient()
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == 2  # one per epoch
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"denoiser.ckpt", "denoise_grid.png", "denoise_robustness.csv", "config.yaml"} <= artifacts


@pytest.mark.parametrize("override, key", [
    ("denoise.level=1.5", "denoise.level"),
    ("denoise.eval_levels=[0.2,1.2]", "denoise.eval_levels"),
    ("denoise.noise=speckle", "denoise.noise"),
    ("denoise.filter_sizes=[4]", "denoise.filter_sizes"),
    ("data.name=cifar10", "data.name: Value error, 'cifar10' has 3-channel images"),
])
def test_bad_denoise_config_fails_before_any_work(tiny_raw, smoke_overrides, override, key):
    with pytest.raises(ConfigError, match=key):
        denoise.main(compose_cfg(*smoke_overrides, override))
    assert not (tiny_raw / "models").exists() and not (tiny_raw / "mlflow.db").exists()


def test_denoise_scores_the_headline_setting_once_when_the_sweep_covers_the_whole_test_set(tiny_raw, smoke_overrides,
                                                                                          monkeypatch):
    calls = []
    evaluate = denoise.evaluate
    monkeypatch.setattr(denoise, "evaluate", lambda *a, **k: calls.append(a[2:4]) or evaluate(*a, **k))
    cfg = compose_cfg(*smoke_overrides, "denoise.max_epochs=1", "denoise.batch_size=32", "denoise.model.channels=[8,8]",
                      "denoise.eval_levels=[0.5,0.7]", "denoise.eval_images=null")
    metrics = denoise.main(cfg)
    assert calls == [("zero_mask", 0.5), ("zero_mask", 0.7)]  # the headline (zero_mask 0.5) is not scored again
    assert metrics["robustness"]["zero_mask_0.5"]["psnr"] == metrics["psnr"]
