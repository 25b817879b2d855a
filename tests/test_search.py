"""The lecture's LR/momentum search: selection on a toy problem with a known optimum, the vectorised ensemble
against the sequential reference, and the real stages."""

from __future__ import annotations

import math

import mlflow
import numpy as np
import pytest
import torch

from aelab.config import ConfigError, validate
from aelab.data.images import to_tensor
from aelab.search import (CPU_CHUNK, chunk_size, ensemble_training_losses, log_grid, run_search, search_losses,
                          short_training_loss, vectorizes)
from aelab.stages import lr_search, momentum_search
from aelab.stages.momentum_search import with_momentum
from conftest import compose_cfg, make_tiny_images, read_metrics

ADAM = {"name": "adam", "lr": 1e-2, "betas": [0.9, 0.999], "weight_decay": 0.0}
SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}
CONV_BN_DROPOUT = ("model=conv", "model.channels=[4,8]", "model.norm=bn_pre", "model.dropout_hidden=0.2")


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
        result = run_search("toy", [gradient_descent_loss(lr) for lr in lrs], lrs, "learning rate", "loss", workdir)
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


def toy_images() -> tuple[torch.Tensor, torch.Tensor]:
    """64 training and 32 validation images of the tiny generated set (bright bands on noise)."""
    x = to_tensor(make_tiny_images(96, seed=0)[0])
    return x[:64], x[64:]


def both_paths(cfg, optims: list[dict], n_batches: int = 6) -> tuple[list[float], list[float]]:
    """Validation losses of ``optims`` trained one by one and as one ensemble."""
    x_train, x_val = toy_images()
    sequential = [short_training_loss(cfg, optim, x_train, x_val, n_batches) for optim in optims]
    return sequential, ensemble_training_losses(cfg, optims, x_train, x_val, n_batches)


@pytest.mark.parametrize("optim, lr_range, overrides", [
    (ADAM, (1e-4, 1.0), ()),
    (SGD, (1e-2, 100.0), ()),
    ({**ADAM, "weight_decay": 1e-2}, (1e-4, 1.0), ("pretrain.penalty.l1_weight=1e-4",)),
    ({**SGD, "weight_decay": 1e-2}, (1e-2, 100.0), ("pretrain.penalty.activity_l1=1e-3",)),
    (SGD, (1e-2, 10.0), CONV_BN_DROPOUT),  # stacked running stats; one dropout mask for all, as in the loop
], ids=["adam", "sgd_momentum", "adam_l2_l1", "sgd_l2_activity", "conv_bn_dropout"])
def test_vectorized_search_matches_the_sequential_one(optim, lr_range, overrides):
    cfg = compose_cfg("model=simple", "search.batch_size=16", *overrides)
    sequential, vectorized = both_paths(cfg, [{**optim, "lr": float(lr)} for lr in log_grid(*lr_range, 6)])
    assert np.argmin(vectorized) == np.argmin(sequential) not in (0, 5)  # a minimum inside the range
    np.testing.assert_allclose(vectorized, sequential, rtol=1e-4)


@pytest.mark.parametrize("optim", [ADAM, SGD], ids=["adam", "sgd"])
def test_a_diverging_candidate_is_inf_and_leaves_the_others_alone(optim):
    cfg = compose_cfg("model=simple", "search.batch_size=16")
    optims = [{**optim, "lr": lr} for lr in (1e-2, 1e30, 3e-2)]
    sequential, vectorized = both_paths(cfg, optims)
    assert sequential[1] == vectorized[1] == math.inf
    np.testing.assert_allclose(vectorized[::2], sequential[::2], rtol=1e-6)
    x_train, x_val = toy_images()
    assert vectorized[::2] == pytest.approx(ensemble_training_losses(cfg, optims[::2], x_train, x_val, 6), rel=1e-6)


def test_vectorized_momentum_search_over_adam_beta1_matches_the_sequential_one():
    cfg = compose_cfg("model=simple", "search.batch_size=16")
    optims = [with_momentum({**ADAM, "lr": 0.03}, 1 - v) for v in log_grid(1e-3, 0.5, 6)]
    sequential, vectorized = both_paths(cfg, optims, n_batches=4)  # one epoch of 64 images
    assert np.argmin(vectorized) == np.argmin(sequential)
    np.testing.assert_allclose(vectorized, sequential, rtol=1e-4)


