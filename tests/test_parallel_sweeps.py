"""Sweeps in parallel with Hydra's joblib launcher: 4 jobs at once, one parent run with 4 children and a complete
comparison table, whether the runs go to the sqlite file or to ``mlflow server`` on PostgreSQL (aelab.server:
a throwaway cluster on a free local port, stopped afterwards). And the SLURM launcher config composes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import mlflow
import pytest
from hydra import compose, initialize_config_dir

from aelab.server import free_port, mlflow_server, postgres, postgres_bin
from aelab.stages import CONF_DIR

LRS = ["0.001", "0.002", "0.003", "0.004"]


@pytest.fixture
def postgres_server(tiny_raw):
    """``mlflow server`` on a fresh PostgreSQL database; its URL."""
    try:
        postgres_bin("initdb")
    except FileNotFoundError as err:
        pytest.skip(str(err))
    folder = tempfile.mkdtemp(prefix="aelab-pg-")  # not under pytest's root-only tmp: the postgres user reads it
    try:
        with (postgres(folder, free_port()) as db,
              mlflow_server(db, free_port(), tiny_raw, tiny_raw / "artifacts", workers=2) as url):
            yield url
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_parallel_sweep(root, tracking_uri: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "aelab.stages.pretrain", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=4",
           f"pretrain.optim.lr={','.join(LRS)}", "profile=smoke", "data.train_limit=null", "data.test_limit=null",
           "trainer.max_epochs=2", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
           "pretrain.batch_size=32", "hydra.sweep.dir=sweep"]
    proc = subprocess.run(cmd, cwd=root, env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def check_sweep(root, tracking_uri: str) -> None:
    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(experiment_names=["aelab"], output_format="list")
    (parent,) = [r for r in runs if r.data.tags["stage"] == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 5 and len(children) == 4
    assert sorted(c.data.params["pretrain.optim.lr"] for c in children) == LRS
    assert len({c.data.tags["pid"] for c in children}) > 1  # really run by several processes
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all(len(mlflow.MlflowClient().get_metric_history(c.info.run_id, "val_loss")) == 2 for c in children)
    table = (root / "sweep/comparison.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in table[2:]] == [f"| pretrain.optim.lr={lr}" for lr in LRS]
    assert all("FINISHED" in line for line in table[2:])
    for job in range(4):
        assert (root / f"sweep/{job}/models/pretrain/ae.ckpt").exists()


def test_four_parallel_jobs_into_sqlite(tiny_raw):
    run_parallel_sweep(tiny_raw, os.environ["MLFLOW_TRACKING_URI"])
    check_sweep(tiny_raw, os.environ["MLFLOW_TRACKING_URI"])


def test_four_parallel_jobs_into_the_postgresql_server(tiny_raw, postgres_server):
    run_parallel_sweep(tiny_raw, postgres_server)
    check_sweep(tiny_raw, postgres_server)
    assert list((tiny_raw / "artifacts").rglob("ae.ckpt"))  # artifacts went through the server


def test_the_slurm_launcher_config_composes():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.tasks_per_node == 1 and launcher.timeout_min > 0
