"""An interrupted training continues from its last completed epoch and ends where an uninterrupted one does."""

from __future__ import annotations

import csv
import signal

import mlflow
import pytest
import torch

from aelab.interrupts import StageInterrupted
from aelab.lit.trainer import EpochHistory, resume_folder
from aelab.stages import pretrain
from conftest import compose_cfg


def loss_rows(root) -> list[dict[str, float]]:
    with open(root / "reports/plots/pretrain_loss.csv") as f:
        return [{k: float(v) for k, v in row.items() if k != "epoch_seconds"} for row in csv.DictReader(f)]


def test_an_interrupted_pretrain_resumes_from_its_last_epoch(tiny_raw, smoke_overrides, monkeypatch):
    overrides = [*smoke_overrides, "trainer.max_epochs=4"]
    pretrain.main(compose_cfg(*overrides, "trainer.resume=never"))
    uninterrupted = loss_rows(tiny_raw)

    cfg = compose_cfg(*overrides)
    start_epoch = EpochHistory.on_train_epoch_start

    def sigterm_at_epoch_2(self, trainer, pl_module):
        if trainer.current_epoch == 2:
            raise StageInterrupted(signal.SIGTERM)
        start_epoch(self, trainer, pl_module)

    monkeypatch.setattr(EpochHistory, "on_train_epoch_start", sigterm_at_epoch_2)
    with pytest.raises(SystemExit) as stopped:
        pretrain.main(cfg)
    assert stopped.value.code == 128 + signal.SIGTERM
    folder = resume_folder(cfg, "pretrain")
    assert (folder / "last.ckpt").exists()

    monkeypatch.setattr(EpochHistory, "on_train_epoch_start", start_epoch)
    pretrain.main(cfg)
    resumed = loss_rows(tiny_raw)
    assert [row["epoch"] for row in resumed] == [0, 1, 2, 3]
    assert resumed == [pytest.approx(row, rel=1e-5) for row in uninterrupted]
    assert not folder.exists()

    runs = mlflow.search_runs(experiment_names=["aelab"], output_format="list", order_by=["attributes.start_time"])
    killed, finished = runs[-2], runs[-1]
    assert (killed.info.status, finished.info.status) == ("KILLED", "FINISHED")
    assert finished.data.tags["resumed_from_run"] == killed.info.run_id
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(finished.info.run_id, "val_loss")]
    assert len(steps) == 2 and min(steps) > 0  # epochs 2 and 3 only, continuing the step count


def test_a_rerun_on_this_machine_gives_identical_metrics(tiny_raw, smoke_overrides):
    """trainer.deterministic=auto is on for the CPU: the same config twice gives the same digits."""
    overrides = [*smoke_overrides, "trainer.max_epochs=2", "trainer.resume=never"]
    runs = []
    for _ in range(2):
        metrics = pretrain.main(compose_cfg(*overrides))
        runs.append(({k: v for k, v in metrics.items() if "seconds" not in k}, loss_rows(tiny_raw)))
    assert runs[0] == runs[1]
    assert torch.are_deterministic_algorithms_enabled()


def test_a_signal_whose_unwinding_fails_still_stops_the_stage_as_that_signal(tiny_raw, smoke_overrides, monkeypatch):
    """The signal lands while a checkpoint is written, say, and the writer fails as the signal unwinds it: the stage
    still exits 128 + the signal and its MLflow run is KILLED, not an ordinary failure."""
    def interrupted_while_writing(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            try:
                raise StageInterrupted(signal.SIGINT)
            finally:
                raise RuntimeError("PytorchStreamWriter failed writing file")
        start_epoch(self, trainer, pl_module)

    start_epoch = EpochHistory.on_train_epoch_start
    monkeypatch.setattr(EpochHistory, "on_train_epoch_start", interrupted_while_writing)
    with pytest.raises(SystemExit) as stopped:
        pretrain.main(compose_cfg(*smoke_overrides, "trainer.max_epochs=3"))
    assert stopped.value.code == 128 + signal.SIGINT
    (run,) = mlflow.search_runs(experiment_names=["aelab"], output_format="list")
    assert run.info.status == "KILLED"
    assert not (tiny_raw / "reports/metrics/pretrain.json").exists()
