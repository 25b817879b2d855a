"""Model shapes, the seeded split, the device/precision choice."""

from __future__ import annotations

import hydra
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from aelab.data.images import split_indices, to_tensor
from aelab.lit.autoencoder import AutoencoderModule
from aelab.lit.trainer import resolve_precision
from conftest import compose_cfg


@pytest.mark.parametrize("model", ["simple", "deep", "conv"])
def test_autoencoder_shapes(model):
    net = hydra.utils.instantiate(compose_cfg(f"model={model}").model)
    x = torch.rand(5, 1, 28, 28)
    assert net.encode(x).shape == (5, 32)
    assert net(x).shape == x.shape


def test_deep_autoencoder_layer_sizes_mirror():
    net = hydra.utils.instantiate(compose_cfg("model=deep").model)
    sizes = [(m.in_features, m.out_features) for m in net.modules() if isinstance(m, nn.Linear)]
    assert sizes == [(784, 128), (128, 64), (64, 32), (32, 64), (64, 128), (128, 784)]


def test_code_dim_override_changes_the_code():
    net = hydra.utils.instantiate(compose_cfg("model=conv", "model.code_dim=16").model)
    assert net.encode(torch.rand(2, 1, 28, 28)).shape == (2, 16)


@pytest.mark.parametrize("loss", ["bce", "mse"])
def test_loss_decreases_on_one_batch(loss):
    torch.manual_seed(0)
    module = AutoencoderModule(OmegaConf.to_container(compose_cfg("model=simple").model), loss=loss, optim={"lr": 1e-2})
    x = torch.rand(16, 1, 28, 28).round()
    opt = module.configure_optimizers()
    losses = []
    for _ in range(20):
        loss_value = module.reconstruction_loss(module.model(x), x)
        opt.zero_grad()
        loss_value.backward()
        opt.step()
        losses.append(loss_value.item())
    assert losses[-1] < 0.8 * losses[0]


def test_split_is_seeded_disjoint_and_complete():
    train, val = split_indices(1000, 0.1, seed=3)
    assert len(val) == 100 and len(train) == 900
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(range(1000))
    again, _ = split_indices(1000, 0.1, seed=3)
    other, _ = split_indices(1000, 0.1, seed=4)
    assert np.array_equal(train, again) and not np.array_equal(train, other)


def test_to_tensor_scales_to_unit_range():
    x = to_tensor(np.array([[[0, 255]]], dtype=np.uint8))
    assert x.shape == (1, 1, 1, 2) and x.dtype == torch.float32 and x.max() == 1.0


def test_precision_auto_is_fp32_on_cpu_and_explicit_values_pass_through():
    assert resolve_precision(OmegaConf.create({"precision": "auto", "accelerator": "cpu"})) == "32-true"
    assert resolve_precision(OmegaConf.create({"precision": "16-mixed", "accelerator": "auto"})) == "16-mixed"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_training_step_in_bf16():
    cfg = compose_cfg("model=conv")
    assert resolve_precision(cfg.trainer) == "bf16-mixed"  # a module without a measured cuda_precision
    module = AutoencoderModule(OmegaConf.to_container(cfg.model)).cuda()
    x = torch.rand(8, 1, 28, 28, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = module.reconstruction_loss(module.model(x), x)
    loss.backward()
    assert torch.isfinite(loss)