def test_search_losses_trains_in_chunks_or_one_by_one():
    x_train, x_val = toy_images()
    optims = [{**ADAM, "lr": float(lr)} for lr in log_grid(1e-4, 1.0, 5)]
    chunked, how = search_losses(compose_cfg("model=simple", "search.batch_size=16", "search.chunk=2"), optims,
                                 x_train, x_val, 3)
    assert how == {"vectorized": True, "device": "cpu"}
    one_by_one, how = search_losses(compose_cfg("model=simple", "search.batch_size=16", "search.vectorize=false"),
                                    optims, x_train, x_val, 3)
    assert how == {"vectorized": False, "device": "cpu"}
    np.testing.assert_allclose(chunked, one_by_one, rtol=1e-4)


@pytest.mark.parametrize("overrides, expected", [
    ((), True),
    (CONV_BN_DROPOUT, True),
    (("model._target_=aelab.models.denoise.DenoisingAutoencoder",), False),  # not checked under vmap
    (("model._target_=aelab.models.denoise.DenoisingAutoencoder", "search.vectorize=true"), True),
    (("search.vectorize=false",), False),
])
def test_auto_vectorizes_the_models_checked_against_the_loop(overrides, expected):
    assert vectorizes(compose_cfg(*overrides)) is expected


def test_auto_loops_over_candidates_too_big_for_a_cpu_ensemble():
    cfg = compose_cfg("search.subject=classifier")
    assert vectorizes(cfg, torch.device("cpu"), 1_900_000) is False
    assert vectorizes(cfg, torch.device("cpu"), 100_000) is True
    assert vectorizes(cfg, torch.device("cuda"), 1_900_000) is True


def test_auto_chunks_are_all_candidates_on_a_gpu_and_cache_sized_on_the_cpu():
    assert chunk_size(compose_cfg(), 100, torch.device("cuda")) == 100
    assert chunk_size(compose_cfg(), 100, torch.device("cpu")) == CPU_CHUNK < 100
    assert chunk_size(compose_cfg("search.chunk=7"), 100, torch.device("cuda")) == 7


@pytest.mark.parametrize("override", ["search.vectorize=maybe", "search.vectorize=1", "search.chunk=0",
                                      "search.chunk=all"])
def test_search_switches_are_validated(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        validate(compose_cfg(override))


def test_momentum_is_sgd_momentum_or_adam_beta1():
    assert with_momentum({"name": "sgd", "momentum": 0.9}, 0.99)["momentum"] == 0.99
    assert with_momentum({"name": "adam", "betas": [0.9, 0.999]}, 0.95)["betas"] == [0.95, 0.999]


def test_search_stages_on_tiny_data(tiny_raw, smoke_overrides):
    cfg_overrides = [*smoke_overrides, "search.train_limit=64", "search.val_limit=16", "search.batch_size=16",
                     "search.n_lr=5", "search.lr_batches=3", "search.n_momentum=4"]
    cfg = compose_cfg(*cfg_overrides)
    with pytest.raises(FileNotFoundError, match="dvc repro lr_search"):
        momentum_search.main(cfg)
    lr = lr_search.main(cfg)
    assert lr["n_candidates"] == 5 and lr["best_lr"] in log_grid(1e-5, 1.0, 5)
    momentum = momentum_search.main(cfg)
    assert lr["vectorized"] is momentum["vectorized"] is True and lr["device"] == momentum["device"] == "cpu"
    assert momentum["lr"] == lr["best_lr"] and momentum["n_batches"] == 4  # one epoch of 64 images
    assert 0.9 <= momentum["best_momentum"] <= 0.999
    assert read_metrics(tiny_raw / "reports/metrics/momentum_search.json") == momentum
    history = mlflow.MlflowClient().get_metric_history(
        mlflow.search_runs(experiment_names=["aelab"], filter_string="tags.stage = 'lr_search'",
                           output_format="list")[0].info.run_id, "val_loss")
    assert len(history) == 5
    sequential = lr_search.main(compose_cfg(*cfg_overrides, "search.vectorize=false"))
    assert sequential["vectorized"] is False and sequential["best_lr"] == lr["best_lr"]
