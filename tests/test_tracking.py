"""Where runs land: the project's store, also from the temporary copies `dvc exp run --temp` / `--queue` use."""

from __future__ import annotations

import itertools
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning
import mlflow
import pytest
import torch
import xgboost
from lightning.pytorch.utilities.exceptions import SIGTERMException
from mlflow import MlflowClient
from mlflow.entities import DatasetInput
from mlflow.exceptions import MlflowException

from aelab.interrupts import interrupting_signal, signals_interrupt
from aelab.tracking import log_dataset, project_root, start_run, tracking_uri
from conftest import compose_cfg


def test_project_root_is_the_project_holding_dvcs_temporary_copy(tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert project_root() == tmp_path.resolve()
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpk3x9" / "sub"
    copy.mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(copy.parent))
    assert project_root() == tmp_path.resolve()


def test_relative_sqlite_uris_are_the_projects_and_others_pass_through(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    cfg = compose_cfg()
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    for uri in ("sqlite:////abs/store.db", "http://127.0.0.1:5000", "postgresql://db/mlflow"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        assert tracking_uri(cfg) == uri


def test_a_run_in_dvcs_temporary_copy_lands_in_the_projects_store(tmp_path, monkeypatch):
    project = tmp_path / "project"
    copy = project / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(copy))  # what DVC sets for a stage command in the copy
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = compose_cfg("mlflow.experiment=temp-runs")
    with start_run(cfg, "pretrain") as run:
        mlflow.log_metric("loss", 0.5)
        mlflow.log_text("kept", "note.txt")
    mlflow.set_tracking_uri("sqlite:///:memory:")  # let go of the store before the copy is deleted
    assert not (copy / "mlflow.db").exists() and not (copy / "mlruns").exists()
    stored = MlflowClient(f"sqlite:///{project}/mlflow.db").get_run(run.info.run_id)
    assert stored.data.metrics["loss"] == 0.5 and stored.info.status == "FINISHED"
    artifacts = Path(stored.info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(project / "mlruns") and (artifacts / "note.txt").read_text() == "kept"


def statuses(client: MlflowClient, *runs) -> list[str]:
    return [client.get_run(run.info.run_id).info.status for run in runs]


def test_runs_left_running_by_dead_processes_are_closed_as_killed(workdir):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    experiment = mlflow.set_experiment("aelab").experiment_id
    client = MlflowClient()
    here = socket.gethostname()
    stale = client.create_run(experiment, tags={"host": here, "pid": str(dead.pid)})  # SIGKILLed stage
    child = client.create_run(experiment, tags={"mlflow.parentRunId": stale.info.run_id})
    alive = client.create_run(experiment, tags={"host": here, "pid": str(os.getpid())})
    elsewhere = client.create_run(experiment, tags={"host": "another-machine", "pid": str(dead.pid)})
    with start_run(compose_cfg(), "features"):
        pass
    assert statuses(client, stale, child, alive, elsewhere) == ["KILLED", "KILLED", "RUNNING", "RUNNING"]


UNIQUE_VIOLATION = ('(psycopg2.errors.UniqueViolation) duplicate key value violates unique constraint "dataset_pk"'
                    ' DETAIL: Key (experiment_id, name, digest) already exists.')  # what mlflow server answered in CI


def racing_log_input(monkeypatch, error: str) -> list[str]:
    """mlflow.log_input as it goes when a parallel job inserts the same dataset first: the first call inserts it from
    another run, then fails as the server does; later calls are the real one. The run ids the calls came from."""
    real, calls = mlflow.log_input, []

    def log_input(dataset, context=None):
        calls.append(mlflow.active_run().info.run_id)
        if len(calls) > 1:
            return real(dataset, context=context)
        other = MlflowClient().create_run(mlflow.active_run().info.experiment_id)
        MlflowClient().log_inputs(other.info.run_id, [DatasetInput(dataset._to_mlflow_entity())])
        raise MlflowException(error)

    monkeypatch.setattr(mlflow, "log_input", log_input)
    return calls


def test_a_dataset_a_parallel_job_inserted_first_is_linked_on_the_retry(workdir, monkeypatch):
    manifest = workdir / "data/manifest.json"
    manifest.parent.mkdir()
    manifest.write_text("{}")
    calls = racing_log_input(monkeypatch, UNIQUE_VIOLATION)
    mlflow.set_experiment("aelab")
    with mlflow.start_run() as run:
        log_dataset(manifest, "fashion_mnist", "ab" * 32)
    (linked,) = MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    assert len(calls) == 2 and set(calls) == {run.info.run_id}
    assert linked.dataset.name == "fashion_mnist" and linked.dataset.digest == "ab" * 16


def test_other_dataset_errors_are_not_retried(workdir, monkeypatch):
    (workdir / "manifest.json").write_text("{}")
    calls = racing_log_input(monkeypatch, "INVALID_PARAMETER_VALUE: dataset name too long")
    mlflow.set_experiment("aelab")
    with mlflow.start_run(), pytest.raises(MlflowException, match="too long"):
        log_dataset(workdir / "manifest.json", "fashion_mnist", "ab" * 32)
    assert len(calls) == 1


STARTER = """
import sys
import mlflow
from aelab.tracking import prepare_store, use_experiment
prepare_store(sys.argv[1])
mlflow.set_tracking_uri(sys.argv[1])
use_experiment("together")
with mlflow.start_run():
    mlflow.log_metric("x", 1.0)
"""


def test_stages_starting_together_on_a_new_store_all_succeed(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    starters = [subprocess.Popen([sys.executable, "-c", STARTER, uri], stderr=subprocess.PIPE, text=True)
                for _ in range(3)]
    errors = [p.communicate(timeout=120)[1] for p in starters]
    assert [p.returncode for p in starters] == [0, 0, 0], errors
    assert len(MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("together").experiment_id])) == 3


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_training_fails_the_stage_and_kills_its_run(tiny_raw, smoke_overrides, signum):
    overrides = [o for o in smoke_overrides if not o.startswith("trainer.max_epochs")] + ["trainer.max_epochs=1000"]
    stage = subprocess.Popen([sys.executable, "-m", "aelab.stages.pretrain", *overrides], cwd=tiny_raw,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    db = tiny_raw / "mlflow.db"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not training_started(db):
        assert stage.poll() is None, stage.stderr.read()
        time.sleep(0.5)
    time.sleep(2)
    stage.send_signal(signum)
    code = stage.wait(timeout=120)
    stderr = stage.stderr.read()[-3000:]
    assert code == 128 + signum, stderr
    run = MlflowClient(f"sqlite:///{db}").search_runs(
        [MlflowClient(f"sqlite:///{db}").get_experiment_by_name("aelab").experiment_id])[0]
    assert run.info.status == "KILLED", stderr
    assert not (tiny_raw / "reports/metrics/pretrain.json").exists()
    assert not (tiny_raw / "models/pretrain/ae.ckpt").exists()


def test_a_signal_inside_a_store_write_still_kills_the_run(tiny_raw, smoke_overrides):
    """A signal landing inside an MLflow write waits for the write to end: raised there, it left sqlite locked in the
    process and the run RUNNING (7 of 30 runs of this loop before it waited)."""
    cfg = compose_cfg(*smoke_overrides)
    delays = random.Random(0)
    for _ in range(20):
        with pytest.raises(SystemExit) as stop, start_run(cfg, "pretrain") as run:
            threading.Timer(delays.uniform(0.01, 0.2), os.kill, (os.getpid(), signal.SIGTERM)).start()
            for step in itertools.count():
                mlflow.log_metrics({"a": step, "b": 2.0 * step}, step=step)
        assert stop.value.code == 128 + signal.SIGTERM
        assert MlflowClient().get_run(run.info.run_id).info.status == "KILLED"


SIGNAL_IN_A_STORE_WRITE_AT_THE_END = """
import os, signal, time
from aelab.interrupts import signals_interrupt
store = {"__name__": "sqlite3.fake", "os": os, "signal": signal, "time": time}
with signals_interrupt():
    exec("os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.001)", store)  # lands in a 'store' frame: deferred
time.sleep(0.5)  # a retry still sent now would meet the default handler
"""


def test_a_signal_deferred_by_a_store_write_at_the_blocks_end_exits_as_the_signal():
    """CI once saw exit -15 (killed by the default handler) instead of 143: the retry of a signal deferred inside a
    store write fired after the block had restored the default handler."""
    for _ in range(5):
        done = subprocess.run([sys.executable, "-c", SIGNAL_IN_A_STORE_WRITE_AT_THE_END], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 128 + signal.SIGTERM, done.stderr


def test_lightnings_own_sigterm_exit_counts_as_the_signal():
    with pytest.raises(SystemExit) as stop, signals_interrupt():
        raise SIGTERMException
    assert stop.value.code == 128 + signal.SIGTERM
    assert interrupting_signal(SIGTERMException()) == signal.SIGTERM
    assert interrupting_signal(ValueError()) is None


def training_started(db: Path) -> bool:
    """Whether the stage's run has logged an epoch metric (its first training epoch is under way or done)."""
    if not db.exists():
        return False
    try:
        with sqlite3.connect(db) as con:
            return con.execute("SELECT count(*) FROM metrics WHERE key = 'train_loss'").fetchone()[0] > 0
    except sqlite3.OperationalError:  # tables not created yet
        return False


def test_a_stage_run_carries_its_data_as_an_input_and_the_environment(tiny_raw, smoke_overrides):
    cfg = compose_cfg(*smoke_overrides)
    manifest = tiny_raw / "data/raw/fashion_mnist/manifest.json"
    with start_run(cfg, "pretrain", manifest) as run:
        pass
    run = mlflow.get_run(run.info.run_id)
    (data,) = run.inputs.dataset_inputs
    assert data.dataset.name == "fashion_mnist"
    assert run.data.tags["dataset_manifest_sha256"].startswith(data.dataset.digest)
    assert [(t.key, t.value) for t in data.tags] == [("mlflow.data.context", "training")]
    assert data.dataset.source_type == "local" and "data/raw/fashion_mnist" in data.dataset.source
    tags = run.data.tags
    assert tags["env.torch"] and tags["env.cpu"] and int(tags["env.torch_threads"]) > 0
    assert (tags["env.lightning"], tags["env.xgboost"]) == (lightning.__version__, xgboost.__version__)
    assert tags["env.device"] == (torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    experiment = mlflow.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs


SYSTEM = ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes")


def test_a_stage_run_samples_the_machine_into_system_metrics_unless_turned_off(workdir, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "10")  # start_run sets it; removed after the test
    client, runs = MlflowClient(), {}
    for on, seconds in ((True, 2.0), (False, 1.2)):  # in one store: creating one takes seconds
        cfg = compose_cfg(f"mlflow.system_metrics={str(on).lower()}", "mlflow.system_metrics_interval=0.5")
        with start_run(cfg, "features") as run:
            time.sleep(seconds)
        runs[on] = client.get_run(run.info.run_id)
    recorded = {on: {key for key in run.data.metrics if key.startswith("system/")} for on, run in runs.items()}
    assert set(SYSTEM) <= recorded[True] and recorded[False] == set(), recorded
    steps = [m.step for m in client.get_metric_history(runs[True].info.run_id, SYSTEM[0])]
    assert len(steps) >= 2 and steps == sorted(steps), steps  # sampled every 0.5 s, not at MLflow's 10
    assert runs[True].data.metrics[SYSTEM[1]] > 0
