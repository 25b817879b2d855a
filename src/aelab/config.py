"""Typed checks of the composed config, run by every stage before any work.

Hydra composes the values; these pydantic models only say what a valid value is, so a bad one fails at once
with the key that holds it (``pretrain.lr = -1: Input should be greater than 0``).
"""

from __future__ import annotations

from typing import Literal

from omegaconf import DictConfig, OmegaConf
from pydantic import (BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, field_validator,
                      model_validator)

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


Rate = Field(ge=0, lt=1)
NonNegative = Field(ge=0)


class ModelCfg(_Section):
    target: str = Field(alias="_target_")
    name: str
    code_dim: PositiveInt
    hidden: list[PositiveInt] | None = None
    channels: list[PositiveInt] | None = Field(default=None, min_length=2, max_length=2)
    dropout_input: float = Rate
    dropout_hidden: float = Rate
    norm: Literal["none", "bn_pre", "bn_post"]
    init: Literal["default", "xavier", "he"]
    code_activation: Literal["relu", "sigmoid", "linear"]


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


class OptimCfg(_Section):
    name: Literal["adam", "sgd"]
    lr: PositiveFloat
    weight_decay: float = NonNegative
    momentum: float = Rate
    betas: list[float] = Field(min_length=2, max_length=2)
    schedule: Literal["none", "step", "cosine", "onecycle"]
    step_size: PositiveInt
    gamma: float = Field(gt=0, le=1)

    @field_validator("betas")
    @classmethod
    def _betas_in_unit_interval(cls, betas: list[float]) -> list[float]:
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"both Adam betas must be in [0, 1), got {betas}")
        return betas


class PenaltyCfg(_Section):
    l1_weight: float = NonNegative
    activity_l1: float = NonNegative
    sparsity_kl: float = NonNegative
    sparsity_target: float = Field(gt=0, lt=1)


class PretrainCfg(_Section):
    loss: Literal["bce", "mse"]
    batch_size: PositiveInt
    out_dir: str
    optim: OptimCfg
    penalty: PenaltyCfg


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

    @model_validator(mode="after")
    def _kl_needs_unit_interval_codes(self) -> "Config":
        if self.pretrain.penalty.sparsity_kl > 0 and self.model.code_activation != "sigmoid":
            raise ValueError("pretrain.penalty.sparsity_kl > 0 needs model.code_activation=sigmoid "
                             f"(codes in (0, 1)), got {self.model.code_activation!r}")
        return self


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
            lines.append(f"  {key}: {e['msg']}{got}" if key else f"  {e['msg']}")
        raise ConfigError("invalid config:\n" + "\n".join(lines)) from None
