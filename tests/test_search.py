"""The lecture's LR/momentum search: selection on a toy problem with a known optimum, and the real stages."""

from __future__ import annotations

import json
import math

import mlflow
import pytest
import torch

from aelab.search import log_grid, run_search, short_training_loss
from aelab.stages import lr_search, momentum_search
from aelab.stages.momentum_search import with_momentum
from conftest import compose_cfg


def gradient_descent_loss(lr: float, steps: int = 5) -> float:
    """Loss of w²/2 after ``steps`` of gradient descent from w=1: (1-lr)^(2·steps)/2, least at lr = 1."""
    w = 1.0
    for _ in range(steps):
        w -= lr * w
        if abs(w) > 1e6:
            return math.inf
    return w * w / 2


def test_log_grid_spans_the_range_on_a_log_scale():
    grid = log_grid(1e-5, 1.0, 100)
    assert len(grid) == 100 and grid[0] == pytest.approx(1e-5) and grid[-1] == pytest.approx(1.0)
    ratios = grid[1:] / grid[:-1]
    assert ratios.min() == pytest.approx(ratios.max())


def test_search_picks_the_known_minimum_and_counts_divergence(workdir):
    lrs = log_grid(1e-3, 100.0, 51)  # contains 1.0; lr > 2 diverges
    mlflow.set_tracking_uri(f"sqlite:///{workdir}/mlflow.db")
    mlflow.set_experiment("toy")  # not the experiment id an earlier test left active in another store
    with mlflow.start_run():
        result = run_search("toy", list(lrs), gradient_descent_loss, lrs, "learning rate", "loss", workdir)
    assert lrs[result["best_index"]] == pytest.approx(1.0)
    assert result["best_loss"] == 0.0
    assert result["n_diverged"] == sum(gradient_descent_loss(lr) == math.inf for lr in lrs) > 0
    rows = (workdir / "reports/plots/toy.csv").read_text().splitlines()
    assert rows[0] == "x,log10_x,val_loss" and len(rows) == 52
    assert (workdir / "reports/figures/toy.png").stat().st_size > 1000


def test_short_training_is_deterministic_and_flags_divergence():
    cfg = compose_cfg("model=simple", "search.batch_size=16")
    x = torch.rand(64, 1, 28, 28)
    adam = {"name": "adam", "lr": 1e-2, "betas": [0.9, 0.999], "weight_decay": 0.0}
    first = short_training_loss(cfg, adam, x, x[:16], n_batches=6)
    assert first == short_training_loss(cfg, adam, x, x[:16], n_batches=6)
    assert first < short_training_loss(cfg, {**adam, "lr": 1e-6}, x, x[:16], n_batches=6)
    sgd = {"name": "sgd", "lr": 1e6, "momentum": 0.9, "weight_decay": 0.0}
    assert short_training_loss(cfg, sgd, x, x[:16], n_batches=6) > 10 * first
    assert short_training_loss(cfg, {**sgd, "lr": math.inf}, x, x[:16], n_batches=6) == math.inf  # NaN weights


def test_momentum_is_sgd_momentum_or_adam_beta1():
    assert with_momentum({"name": "sgd", "momentum": 0.9}, 0.99)["momentum"] == 0.99
    assert with_momentum({"name": "adam", "betas": [0.9, 0.999]}, 0.95)["betas"] == [0.95, 0.999]


def test_search_stages_on_tiny_data(tiny_raw, smoke_overrides):
    cfg = compose_cfg(*smoke_overrides, "search.train_limit=64", "search.val_limit=16", "search.batch_size=16",
                      "search.n_lr=5", "search.lr_batches=3", "search.n_momentum=4")
    with pytest.raises(FileNotFoundError, match="dvc repro lr_search"):
        momentum_search.main(cfg)
    lr = lr_search.main(cfg)
    assert lr["n_candidates"] == 5 and lr["best_lr"] in log_grid(1e-5, 1.0, 5)
    momentum = momentum_search.main(cfg)
    assert momentum["lr"] == lr["best_lr"] and momentum["n_batches"] == 4  # one epoch of 64 images
    assert 0.9 <= momentum["best_momentum"] <= 0.999
    assert json.loads((tiny_raw / "reports/metrics/momentum_search.json").read_text()) == momentum
    history = mlflow.MlflowClient().get_metric_history(
        mlflow.search_runs(experiment_names=["aelab"], filter_string="tags.stage = 'lr_search'",
                           output_format="list")[0].info.run_id, "val_loss")
    assert len(history) == 5
