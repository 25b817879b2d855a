"""The Lightning Trainer as the config describes it, a callback that keeps per-epoch metrics, and the fit that keeps
the best checkpoint (and resumes an interrupted one)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ProgressBar, TQDMProgressBar
from omegaconf import DictConfig, OmegaConf

from aelab.distributed import is_main_process
from aelab.lit.fast import FastPath, TrainingDiverged
from aelab.paths import atomic_path, write_json

log = logging.getLogger(__name__)
RESUME_ROOT = Path(".aelab-resume")  # interrupted fits' checkpoints (trainer.resume)
PROGRESS_EVERY = 10  # batches between progress-bar redraws (a redraw per step costs the GPU its lead)


def train_device(trainer_cfg) -> torch.device:
    """The device a Trainer built from ``trainer_cfg`` trains on: the GPU when there is one and the config allows
    it, the CPU otherwise (for the stages and helpers that run their own loops or inference)."""
    on_cuda = torch.cuda.is_available() and trainer_cfg.accelerator in ("auto", "gpu", "cuda")
    return torch.device("cuda" if on_cuda else "cpu")


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX), where oneDNN runs bf16 convolutions natively;
    elsewhere bf16 is emulated and slower than fp32."""
    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(probe() for probe in probes if probe is not None)


def resolve_precision(trainer_cfg, module: L.LightningModule | None = None) -> str:
    """``auto`` means the module's measured best (aelab.bench): its ``cuda_precision`` (bf16-mixed when it has none)
    when training on CUDA, its ``cpu_precision`` (32-true when it has none) on a CPU with bf16 arithmetic, 32-true on
    other CPUs."""
    if trainer_cfg.precision != "auto":
        return trainer_cfg.precision
    if train_device(trainer_cfg).type == "cuda":
        return getattr(module, "cuda_precision", "bf16-mixed")
    return getattr(module, "cpu_precision", "32-true") if cpu_computes_bf16() else "32-true"


def resolve_deterministic(trainer_cfg) -> bool | str:
    """Lightning's ``deterministic`` for ``trainer.deterministic``. ``auto`` is ``warn`` on the CPU: deterministic
    algorithms, and a warning (not an error) from the kernels PyTorch has no deterministic version of (SegNet's
    max-unpooling, which is deterministic all the same: max-pooling's indices never collide). On CUDA ``auto`` is
    off: cuDNN's autotuned convolutions and max-unpooling's backward are not deterministic there; ``true`` makes
    Lightning set ``CUBLAS_WORKSPACE_CONFIG`` and fail on such a kernel, ``warn`` only warns."""
    if trainer_cfg.deterministic == "auto":
        return "warn" if train_device(trainer_cfg).type != "cuda" else False
    return trainer_cfg.deterministic


class EpochLines(ProgressBar):
    """The progress bar where output is not a terminal (a log file, ``dvc repro`` piped): one log line per training
    epoch, with its wall time and the progress-bar metrics, instead of a bar redrawn with carriage returns."""

    def __init__(self):
        super().__init__()
        self._enabled, self._start = True, 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._enabled:
            metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
            log.info("epoch %d/%d in %.1f s: %s", trainer.current_epoch + 1, trainer.max_epochs,
                     time.perf_counter() - self._start,
                     ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))


def progress_bar() -> ProgressBar:
    """Lightning's bar (on stderr, as tqdm writes) where stderr is a terminal, per-epoch log lines otherwise."""
    return TQDMProgressBar(refresh_rate=PROGRESS_EVERY) if sys.stderr.isatty() else EpochLines()


