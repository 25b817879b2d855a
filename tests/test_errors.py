"""Expected failures from the command line, each in a subprocess on generated fixtures: exit status 1, stderr names
the key, file or store and the fix, no traceback unless AELAB_DEBUG=1, and every file there before (outputs, the
tracking store) byte-identical afterwards."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from aelab.server import free_port
from aelab.stages import pretrain
from conftest import compose_cfg

STAGE_ARGS = ["profile=smoke", "trainer.max_epochs=1", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
              "data.train_limit=null", "data.test_limit=null", "pretrain.batch_size=32", "hydra.run.dir=.",
              "hydra.output_subdir=null", "hydra/job_logging=stdout", "hydra/hydra_logging=none"]


def run(root, module: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=root, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


def files(root) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_reported(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 1, each needle on stderr, no traceback anywhere."""
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "AELAB_DEBUG=1 shows the traceback" in proc.stderr


@pytest.fixture
def trained(tiny_raw, smoke_overrides):
    """The tiny project after a pretrain run (checkpoint, metrics, the store): what a failure must leave alone."""
    pretrain.main(compose_cfg(*smoke_overrides))
    return tiny_raw


def test_a_bad_config_value_is_one_line_and_the_traceback_is_a_switch_away(trained):
    before = files(trained)
    proc = run(trained, "aelab.stages.pretrain", *STAGE_ARGS, "pretrain.optim.lr=-1")
    assert_reported(proc, "aelab.stages.pretrain: error: invalid config:",
                    "pretrain.optim.lr: Input should be greater than 0 (got -1)")
    assert files(trained) == before
    debug = run(trained, "aelab.stages.pretrain", *STAGE_ARGS, "pretrain.optim.lr=-1", AELAB_DEBUG="1")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there")
def test_a_gpu_asked_for_on_a_machine_without_one_names_the_key(tiny_raw):
    proc = run(tiny_raw, "aelab.stages.pretrain", *STAGE_ARGS, "trainer.accelerator=gpu")
    assert_reported(proc, "trainer.accelerator: Value error, 'gpu' asked for", "trainer.accelerator=auto")


def test_a_missing_upstream_checkpoint_names_the_stage_to_run(tiny_raw):
    before = files(tiny_raw)
    proc = run(tiny_raw, "aelab.stages.features", *STAGE_ARGS)
    assert_reported(proc, "missing input models/pretrain/ae.ckpt: run the 'pretrain' stage first")
    assert files(tiny_raw) == before


def test_a_truncated_checkpoint_names_its_path_and_the_dvc_command_that_restores_it(trained):
    ckpt = trained / "models/pretrain/ae.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:5000])
    before = files(trained)
    proc = run(trained, "aelab.stages.features", *STAGE_ARGS)
    assert_reported(proc, "models/pretrain/ae.ckpt is not a readable checkpoint",
                    "`dvc checkout models/pretrain`", "`dvc repro -f -s pretrain`")
    assert files(trained) == before


def test_a_damaged_tracking_store_is_named_and_left_as_it_is(trained):
    store = trained / "mlflow.db"
    store.write_bytes(store.read_bytes()[:len(store.read_bytes()) // 3])  # truncated, its header intact
    before = files(trained)
    proc = run(trained, "aelab.stages.pretrain", *STAGE_ARGS)
    assert_reported(proc, f"the tracking store {store} is not a readable SQLite database",
                    f"mv {store} {store}.broken", "MLFLOW_TRACKING_URI")
    assert files(trained) == before  # the checkpoint and metrics of the earlier run too

    store.write_text("not a database at all")
    proc = run(trained, "aelab.stages.pretrain", *STAGE_ARGS)
    assert_reported(proc, f"the tracking store {store} is not a readable SQLite database")


def test_an_unreachable_tracking_server_is_named_with_the_way_back_to_sqlite(trained):
    before = files(trained)
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = run(trained, "aelab.stages.pretrain", *STAGE_ARGS, MLFLOW_TRACKING_URI=uri)
    assert_reported(proc, f"cannot reach the tracking server {uri}", "make server", "unset MLFLOW_TRACKING_URI")
    assert files(trained) == before


def test_check_metrics_reports_a_missing_baseline_in_one_line(tiny_raw):
    proc = run(tiny_raw, "aelab.check_metrics", "--baseline", str(tiny_raw / "no-such-folder"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "no metrics folder" in proc.stderr and "no-such-folder" in proc.stderr
