"""The codes study: denoising pretraining's input noise, variants that swap the model, one row per feature set with
the keys the seed spread reads, XGBoost and the linear probe on the same rows."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml

from aelab.config import ConfigError
from aelab.lit.autoencoder import autoencoder_module
from aelab.models.autoencoders import ConvAutoencoder
from aelab.spread import stage_names
from aelab.stages import codes
from aelab.sweep import variant_configs
from conftest import compose_cfg

REPO = Path(__file__).resolve().parents[1]
CONV = ("model={_target_: aelab.models.autoencoders.ConvAutoencoder, name: conv, channels: [4, 8], code_dim: 6, "
        "dropout_input: 0.0, dropout_hidden: 0.0, norm: bn_post, init: default, code_activation: relu}")


def with_variants(cfg, **variants):
    """``cfg`` with ``codes.variants`` replaced by ``variants``."""
    cfg.codes.variants = variants
    return cfg


def test_input_noise_zeroes_input_pixels_in_training_only():
    module = autoencoder_module(compose_cfg("model.code_dim=4"), input_noise=0.5)
    seen = []
    module.model.encoder.register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
    x = torch.rand(64, 1, 28, 28) * 0.5 + 0.5  # no zero pixel of its own
    module.train()
    module.losses(x)
    zeroed = (seen[-1] == 0).float().mean().item()
    assert 0.45 < zeroed < 0.55  # about half of the pixels
    module.eval()
    module.losses(x)
    assert torch.equal(seen[-1], x)
    assert autoencoder_module(compose_cfg()).hparams.input_noise == 0.0


def test_a_mapping_override_replaces_the_model_and_scalar_overrides_merge():
    cfg = with_variants(compose_cfg(), conv=[CONV], bn=["model.norm=bn_pre"])
    configs = variant_configs(cfg, "codes", {})
    conv, bn = configs["conv"].model, configs["bn"].model
    assert "hidden" not in conv and list(conv.channels) == [4, 8] and conv.norm == "bn_post"
    assert isinstance(autoencoder_module(configs["conv"]).model, ConvAutoencoder)
    assert list(bn.hidden) == list(cfg.model.hidden) and bn.norm == "bn_pre"  # the rest of the model is kept


def test_a_bad_variant_value_is_named():
    cfg = with_variants(compose_cfg(), noisy=["codes.input_noise=1.0"])
    with pytest.raises(ConfigError, match=r"(?s)codes\.variants\.noisy: .*codes\.input_noise: Input should be less"):
        variant_configs(cfg, "codes", {})


def test_the_probe_and_xgboost_score_the_same_rows(monkeypatch):
    seen = {}

    def xgb(cfg, device, client, *arrays):
        seen["xgb"] = arrays
        return None, {"accuracy": 0.5, "macro_f1": 0.5}, None

    def probe(cfg, *arrays):
        seen["probe"] = arrays
        return 0.25

    monkeypatch.setattr(codes, "fit_and_score", xgb)
    monkeypatch.setattr(codes, "linear_probe_accuracy", probe)
    rng = np.random.default_rng(0)
    arrays = rng.random((20, 3)), rng.integers(0, 2, 20), rng.random((8, 3)), rng.integers(0, 2, 8)
    row = codes.score_features(compose_cfg(), "cpu", None, "x", *arrays)
    assert all(a is b for a, b in zip(seen["xgb"], arrays)) and all(a is b for a, b in zip(seen["probe"], arrays))
    assert row == {"features": "x", "n_features": 3, "xgb_accuracy": 0.5, "xgb_macro_f1": 0.5, "probe_accuracy": 0.25}


def test_linear_probe_separates_separable_codes():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = rng.normal(size=(300, 4)) * 0.1 + np.eye(3, 4)[y] * 50  # separable, badly scaled: standardized first
    assert codes.linear_probe_accuracy(compose_cfg(), x[:200], y[:200], x[200:], y[200:]) == 1.0


def test_codes_study_end_to_end(tiny_raw, smoke_overrides):
    cfg = with_variants(compose_cfg(*smoke_overrides, "model.code_dim=6", "codes.references=[pca,raw]",
                                    "codes.probe_max_iter=50"),
                        deep=[], noisy=["codes.input_noise=0.3"], conv=[CONV])
    rows = codes.main.__wrapped__(cfg)
    assert [r["features"] for r in rows] == ["deep", "noisy", "conv", "pca_6", "raw"]
    assert all(r["n_features"] == 6 for r in rows[:4]) and rows[4]["n_features"] == 784
    for row in rows:
        assert 0 <= row["xgb_accuracy"] <= 1 and 0 <= row["probe_accuracy"] <= 1
    assert all(r["test_mse"] > 0 for r in rows[:4]) and "test_mse" not in rows[4]
    metrics = json.loads((tiny_raw / "reports/metrics/codes.json").read_text())
    assert set(metrics) == {"deep", "noisy", "conv", "pca_6", "raw", "provenance"}
    assert metrics["deep"]["xgb_accuracy"] == rows[0]["xgb_accuracy"]  # flat keys codes.deep.xgb_accuracy in the spread
    table = (tiny_raw / "reports/codes.md").read_text()
    assert table.startswith("| features | n_features | test_mse |") and "| raw | 784 | — |" in table
    children = mlflow.search_runs(search_all_experiments=True, filter_string="tags.stage = 'codes'")
    assert set(children["tags.variant"].dropna()) == {"deep", "noisy", "conv"}


def test_the_spread_names_a_study_by_its_stage():
    assert stage_names(["studies/dvc.yaml:codes", "classify"]) == ["codes", "classify"]
    study = yaml.safe_load((REPO / "studies/dvc.yaml").read_text())["stages"]["codes"]
    assert study["wdir"] == ".." and "reports/metrics/codes.json" in str(study["metrics"])