def build_trainer(trainer_cfg, module: L.LightningModule, logger, callbacks: list[Callback] = ()) -> L.Trainer:
    """A Trainer for ``module`` on the best available device, with the fast path of ``trainer.fast``; checkpoints
    are the caller's ``ModelCheckpoint``."""
    on_cuda = train_device(trainer_cfg).type == "cuda"
    deterministic = resolve_deterministic(trainer_cfg)
    if on_cuda and not deterministic:
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for 32-true on tensor cores
    if trainer_cfg.cpu_threads:
        torch.set_num_threads(trainer_cfg.cpu_threads)
    return L.Trainer(
        max_epochs=trainer_cfg.max_epochs,
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        strategy=trainer_cfg.strategy,
        # batch norm over the global batch, as on one device (torch syncs it on GPUs only: per process on CPUs)
        sync_batchnorm=on_cuda and trainer_cfg.strategy.startswith("ddp"),
        num_nodes=trainer_cfg.num_nodes,
        precision=resolve_precision(trainer_cfg, module),
        limit_train_batches=trainer_cfg.limit_train_batches,
        limit_val_batches=trainer_cfg.limit_val_batches,
        limit_test_batches=trainer_cfg.limit_test_batches,
        enable_progress_bar=trainer_cfg.enable_progress_bar,
        logger=logger,
        callbacks=[FastPath(trainer_cfg.fast), *callbacks,
                   *([progress_bar()] if trainer_cfg.enable_progress_bar else [])],
        default_root_dir=None,
        log_every_n_steps=10,
        deterministic=deterministic,
        benchmark=on_cuda and not deterministic,  # batch shapes are fixed: let cuDNN pick its fastest convolutions
    )


def score_test_split(module: L.LightningModule, datamodule: L.LightningDataModule, trainer_cfg, logger=False) -> dict:
    """``module``'s test-step metrics on ``datamodule``'s test split."""
    return build_trainer(trainer_cfg, module, logger).test(module, datamodule=datamodule, verbose=False)[0]


class EpochHistory(Callback):
    """Collects ``keys`` from the logged metrics and the epoch's wall time at the end of each training epoch, and
    the wall time of the whole fit."""

    def __init__(self, keys: tuple[str, ...] = ("train_loss", "val_loss", "val_mse")):
        self.keys = keys
        self.rows: list[dict[str, float]] = []
        self.fit_seconds = 0.0
        self._start = self._fit_start = 0.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.fit_seconds = time.perf_counter() - self._fit_start

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch, "epoch_seconds": round(time.perf_counter() - self._start, 3)}
        row.update({k: round(float(metrics[k]), 6) for k in self.keys if k in metrics})
        self.rows.append(row)

    def state_dict(self) -> dict:
        return {"rows": self.rows}  # saved in checkpoints: a resumed fit keeps the epochs before the interruption

    def load_state_dict(self, state_dict: dict) -> None:
        self.rows = list(state_dict["rows"])

    def summary(self, module: L.LightningModule) -> dict:
        """Epochs, training wall time, mean epoch time and ``module``'s parameter count, for a stage's metrics."""
        return {"epochs": len(self.rows), "train_seconds": round(self.fit_seconds, 1),
                "mean_epoch_seconds": round(sum(r["epoch_seconds"] for r in self.rows) / len(self.rows), 2),
                "n_params": sum(t.numel() for t in module.parameters())}


def resume_folder(cfg: DictConfig, stage: str) -> Path:
    """Where ``stage``'s fit under the resolved ``cfg`` keeps its checkpoints until it completes: one folder per
    stage and config (the config names the data; the download stage verifies its content), so a rerun with anything
    changed starts afresh. Outside the stage's outputs, which ``dvc repro`` deletes before it runs a stage."""
    config = json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True, default=str)
    return RESUME_ROOT / f"{stage}-{hashlib.sha256(config.encode()).hexdigest()[:16]}"


