"""The spine's stages, one after the other, on tiny generated data: real Lightning, XGBoost and MLflow."""

from __future__ import annotations

import json
import math

import mlflow
import numpy as np
import pytest

from aelab.config import ConfigError
from aelab.lit.autoencoder import AutoencoderModule
from aelab.paths import MissingUpstreamError
from aelab.stages import downstream, features, pretrain
from conftest import compose_cfg, read_metrics


@pytest.mark.parametrize("model", ["simple", "deep", "conv"])
def test_spine_runs_end_to_end_on_tiny_data(tiny_raw, smoke_overrides, model):
    cfg = compose_cfg(*smoke_overrides, f"model={model}")

    metrics = pretrain.main(cfg)
    assert math.isfinite(metrics["test_mse"]) and 0 < metrics["test_mse"] < 1
    assert metrics["epochs"] == 1 and metrics["mean_epoch_seconds"] > 0
    assert metrics["train_seconds"] >= round(metrics["mean_epoch_seconds"], 1)  # the fit holds its epoch
    assert metrics["n_params"] > 0
    ckpt = tiny_raw / "models/pretrain/ae.ckpt"
    assert AutoencoderModule.load_from_checkpoint(ckpt).hparams.model_cfg["name"] == model
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ae.ckpt", "model"]  # no temporary checkpoint folders
    history = (tiny_raw / "reports/plots/pretrain_loss.csv").read_text().splitlines()
    assert history[0].startswith("epoch,epoch_seconds,train_loss,val_loss") and len(history) == 2

    feats = features.main(cfg)
    assert feats["code_dim"] == 32
    with np.load(tiny_raw / "data/features/ae.npz") as f:
        assert f["train"].shape == (160, 32) and f["test"].shape == (40, 32)
    with np.load(tiny_raw / "data/features/pca.npz") as f:
        assert f["train"].shape == (160, 32)

    results = downstream.main(cfg)
    assert set(results) == {"raw", "pca", "ae"}
    for name, m in results.items():
        assert 0 <= m["accuracy"] <= 1 and m["fit_seconds"] >= 0
    assert results["raw"]["n_features"] == 784
    assert read_metrics(tiny_raw / "reports/metrics/downstream.json") == results
    confusion = (tiny_raw / "reports/plots/confusion_ae.csv").read_text().splitlines()
    assert confusion[0] == "actual,predicted" and len(confusion) == 41
    for figure in ("pretrain_recon", "features_recon", "confusion_ae"):
        assert (tiny_raw / f"reports/figures/{figure}.png").stat().st_size > 1000

    runs = mlflow.search_runs(experiment_names=["aelab"], output_format="list")
    by_stage = {run.data.tags["stage"]: run for run in runs}
    assert set(by_stage) == {"pretrain", "features", "downstream"}
    for run in runs:
        assert run.info.status == "FINISHED"
        assert len(run.data.tags["dataset_manifest_sha256"]) == 64
        assert run.data.tags["git_commit"]
        assert run.data.params["model.name"] == model
    client = mlflow.MlflowClient()
    history = client.get_metric_history(by_stage["pretrain"].info.run_id, "val_loss")
    assert len(history) == 1  # one value per epoch
    artifacts = {a.path for a in client.list_artifacts(by_stage["pretrain"].info.run_id)}
    assert {"ae.ckpt", "pretrain_recon.png", "config.yaml"} <= artifacts
    assert "ae_accuracy" in by_stage["downstream"].data.metrics


def test_stage_without_upstream_output_names_the_stage_to_run(tiny_raw, smoke_overrides):
    cfg = compose_cfg(*smoke_overrides)
    with pytest.raises(MissingUpstreamError, match=r"models/pretrain/ae.ckpt.*dvc repro pretrain"):
        features.main(cfg)
    with pytest.raises(MissingUpstreamError, match=r"data/features/pca.npz.*dvc repro features"):
        downstream.main(cfg)


def test_pretrain_without_download_names_download(workdir, smoke_overrides):
    with pytest.raises(MissingUpstreamError, match=r"manifest.json.*dvc repro download"):
        pretrain.main(compose_cfg(*smoke_overrides))


def test_bad_config_is_rejected_before_any_work(tiny_raw, smoke_overrides):
    with pytest.raises(ConfigError, match=r"pretrain\.optim\.lr"):
        pretrain.main(compose_cfg(*smoke_overrides, "pretrain.optim.lr=-0.1"))
    assert not (tiny_raw / "models").exists()
    assert not (tiny_raw / "mlflow.db").exists()
