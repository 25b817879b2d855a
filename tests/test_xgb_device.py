"""XGBoost's device: auto picks the GPU only where torch sees one and xgboost has CUDA; a forced cuda that cannot run
fails before any work, naming the key."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import xgboost
from xgboost import XGBClassifier

from aelab.config import ConfigError, validate
from aelab.stages import downstream, regularization, tabular
from aelab.xgb import xgb_device
from conftest import compose_cfg

KEYS = ["downstream.device", "regularization.xgb_device", "tabular.xgb.device"]


@pytest.fixture
def machine(monkeypatch):
    """``machine(gpu, cuda_build)``: what torch and xgboost report, faked."""
    def fake(gpu: bool, cuda_build: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
        monkeypatch.setattr(xgboost, "build_info", lambda: {"USE_CUDA": cuda_build})
    return fake


@pytest.mark.parametrize("cuda_build", [True, False])
def test_auto_and_cpu_resolve_to_cpu_without_a_gpu(machine, cuda_build):
    machine(gpu=False, cuda_build=cuda_build)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert xgb_device("auto", "downstream.device") == "cpu"
        assert xgb_device("cpu", "downstream.device") == "cpu"


def test_auto_picks_cuda_only_when_the_gpu_is_there_and_xgboost_can_use_it(machine):
    machine(gpu=True, cuda_build=True)
    assert xgb_device("auto", "downstream.device") == "cuda"
    assert xgb_device("cuda", "downstream.device") == "cuda"
    assert xgb_device("cpu", "downstream.device") == "cpu"

    machine(gpu=True, cuda_build=False)
    with pytest.warns(UserWarning, match=r"downstream\.device=auto: a CUDA GPU is present but xgboost .* without CUDA"):
        assert xgb_device("auto", "downstream.device") == "cpu"


@pytest.mark.parametrize("gpu, why", [(False, "torch sees no CUDA GPU"), (True, "was built without CUDA")])
def test_forcing_cuda_that_cannot_run_fails_naming_the_key(machine, gpu, why):
    machine(gpu=gpu, cuda_build=not gpu)
    with pytest.raises(ConfigError, match=rf"^tabular\.xgb\.device=cuda, but .*{why}.*tabular\.xgb\.device=cpu"):
        xgb_device("cuda", "tabular.xgb.device")


@pytest.mark.parametrize("stage, key", zip([downstream, regularization, tabular], KEYS))
def test_each_stage_fails_on_forced_cuda_before_any_work(machine, workdir, stage, key):
    """No data, no MLflow run, no outputs: the device check comes right after the config check."""
    machine(gpu=False, cuda_build=True)
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}=cuda"):
        stage.main(compose_cfg(f"{key}=cuda"))
    assert list(workdir.iterdir()) == []


@pytest.mark.parametrize("key", KEYS)
def test_device_keys_are_validated(key):
    cfg = compose_cfg(f"{key}=gpu")
    with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')}: Input should be 'auto', 'cpu' or 'cuda'"):
        validate(cfg)


@pytest.mark.skipif(not torch.cuda.is_available() or not xgboost.build_info().get("USE_CUDA"),
                    reason="needs a CUDA GPU and a CUDA build of xgboost")
def test_auto_trains_on_the_gpu():
    """xgboost itself falls back to the CPU when it finds no GPU: its booster says where it really trained."""
    x = np.random.default_rng(0).random((200, 5)).astype(np.float32)
    clf = XGBClassifier(n_estimators=3, tree_method="hist", device=xgb_device("auto", "downstream.device"))
    clf.fit(x, (x[:, 0] > 0.5).astype(int))
    assert json.loads(clf.get_booster().save_config())["learner"]["generic_param"]["device"].startswith("cuda")
