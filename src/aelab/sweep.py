"""Hydra multirun sweeps as MLflow parent/child runs, and the comparison table of a set of training runs.

``hydra.callbacks.mlflow_sweep`` (conf/config.yaml) starts one parent run per ``-m`` sweep; every job's stage run
nests under it (aelab.tracking.start_run). When the sweep ends, its children are compared in one table —
settings × best validation loss, final train loss, generalization gap, test metric, and epochs/steps each needed
to reach the loss all of them reached — printed, saved beside the sweep (``comparison.md``/``.csv``) and logged to
the parent run.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import mlflow
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from aelab.config import ConfigError, validate

from aelab.paths import atomic_path, write_csv
from aelab.tracking import SWEEP_RUN_ENV, tracking_uri, use_experiment


def variant_configs(cfg: DictConfig, section: str, base: dict) -> dict[str, DictConfig]:
    """Each variant of a study (``<section>.variants``: name -> overrides) as a full config: ``cfg`` updated with
    ``base`` (the study's data and epochs), then the variant's overrides (``key=value``; a mapping value replaces the
    node, e.g. another ``model``); validated, the error naming the variant."""
    common = OmegaConf.merge(cfg, base)
    configs = {}
    for name, overrides in OmegaConf.select(cfg, section).variants.items():
        configs[name] = common.copy()
        for override in overrides:
            key, _, text = override.partition("=")
            value = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={text}"]))["value"]  # parsed as YAML
            OmegaConf.update(configs[name], key, value, merge=False)
        try:
            validate(configs[name])
        except ConfigError as err:
            raise ConfigError(f"{section}.variants.{name}: {err}") from None
    return configs


def epochs_to_target(val_losses: list[float], target: float) -> int | None:
    """1-based epoch at which ``val_losses`` first reaches ``target`` (None if never)."""
    return next((i + 1 for i, loss in enumerate(val_losses) if loss <= target + 1e-12), None)


def compare(rows: list[dict], histories: list[list[tuple[int, float]]], target: float | None = None) -> list[dict]:
    """Add ``epochs_to_target`` and ``steps_to_target`` to each row: what its history ((step, val loss) per epoch)
    needed to reach ``target`` — by default the worst of the runs' best losses, a loss that every run reached."""
    best = [min(v for _, v in h) if h else math.inf for h in histories]
    target = max(b for b in best if math.isfinite(b)) if target is None else target
    for row, history in zip(rows, histories):
        epoch = epochs_to_target([v for _, v in history], target)
        row["target_val_loss"] = round(target, 6)
        row["epochs_to_target"] = epoch
        row["steps_to_target"] = None if epoch is None else history[epoch - 1][0]
    return rows


def varying_settings(settings: list[str]) -> list[str]:
    """Each job's overrides without those every job shares (what the sweep actually varied)."""
    tokens = [s.split() for s in settings]
    common = set.intersection(*(set(t) for t in tokens)) if tokens else set()
    return [" ".join(t for t in job if t not in common) or "(defaults)" for job in tokens]


def markdown_table(rows: list[dict]) -> str:
    """Rows of equal keys as a markdown table (floats to 4 significant digits, None as '—')."""
    def cell(v: Any) -> str:
        return "—" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(row.get(k)) for k in keys) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_comparison(rows: list[dict], folder: Path, name: str = "comparison") -> str:
    """Save ``rows`` as ``<folder>/<name>.csv`` and ``.md``; return the markdown."""
    table = markdown_table(rows)
    write_csv(folder / f"{name}.csv", rows)
    with atomic_path(folder / f"{name}.md") as tmp:
        tmp.write_text(table)
    return table


def _child_rows(parent_id: str) -> tuple[list[dict], list[list[tuple[int, float]]]]:
    client = mlflow.MlflowClient()
    children = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
                                  search_all_experiments=True, output_format="list", order_by=["start_time ASC"])
    children.sort(key=lambda run: int(run.data.tags.get("sweep_job", 0)))  # job order, however jobs were scheduled
    settings = varying_settings([run.data.tags.get("sweep_overrides", run.info.run_name) for run in children])
    rows, histories = [], []
    for run, setting in zip(children, settings):
        m = run.data.metrics
        history = [(h.step, h.value) for h in sorted(client.get_metric_history(run.info.run_id, "val_loss"),
                                                     key=lambda h: h.step)]
        train = m.get("train_loss")
        val = history[-1][1] if history else m.get("val_loss")
        rows.append({"settings": setting, "best_val_loss": min(v for _, v in history) if history else None,
                     "final_train_loss": train, "final_val_loss": val,
                     "gap_val_minus_train": None if train is None or val is None else val - train,
                     "test_mse": m.get("test_mse"), "epochs": len(history), "status": run.info.status})
        histories.append(history)
    return rows, histories


class MlflowSweep(Callback):
    """One MLflow parent run per Hydra multirun; a comparison table of its children at the end."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        mlflow.set_tracking_uri(tracking_uri(config))
        use_experiment(config.mlflow.experiment)
        overrides = " ".join(config.hydra.overrides.task)
        run = mlflow.start_run(run_name=f"sweep: {overrides}",
                               tags={"stage": "sweep", "sweep_dir": config.hydra.sweep.dir})
        os.environ[SWEEP_RUN_ENV] = run.info.run_id  # for jobs in other processes (joblib, submitit launchers)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        parent = mlflow.active_run()
        os.environ.pop(SWEEP_RUN_ENV, None)
        if parent is None:
            return
        rows, histories = _child_rows(parent.info.run_id)
        if rows:
            table = write_comparison(compare(rows, histories), Path(config.hydra.sweep.dir))
            mlflow.log_text(table, "comparison.md")
            print(f"\nSweep comparison ({config.hydra.sweep.dir}/comparison.md):\n{table}")
        mlflow.end_run()
