"""Each regularizer of the lecture: penalty values, module order, init scale, optimizers, config checks."""

from __future__ import annotations

import math

import hydra
import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from aelab.config import ConfigError, validate
from aelab.lit.autoencoder import AutoencoderModule, autoencoder_module
from aelab.models.autoencoders import DenseAutoencoder
from aelab.models.penalties import activity_l1, code_sparsity, kl_sparsity, weight_l1
from aelab.stages.regularization import study_configs
from conftest import compose_cfg


def test_kl_sparsity_is_zero_at_target_and_grows_away_from_it():
    at_target = torch.full((8, 5), 0.05)
    assert kl_sparsity(at_target, 0.05).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_sparsity(torch.full((8, 5), 0.2), 0.05) > kl_sparsity(torch.full((8, 5), 0.1), 0.05) > 0


def test_activity_l1_grows_with_activations():
    code = torch.rand(4, 10)
    assert activity_l1(code) == pytest.approx(code.sum(1).mean().item())
    assert activity_l1(2 * code) == pytest.approx(2 * activity_l1(code).item())


def test_weight_l1_counts_weights_not_biases():
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    assert weight_l1(net).item() == pytest.approx(net[0].weight.abs().sum().item())


def test_code_sparsity_measures():
    stats = code_sparsity(torch.tensor([[0.0, 0.0, 0.5, 1.5]]))
    assert stats == {"mean_activation": 0.5, "mean_abs_activation": 0.5, "frac_near_zero": 0.5}


def _types(module: nn.Module) -> list[type]:
    return [type(m) for m in module]


def test_batch_norm_placement_changes_module_order():
    pre = DenseAutoencoder(8, [16], norm="bn_pre").encoder
    post = DenseAutoencoder(8, [16], norm="bn_post").encoder
    assert _types(pre)[1:4] == [nn.Linear, nn.BatchNorm1d, nn.ReLU]
    assert _types(post)[1:4] == [nn.Linear, nn.ReLU, nn.BatchNorm1d]
    assert nn.BatchNorm1d not in _types(DenseAutoencoder(8, [16]).encoder)


def test_dropout_rates_and_train_only_behaviour():
    net = DenseAutoencoder(8, [16], dropout_input=0.1, dropout_hidden=0.5)
    rates = [m.p for m in net.modules() if isinstance(m, nn.Dropout)]
    assert rates == [0.1, 0.5, 0.5]  # input, encoder hidden, decoder hidden
    x = torch.rand(4, 1, 28, 28)
    net.eval()
    assert torch.equal(net(x), net(x))
    net.train()
    assert not torch.equal(net(x), net(x))


@pytest.mark.parametrize("init, gain", [("xavier", None), ("he", math.sqrt(2))])
def test_init_schemes_set_the_expected_weight_scale(init, gain):
    torch.manual_seed(0)
    layer = DenseAutoencoder(256, [], input_shape=(1024,), init=init).encoder[1]
    fan_in, fan_out = 1024, 256
    expected = gain / math.sqrt(fan_in) if gain else math.sqrt(2 / (fan_in + fan_out))
    assert layer.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert torch.count_nonzero(layer.bias) == 0


def test_penalties_enter_the_training_loss():
    module = AutoencoderModule({"_target_": "aelab.models.autoencoders.DenseAutoencoder", "code_dim": 8,
                                "code_activation": "sigmoid"},
                               penalty={"activity_l1": 0.1, "sparsity_kl": 1.0, "l1_weight": 1e-3})
    x = torch.rand(16, 1, 28, 28)
    code = module.model.encode(x)
    expected = 0.1 * activity_l1(code) + kl_sparsity(code, 0.05) + 1e-3 * weight_l1(module.model)
    assert module.penalty_loss(code).item() == pytest.approx(expected.item(), rel=1e-5)
    plain = AutoencoderModule({"_target_": "aelab.models.autoencoders.DenseAutoencoder", "code_dim": 8})
    assert plain.penalty_loss(code).item() == 0


@pytest.mark.parametrize("optim, opt_type, sched_type", [
    ({"name": "sgd", "momentum": 0.95}, torch.optim.SGD, None),
    ({"name": "adam", "betas": [0.8, 0.99], "schedule": "step"}, torch.optim.Adam, torch.optim.lr_scheduler.StepLR),
    ({"schedule": "cosine"}, torch.optim.Adam, torch.optim.lr_scheduler.CosineAnnealingLR),
    ({"schedule": "onecycle"}, torch.optim.Adam, torch.optim.lr_scheduler.OneCycleLR),
])
def test_optimizer_and_schedule_from_config(optim, opt_type, sched_type, tiny_raw, smoke_overrides):
    from aelab.data.images import ImageDataModule

    cfg = compose_cfg(*smoke_overrides)
    module = AutoencoderModule(OmegaConf.to_container(cfg.model), optim=optim)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, ImageDataModule(cfg.data, 16, 0))
    opt = trainer.optimizers[0]
    assert isinstance(opt, opt_type)
    if "momentum" in optim:
        assert opt.defaults["momentum"] == 0.95
    if "betas" in optim:
        assert opt.defaults["betas"] == (0.8, 0.99)
    schedulers = [c.scheduler for c in trainer.lr_scheduler_configs]
    assert [type(s) for s in schedulers] == ([sched_type] if sched_type else [])


@pytest.mark.parametrize("experiment", ["sparse_l1", "sparse_kl", "overcomplete", "lecture_recipe"])
def test_experiments_compose_into_valid_configs(experiment):
    cfg = compose_cfg(f"experiment={experiment}")
    validate(cfg)
    net = hydra.utils.instantiate(cfg.model)
    assert net.encode(torch.rand(2, 1, 28, 28)).shape == (2, cfg.model.code_dim)
    assert autoencoder_module(cfg).penalty == OmegaConf.to_container(cfg.pretrain.penalty)


@pytest.mark.parametrize("overrides, key", [
    (["model.dropout_hidden=1.0"], "model.dropout_hidden"),
    (["model.dropout_input=-0.1"], "model.dropout_input"),
    (["pretrain.penalty.activity_l1=-1e-5"], "pretrain.penalty.activity_l1"),
    (["pretrain.optim.weight_decay=-1"], "pretrain.optim.weight_decay"),
    (["model.norm=layer"], "model.norm"),
    (["model.init=orthogonal"], "model.init"),
    (["regularization.norm=bn"], "regularization.norm"),
    (["pretrain.optim.betas=[0.9,1.5]"], "pretrain.optim.betas"),
    (["pretrain.penalty.sparsity_kl=0.1"], "pretrain.penalty.sparsity_kl"),
])
def test_bad_regularization_values_are_rejected_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_cfg(*overrides))


def test_the_study_baseline_has_no_batch_norm_whatever_the_default_model_has():
    cfg = compose_cfg()
    assert cfg.model.norm == "bn_pre"  # the default AE (the codes study's pick)
    configs = study_configs(cfg)
    assert configs["baseline"].model.norm == "none" and configs["dropout_10_50"].model.norm == "none"
    assert configs["bn_pre"].model.norm == "bn_pre" and configs["bn_post"].model.norm == "bn_post"
    assert configs["baseline"].data.train_limit == cfg.regularization.train_limit
