"""aelab.model_check on tiny data: the four stages run in-process, then every model, loaded through mlflow.pyfunc
from its folder and from the registry, reproduces its stage's test metrics; a tampered metrics file fails."""

from __future__ import annotations

import dataclasses
import json

import pytest
from test_colorize import CIFAR, color_overrides, write_photos
from test_segmentation import TINY_SEGNET, TINY_SET

from aelab import model_check
from aelab.data.catalog import DATASETS
from aelab.stages import colorize, denoise, make_color_set, make_segmentation_set, pretrain, segment
from conftest import compose_cfg

TINY = ["denoise.max_epochs=1", "denoise.batch_size=32", "denoise.model.channels=[8,8]", "denoise.eval_images=20",
        "colorize.max_epochs=1", *TINY_SET, *TINY_SEGNET, "segment.max_epochs=1"]
CHECKED = {"autoencoder": {"test_mse", "test_loss"},
           "denoiser": {f"{m}.{c}" for m in ("psnr", "ssim") for c in ("model", "noisy", "median", "gaussian")}
           | {"filter_size.median", "filter_size.gaussian", "images"},
           "colorizer": {"psnr.model", "ssim.model"},
           "segmenter": {"test_global_acc", "test_class_acc", "test_miou"}}


@pytest.fixture
def trained(tiny_raw, smoke_overrides, monkeypatch):
    """The tiny workdir after pretrain, denoise, colorize (photograph fallback) and segment: their overrides."""
    monkeypatch.setitem(DATASETS, "cifar10", dataclasses.replace(CIFAR, mirrors=()))  # offline: the fallback
    photos = write_photos(tiny_raw / "photos", n=4)
    overrides = [*smoke_overrides, *color_overrides([f"photos/{p.rsplit('/', 1)[1]}" for p in photos]), *TINY]
    cfg = compose_cfg(*overrides)
    stages = {"pretrain": pretrain.main(cfg), "denoise": denoise.main(cfg)}
    make_color_set.main(cfg)
    stages["colorize"] = colorize.main(cfg)
    make_segmentation_set.main(cfg)
    stages["segment"] = segment.main(cfg)
    return overrides, stages


def test_every_model_reproduces_its_stage_metrics_through_pyfunc(trained, capsys):
    overrides, stages = trained
    for registry in (False, True):
        assert model_check.main(["--registry", *overrides] if registry else overrides) == 0
        report = json.loads((model_check.REPORT).read_text())
        assert report["ok"] and report["source"] == ("registry" if registry else "folder")
        models = report["models"]
        assert {k: set(v["metrics"]) for k, v in models.items()} == CHECKED
        assert models["denoiser"]["uri"] == ("models:/aelab-denoiser@pipeline" if registry else "models/denoise/model")
        for kind, stage in (("autoencoder", "pretrain"), ("denoiser", "denoise"), ("colorizer", "colorize"),
                            ("segmenter", "segment")):
            for key, row in models[kind]["metrics"].items():
                assert row["stage"] == model_check.numbers(stages[stage])[key]  # what the stage itself returned
                assert row["diff"] <= 1e-6 and row["ok"], (kind, key, row)
        out = capsys.readouterr().out
        assert "denoiser     psnr.model" in out and "NO" not in out
    assert stages["denoise"]["psnr"]["model"] > 0 and 0 < stages["segment"]["test_miou"] <= 1

    metrics = json.loads(open("reports/metrics/denoise.json").read())
    metrics["psnr"]["model"] += 1e-4
    open("reports/metrics/denoise.json", "w").write(json.dumps(metrics))
    assert model_check.main(overrides) == 1
    err = capsys.readouterr().err
    assert "FAILED denoiser (models/denoise/model): psnr.model" in err and "ssim.model" not in err
    report = json.loads(model_check.REPORT.read_text())
    assert not report["ok"] and report["models"]["denoiser"]["status"] == "failed"
    assert report["models"]["denoiser"]["metrics"]["psnr.model"]["diff"] == pytest.approx(1e-4, rel=1e-3)
    assert report["models"]["segmenter"]["status"] == "ok"


def test_missing_models_are_reported_as_skipped(workdir, smoke_overrides, capsys):
    assert model_check.main(smoke_overrides) == 0
    out = capsys.readouterr().out
    for kind, stage in (("autoencoder", "pretrain"), ("denoiser", "denoise"), ("colorizer", "colorize"),
                        ("segmenter", "segment")):
        assert f"{kind:<12} skipped: no model at models/{stage}/model" in out
    report = json.loads(model_check.REPORT.read_text())
    assert {k: v["status"] for k, v in report["models"].items()} == dict.fromkeys(model_check.KINDS, "skipped")

    assert model_check.main(["--registry", *smoke_overrides]) == 0  # an empty store: nothing registered
    out = capsys.readouterr().out
    assert "segmenter    skipped: not registered: Registered Model with name=aelab-segmenter not found" in out
