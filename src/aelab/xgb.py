"""Where XGBoost trains: the one place that turns a stage's device setting (auto, cpu, cuda) into XGBoost's."""

from __future__ import annotations

import warnings

import torch
import xgboost

from aelab.config import ConfigError


def xgb_device(setting: str, key: str) -> str:
    """XGBoost's ``device`` (``cpu`` or ``cuda``) for the config value ``setting`` held at ``key``.

    ``auto`` takes the GPU when torch sees one and this xgboost was built with CUDA, else the CPU (warning when a GPU
    is there but xgboost cannot use it). A forced ``cuda`` that cannot run fails at once, naming ``key``: xgboost
    itself would only warn and fall back to the CPU.
    """
    if setting == "cpu":
        return "cpu"
    gpu, built = torch.cuda.is_available(), bool(xgboost.build_info().get("USE_CUDA"))
    if gpu and built:
        return "cuda"
    if setting == "cuda":
        why = f"xgboost {xgboost.__version__} was built without CUDA" if gpu else "torch sees no CUDA GPU"
        raise ConfigError(f"{key}=cuda, but {why}: set {key}=auto or {key}=cpu")
    if gpu:
        warnings.warn(f"{key}=auto: a CUDA GPU is present but xgboost {xgboost.__version__} was built without CUDA, "
                      "so XGBoost trains on the CPU (install a CUDA build of xgboost to use the GPU)", stacklevel=2)
    return "cpu"
