"""Typed checks of the composed config, run by every stage before any work.

Hydra composes the values; these pydantic models only say what a valid value is, so a bad one fails at once
with the key that holds it (``pretrain.lr = -1: Input should be greater than 0``).
"""

from __future__ import annotations

from typing import Literal

from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, field_validator

from aelab.data.catalog import DATASETS


class ConfigError(ValueError):
    """A config value of the wrong type or range; the message names every key at fault."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataCfg(_Section):
    name: str
    raw_dir: str
    mirror: str | None = None
    val_fraction: float = Field(gt=0, lt=1)
    train_limit: PositiveInt | None = None
    test_limit: PositiveInt | None = None
    num_workers: int = Field(ge=0)

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in DATASETS:
            raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
        return name


class ModelCfg(_Section):
    target: str = Field(alias="_target_")
    name: str
    code_dim: PositiveInt
    hidden: list[PositiveInt] | None = None
    channels: list[PositiveInt] | None = Field(default=None, min_length=2, max_length=2)


class TrainerCfg(_Section):
    max_epochs: PositiveInt
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"]
    devices: PositiveInt | Literal["auto"]
    precision: Literal["auto", "32-true", "16-mixed", "bf16-mixed"]
    limit_train_batches: PositiveFloat | PositiveInt
    enable_progress_bar: bool


class MlflowCfg(_Section):
    tracking_uri: str
    experiment: str


class PretrainCfg(_Section):
    loss: Literal["bce", "mse"]
    lr: PositiveFloat
    weight_decay: float = Field(ge=0)
    batch_size: PositiveInt
    out_dir: str


class FeaturesCfg(_Section):
    batch_size: PositiveInt
    out_dir: str


class DownstreamCfg(_Section):
    n_estimators: PositiveInt
    max_depth: PositiveInt
    learning_rate: PositiveFloat
    max_bin: int = Field(ge=2)
    n_jobs: int


class Config(_Section):
    seed: int
    mlflow: MlflowCfg
    data: DataCfg
    model: ModelCfg
    trainer: TrainerCfg
    pretrain: PretrainCfg
    features: FeaturesCfg
    downstream: DownstreamCfg


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming each key whose value is missing, unknown, or of the wrong type or range."""
    values = OmegaConf.to_container(cfg, resolve=True)
    try:
        Config.model_validate(values)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = ".".join(str(part) for part in e["loc"])
            got = f" (got {e['input']!r})" if e["type"] != "missing" else ""
            lines.append(f"  {key}: {e['msg']}{got}")
        raise ConfigError("invalid config:\n" + "\n".join(lines)) from None
