"""Typed checks of the composed config, run by every stage before any work.

Hydra composes the values; these pydantic models only say what a valid value is, so a bad one fails at once
with the key that holds it (``pretrain.lr = -1: Input should be greater than 0``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from omegaconf import DictConfig, OmegaConf
from pydantic import (BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, StrictInt, ValidationError,
                      field_validator, model_validator)

from aelab.data.catalog import get_spec, image_set
from aelab.data.noise_kinds import NOISE_KINDS, check_noise


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
        image_set(name, channels=1)  # the autoencoder stages read the grayscale IDX sets
        return name


Rate = Field(ge=0, lt=1)
NonNegative = Field(ge=0)
Norm = Literal["none", "bn_pre", "bn_post"]  # batch norm: none, after the summation, after the activation


class ModelCfg(_Section):
    target: str = Field(alias="_target_")
    name: str
    code_dim: PositiveInt
    hidden: list[PositiveInt] | None = None
    channels: list[PositiveInt] | None = Field(default=None, min_length=2, max_length=2)
    dropout_input: float = Rate
    dropout_hidden: float = Rate
    norm: Norm
    init: Literal["default", "xavier", "he"]
    code_activation: Literal["relu", "sigmoid", "linear"]


class FastCfg(_Section):
    cuda_graph: bool | Literal["auto"]
    fused_optimizer: bool | Literal["auto"]
    channels_last: bool | Literal["auto"]


class TrainerCfg(_Section):
    max_epochs: PositiveInt
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"]
    devices: PositiveInt | Literal["auto"]
    strategy: Literal["auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true"]
    num_nodes: PositiveInt
    precision: Literal["auto", "32-true", "16-mixed", "bf16-mixed"]
    limit_train_batches: PositiveFloat | PositiveInt
    limit_val_batches: PositiveFloat | PositiveInt
    limit_test_batches: PositiveFloat | PositiveInt
    enable_progress_bar: bool
    resume: Literal["auto", "never"]
    deterministic: Literal["auto", "warn"] | bool
    cpu_threads: PositiveInt | None = None
    fast: FastCfg

    @field_validator("accelerator")
    @classmethod
    def _device_here(cls, accelerator: str) -> str:
        import torch

        missing = {"gpu": not torch.cuda.is_available(), "cuda": not torch.cuda.is_available(),
                   "mps": not torch.backends.mps.is_available()}.get(accelerator, False)
        if missing:
            raise ValueError(f"{accelerator!r} asked for, but this machine has none that torch can use: "
                             "trainer.accelerator=auto takes the GPU when there is one, else the CPU")
        return accelerator


MIN_SYSTEM_METRICS_INTERVAL = 0.1  # seconds; each sample is one write to the tracking store


class MlflowCfg(_Section):
    tracking_uri: str
    experiment: str
    system_metrics: bool
    system_metrics_interval: float

    @field_validator("system_metrics_interval")
    @classmethod
    def _sampling_interval(cls, seconds: float) -> float:
        if seconds < MIN_SYSTEM_METRICS_INTERVAL:
            raise ValueError(f"seconds between system metrics samples, at least {MIN_SYSTEM_METRICS_INTERVAL} "
                             "(each sample is one write to the tracking store)")
        return seconds


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


class SearchCfg(_Section):
    train_limit: PositiveInt
    val_limit: PositiveInt
    batch_size: PositiveInt
    n_lr: int = Field(ge=2)
    lr_min: PositiveFloat
    lr_max: PositiveFloat
    lr_batches: PositiveInt
    n_momentum: int = Field(ge=2)
    one_minus_momentum_min: float = Field(gt=0, lt=1)
    one_minus_momentum_max: float = Field(gt=0, lt=1)
    vectorize: Literal["auto", True, False]
    chunk: PositiveInt | Literal["auto"]
    subject: Literal["autoencoder", "classifier"]

    @field_validator("vectorize", mode="before")
    @classmethod
    def _auto_or_bool(cls, value: object) -> object:
        if value != "auto" and not isinstance(value, bool):  # the Literal alone would take 1 for true
            raise ValueError("should be auto, true or false")
        return value

    @model_validator(mode="after")
    def _ranges_increase(self) -> "SearchCfg":
        if self.lr_min >= self.lr_max or self.one_minus_momentum_min >= self.one_minus_momentum_max:
            raise ValueError("search ranges need min < max (lr_min/lr_max, one_minus_momentum_min/max)")
        return self


XgbDevice = Literal["auto", "cpu", "cuda"]  # auto: the GPU when torch sees one and xgboost was built with CUDA
XgbEngine = Literal["local", "dask"]  # dask: xgboost.dask on the cluster of the `dask` section


class RecipeCfg(_Section):
    fixed: list[str]
    val_limit: PositiveInt
    lr_batches: PositiveInt
    n_weight_decay: int = Field(ge=2)
    weight_decay_min: PositiveFloat
    weight_decay_max: PositiveFloat
    weight_decay_epochs: PositiveInt
    dropout_input: list[Annotated[float, Rate]] = Field(min_length=1)
    dropout_hidden: list[Annotated[float, Rate]] = Field(min_length=1)
    dropout_epochs: PositiveInt

    @model_validator(mode="after")
    def _range_increases(self) -> "RecipeCfg":
        if self.weight_decay_min >= self.weight_decay_max:
            raise ValueError("recipe ranges need weight_decay_min < weight_decay_max")
        return self


class RegularizationCfg(_Section):
    train_limit: PositiveInt
    max_epochs: PositiveInt
    xgb_estimators: PositiveInt
    xgb_device: XgbDevice
    xgb_engine: XgbEngine
    norm: Norm
    variants: dict[str, list[str]] = Field(min_length=1)


class CodesCfg(_Section):
    input_noise: float = Field(ge=0, lt=1)
    probe_max_iter: PositiveInt
    references: list[Literal["pca", "raw"]]
    variants: dict[str, list[str]] = Field(min_length=1)


class FinetuneCfg(_Section):
    budgets: list[PositiveInt] = Field(min_length=1)
    inits: list[Literal["default", "xavier", "he", "pretrained", "frozen"]] = Field(min_length=1)
    steps: PositiveInt
    max_epochs: PositiveInt
    patience: PositiveInt
    val_limit: PositiveInt | None = None


class FeaturesCfg(_Section):
    batch_size: PositiveInt
    out_dir: str


class DownstreamCfg(_Section):
    n_estimators: PositiveInt
    max_depth: PositiveInt
    learning_rate: PositiveFloat
    max_bin: int = Field(ge=2)
    n_jobs: int
    device: XgbDevice
    engine: XgbEngine


class DaskCfg(_Section):
    scheduler: str | None = None
    n_workers: PositiveInt
    threads_per_worker: PositiveInt
    connect_timeout: PositiveInt


class NetCfg(_Section):
    target: str = Field(alias="_target_")
    channels: list[PositiveInt] = Field(min_length=1)


class DenoiseCfg(_Section):
    model: NetCfg
    noise: str
    level: float
    eval_noise: str
    eval_levels: list[float] = Field(min_length=1)
    eval_images: PositiveInt | None
    filter_sizes: list[int] = Field(min_length=1)
    loss: Literal["mse", "l1"]
    lr: PositiveFloat
    weight_decay: float = Field(ge=0)
    batch_size: PositiveInt
    max_epochs: PositiveInt
    out_dir: str

    @field_validator("model")
    @classmethod
    def _halves_28_evenly(cls, model: NetCfg) -> NetCfg:
        if len(model.channels) > 2:
            raise ValueError(f"28x28 images halve evenly at most twice: give 1 or 2 channels, got {model.channels}")
        return model

    @field_validator("noise", "eval_noise")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        if kind not in NOISE_KINDS:
            raise ValueError(f"unknown noise kind {kind!r}; known kinds: {', '.join(NOISE_KINDS)}")
        return kind

    @field_validator("level")
    @classmethod
    def _level_in_range(cls, level: float, info) -> float:
        if "noise" in info.data:
            check_noise(info.data["noise"], level)
        return level

    @field_validator("eval_levels")
    @classmethod
    def _eval_levels_in_range(cls, levels: list[float], info) -> list[float]:
        for level in levels if "eval_noise" in info.data else []:
            check_noise(info.data["eval_noise"], level)
        return levels

    @field_validator("filter_sizes")
    @classmethod
    def _odd_sizes(cls, sizes: list[int]) -> list[int]:
        if any(size < 3 or size % 2 == 0 for size in sizes):
            raise ValueError(f"filter sizes must be odd and at least 3, got {sizes}")
        return sizes


class ColorFallbackCfg(_Section):
    photos: list[str]
    test_photos: list[str] = Field(min_length=1)
    patch_size: int = Field(ge=16, multiple_of=8)
    patches_per_photo: PositiveInt
    max_side: PositiveInt

    @field_validator("test_photos")
    @classmethod
    def _named_and_leaving_training_photos(cls, test_photos: list[str], info) -> list[str]:
        photos = info.data.get("photos", [])
        unknown = [ref for ref in test_photos if ref not in photos]
        if unknown:
            raise ValueError(f"{unknown} not among colorize.data.fallback.photos: test photographs are named from "
                             "that list")
        if len(photos) - len(set(test_photos)) < 2:
            raise ValueError(f"{len(set(test_photos))} test photograph(s) out of {len(photos)} listed leaves fewer "
                             "than two for training and validation (both hold whole photos): list more photos or hold "
                             "out fewer")
        return test_photos


class ColorDataCfg(_Section):
    dataset: str
    mirror: str | None = None
    out_dir: str
    fallback: ColorFallbackCfg | None = None

    @field_validator("dataset")
    @classmethod
    def _color_set(cls, name: str) -> str:
        image_set(name, channels=3)
        return name


class ColorizeCfg(_Section):
    data: ColorDataCfg
    model: NetCfg
    loss: Literal["mse", "l1"]
    lr: PositiveFloat
    weight_decay: float = Field(ge=0)
    batch_size: PositiveInt
    max_epochs: PositiveInt
    patience: PositiveInt | None = None
    val_fraction: float = Field(gt=0, lt=1)
    train_limit: PositiveInt | None = None
    out_dir: str


def check_kl_codes(penalty: PenaltyCfg, model: ModelCfg, penalty_key: str, model_key: str) -> None:
    """The KL sparsity penalty compares mean activations with a rate in (0, 1): it needs sigmoid codes."""
    if penalty.sparsity_kl > 0 and model.code_activation != "sigmoid":
        raise ValueError(f"{penalty_key}.sparsity_kl > 0 needs {model_key}.code_activation=sigmoid "
                         f"(codes in (0, 1)), got {model.code_activation!r}")


class TabularCfg(_Section):
    source: Literal["breast_cancer", "csv"]
    csv_path: str | None = None
    target: str
    folds: int = Field(ge=2)
    model: ModelCfg
    epochs: PositiveInt
    batch_size: PositiveInt
    optim: OptimCfg
    penalty: PenaltyCfg
    xgb: DownstreamCfg

    @model_validator(mode="after")
    def _consistent(self) -> "TabularCfg":
        if self.source == "csv" and not self.csv_path:
            raise ValueError("tabular.source=csv needs tabular.csv_path (the table to read)")
        if self.model.target != "aelab.models.autoencoders.DenseAutoencoder":
            raise ValueError("tabular.model._target_ must be aelab.models.autoencoders.DenseAutoencoder "
                             f"(a table has no image shape), got {self.model.target!r}")
        check_kl_codes(self.penalty, self.model, "tabular.penalty", "tabular.model")
        return self


class SegmentGenerateCfg(_Section):
    out_dir: str
    height: int = Field(ge=28)
    width: int = Field(ge=28)
    min_items: int = Field(ge=0)
    max_items: PositiveInt
    threshold: int = Field(ge=0, le=254)
    n_train: PositiveInt
    n_val: PositiveInt
    n_test: PositiveInt

    @model_validator(mode="after")
    def _item_range(self) -> "SegmentGenerateCfg":
        if self.min_items > self.max_items:
            raise ValueError(f"min_items ({self.min_items}) > max_items ({self.max_items})")
        return self


class LrnCfg(_Section):
    size: PositiveInt
    alpha: float = NonNegative
    beta: float = NonNegative
    k: PositiveFloat


class SegNetCfg(_Section):
    target: Literal["aelab.models.segnet.SegNet"] = Field(alias="_target_")
    name: str
    channels: list[PositiveInt] = Field(min_length=1)
    convs: list[PositiveInt] = Field(min_length=1)
    kernel_size: PositiveInt
    decoder_relu: bool
    input_lrn: LrnCfg | None
    init: Literal["default", "xavier", "he"]

    @model_validator(mode="after")
    def _one_entry_per_stage(self) -> "SegNetCfg":
        if len(self.channels) != len(self.convs):
            raise ValueError(f"channels {self.channels} and convs {self.convs} need one entry per stage")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same-size convs), got {self.kernel_size}")
        return self


class UnetCfg(_Section):
    target: Literal["segmentation_models_pytorch.Unet"] = Field(alias="_target_")
    name: str
    encoder_name: str
    encoder_weights: None = None  # pretrained weights come from a hub that cannot be reached here
    encoder_depth: int = Field(ge=3, le=5)
    decoder_channels: list[PositiveInt]

    @model_validator(mode="after")
    def _one_width_per_stage(self) -> "UnetCfg":
        if len(self.decoder_channels) != self.encoder_depth:
            raise ValueError(f"decoder_channels {self.decoder_channels} needs encoder_depth ({self.encoder_depth}) "
                             "entries")
        return self


HeightWidth = list[PositiveInt] | None


class _SegDataCfg(_Section):
    root: str
    size: HeightWidth = Field(default=None, min_length=2, max_length=2)
    crop: HeightWidth = Field(default=None, min_length=2, max_length=2)
    flip: bool


class GeneratedSegDataCfg(_SegDataCfg):
    kind: Literal["generated"]


class FolderSegDataCfg(_SegDataCfg):
    kind: Literal["folder"]
    classes: list[str] = Field(min_length=1)
    ignore_index: int | None = Field(default=None, ge=0)
    channels: Literal[1, 3]


class SegmentCfg(_Section):
    generate: SegmentGenerateCfg
    model: SegNetCfg | UnetCfg = Field(discriminator="target")
    data: GeneratedSegDataCfg | FolderSegDataCfg = Field(discriminator="kind")
    class_weights: Literal["median_frequency", "none"]
    loss_normalization: Literal["weights", "pixels"]
    optimizer: Literal["adamw", "sgd"]
    lr: PositiveFloat
    momentum: float = Rate
    weight_decay: float = Field(ge=0)
    schedule: Literal["onecycle", "none"]
    batch_size: PositiveInt
    max_epochs: PositiveInt
    overlays: PositiveInt
    out_dir: str

    @model_validator(mode="after")
    def _input_fits_the_model(self) -> "SegmentCfg":
        data, gen = self.data, self.generate
        if data.crop and data.size and (data.crop[0] > data.size[0] or data.crop[1] > data.size[1]):
            raise ValueError(f"segment.data.crop {data.crop} is larger than segment.data.size {data.size}")
        sides = data.crop or data.size or ([gen.height, gen.width] if data.kind == "generated" else None)
        if isinstance(self.model, SegNetCfg) and sides and min(sides) < 2 ** len(self.model.channels):
            raise ValueError(f"segment.model has {len(self.model.channels)} pooling stages: inputs need sides of at "
                             f"least {2 ** len(self.model.channels)}, got {sides[0]}x{sides[1]}")
        return self


def check_label_budget(cfg: DictConfig, key: str = "classify.train_labels", budget: int | None = None) -> None:
    """Raise ConfigError when the label budget at ``key`` (``budget`` when given) is more than the images of the
    seeded training split (the catalog's size, cut by ``data.train_limit``, less the validation fraction). Checked by
    the stages that train on a budget only: a study that shrinks ``data`` for itself (regularization) need not fit
    the classifier's budget."""
    from aelab.data.images import val_count  # torch: not for the stages that import this module without it

    data, budget = cfg.data, OmegaConf.select(cfg, key) if budget is None else budget
    n = get_spec(data.name).files[0].shape[0]
    n = min(n, data.train_limit) if data.train_limit else n
    available = n - val_count(n, data.val_fraction)
    if budget > available:
        raise ConfigError(f"invalid config:\n  {key}: {budget} is more than the {available} images of "
                          f"{data.name}'s training split (data.val_fraction {data.val_fraction}, data.train_limit "
                          f"{data.train_limit})")


def anomaly_classes(classes: list[int | str] | None, dataset: str) -> list[int]:
    """The indices of ``classes`` (indices or names of ``dataset``'s classes; None: all), in order, once each."""
    names = get_spec(dataset).classes
    if classes is None:
        return list(range(len(names)))
    unknown = [c for c in classes if c not in names and c not in range(len(names))]
    if unknown:
        raise ValueError(f"anomaly.classes: {unknown} not among {dataset}'s classes (0-{len(names) - 1} or "
                         f"{', '.join(names)})")
    return list(dict.fromkeys(names.index(c) if isinstance(c, str) else c for c in classes))


class ClassifierNetCfg(_Section):
    target: Literal["aelab.models.classifier.MLPClassifier"] = Field(alias="_target_")
    name: str
    hidden: list[PositiveInt] = Field(min_length=1)
    dropout_input: float = Rate
    dropout_hidden: float = Rate
    norm: Norm
    init: Literal["default", "xavier", "he"]
    max_norm: PositiveFloat | None = None
    code_norm: bool


class ClassifyCfg(_Section):
    train_labels: PositiveInt
    val_limit: PositiveInt | None = None
    batch_size: PositiveInt
    max_epochs: PositiveInt
    model: ClassifierNetCfg
    optim: OptimCfg
    l1_weight: float = NonNegative
    early_stopping: PositiveInt | None = None
    variants: dict[str, list[str]] = Field(min_length=1)


class AnomalyCfg(_Section):
    protocol: Literal["one_out", "one_in"]
    classes: list[StrictInt | str] | None = Field(default=None, min_length=1)
    train_limit: PositiveInt | None = None
    max_epochs: PositiveInt
    iforest_estimators: PositiveInt


class Config(_Section):
    seed: int
    mlflow: MlflowCfg
    data: DataCfg
    model: ModelCfg
    trainer: TrainerCfg
    pretrain: PretrainCfg
    search: SearchCfg
    recipe: RecipeCfg
    regularization: RegularizationCfg
    features: FeaturesCfg
    codes: CodesCfg
    finetune: FinetuneCfg
    downstream: DownstreamCfg
    dask: DaskCfg
    denoise: DenoiseCfg
    colorize: ColorizeCfg
    tabular: TabularCfg
    segment: SegmentCfg
    anomaly: AnomalyCfg
    classify: ClassifyCfg

    @model_validator(mode="after")
    def _kl_needs_unit_interval_codes(self) -> "Config":
        check_kl_codes(self.pretrain.penalty, self.model, "pretrain.penalty", "model")
        return self

    @field_validator("anomaly")
    @classmethod
    def _anomaly_classes_in_data(cls, anomaly: AnomalyCfg, info) -> AnomalyCfg:
        if "data" in info.data:
            anomaly_classes(anomaly.classes, info.data["data"].name)
        return anomaly


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