def fit_best(module: L.LightningModule, datamodule: L.LightningDataModule, trainer_cfg, logger, ckpt: Path | str,
             keys: tuple[str, ...] = ("train_loss", "val_loss"), monitor: str | None = "val_loss", mode: str = "min",
             resume: Path | None = None, callbacks: list[Callback] = ()) -> tuple[L.LightningModule, EpochHistory, float]:
    """Fit ``module``; keep the checkpoint with the lowest ``val_loss`` (or the ``mode`` of ``monitor``; with
    ``monitor=None`` the last epoch's) at ``ckpt`` (nothing else is left behind). ``callbacks`` join the Trainer's
    (e.g. Lightning's ``EarlyStopping``).

    With a ``resume`` folder (``resume_folder``) and ``trainer.resume=auto``, the best and the last epoch's
    checkpoints are kept there while training: a fit that was interrupted continues from its last completed epoch
    (weights, optimizer, epoch count, history, best so far; the MLflow run is tagged with the run it continues), and
    the folder is removed once the fit completes or diverges. Otherwise they live in a temporary folder.

    Returns that checkpoint reloaded in eval mode (on the training device), the per-epoch history of ``keys``
    and the best monitored value (NaN without ``monitor``).
    """
    if resume is None or trainer_cfg.resume == "never":
        with tempfile.TemporaryDirectory(prefix="aelab-fit-") as tmp:  # not in the stage's outputs: a kill leaves none
            return _fit(module, datamodule, trainer_cfg, logger, ckpt, keys, monitor, mode, Path(tmp), False, callbacks)
    try:
        result = _fit(module, datamodule, trainer_cfg, logger, ckpt, keys, monitor, mode, resume, True, callbacks)
    except TrainingDiverged:
        shutil.rmtree(resume, ignore_errors=True)  # nothing to resume from a NaN
        raise
    if is_main_process(trainer_cfg):
        shutil.rmtree(resume, ignore_errors=True)
    return result


def _fit(module, datamodule, trainer_cfg, logger, ckpt, keys, monitor, mode, folder: Path, resumable: bool,
         extra: list[Callback]) -> tuple[L.LightningModule, EpochHistory, float]:
    # without a monitor only the last epoch's weights are wanted: written once, not every epoch (at 0.2 s epochs,
    # the classifier's 22 MB checkpoint per epoch cost 15 % of its training)
    every = trainer_cfg.max_epochs if monitor is None and trainer_cfg.max_epochs > 0 else 1
    best = ModelCheckpoint(dirpath=folder, filename="best", monitor=monitor, mode=mode, save_top_k=1,
                           every_n_epochs=every, enable_version_counter=False)
    history = EpochHistory(keys)
    callbacks: list[Callback] = [best, history, *extra]
    last, ckpt_path = folder / "last.ckpt", None
    if resumable:
        callbacks.append(ModelCheckpoint(dirpath=folder, filename="last", save_top_k=1, save_on_train_epoch_end=True,
                                         enable_version_counter=False))
        ckpt_path = last if last.exists() else None
        record = folder / "run.json"
        if logger and ckpt_path is not None and record.exists():
            logger.experiment.set_tag(logger.run_id, "resumed_from_run", json.loads(record.read_text())["run_id"])
        if logger:
            write_json(record, {"run_id": logger.run_id})
    trainer = build_trainer(trainer_cfg, module, logger, callbacks)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    channels_last = bool(getattr(module, "fast", None) and module.fast.channels_last)  # as FastPath resolved it
    if logger:  # what `auto` resolved to on this machine: it explains differences between machines
        for key, value in {"precision": trainer.precision, "channels_last": channels_last}.items():
            logger.experiment.set_tag(logger.run_id, key, str(value))
    if trainer.is_global_zero:
        with atomic_path(ckpt) as part:
            shutil.copyfile(best.best_model_path, part)
        module = type(module).load_from_checkpoint(ckpt, map_location=train_device(trainer_cfg))
        if channels_last:  # inference is as much faster in that layout as training
            module.to(memory_format=torch.channels_last)
    if trainer.world_size > 1:  # DDP: the other ranks take rank 0's best weights (no shared file system needed)
        state = trainer.strategy.broadcast(module.state_dict() if trainer.is_global_zero else None)
        module.load_state_dict(state)
    score = best.best_model_score
    return module.eval(), history, math.nan if score is None else float(score)
