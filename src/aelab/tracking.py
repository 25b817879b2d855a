"""The one place that knows MLflow: tracking URI, experiment, run tags, params and artifacts."""

from __future__ import annotations

import hashlib
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    from lightning.pytorch.loggers import MLFlowLogger


def tracking_uri(cfg: DictConfig) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the config's (a sqlite file: MLflow >= 3.13 refuses the file store)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.mlflow.tracking_uri


def git_commit() -> str:
    """The current commit (with ``-dirty`` when the work tree has changes), or ``unknown`` outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def file_hash(path: Path | str) -> str:
    """sha256 of a file (the dataset manifest identifies the data a run saw)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay whole."""
    out: dict[str, object] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


@contextmanager
def start_run(cfg: DictConfig, stage: str, manifest: Path | str | None = None, dataset: str | None = None):
    """An MLflow run for one stage, tagged with stage, git commit, dataset (``data.name`` unless given) and
    dataset manifest hash, config logged. Inside a Hydra multirun it is a child of the sweep's parent run
    (see aelab.sweep) and carries the job's overrides."""
    mlflow.set_tracking_uri(tracking_uri(cfg))
    mlflow.set_experiment(cfg.mlflow.experiment)
    tags = {"stage": stage, "git_commit": git_commit(), "dataset": dataset or cfg.data.name}
    if manifest is not None:
        tags["dataset_manifest_sha256"] = file_hash(manifest)
    parent = mlflow.active_run()
    if parent is not None and HydraConfig.initialized():
        tags["sweep_overrides"] = " ".join(HydraConfig.get().overrides.task)
    with mlflow.start_run(run_name=tags.get("sweep_overrides", stage), tags=tags, nested=parent is not None) as run:
        config = OmegaConf.to_container(cfg, resolve=True)
        mlflow.log_params(flatten(config))
        mlflow.log_dict(config, "config.yaml")
        yield run


def lightning_logger(cfg: DictConfig, run) -> MLFlowLogger:
    """Lightning's MLflow logger writing into the already started ``run`` (per-epoch metrics).

    Lightning is imported here, not at the top: stages without a Lightning fit (download, downstream) skip its import.
    """
    from lightning.pytorch.loggers import MLFlowLogger

    return MLFlowLogger(experiment_name=cfg.mlflow.experiment, tracking_uri=tracking_uri(cfg),
                        run_id=run.info.run_id)
