"""Hydra multirun sweeps as MLflow parent/child runs, their comparison table, and the regularization study."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import pytest

from aelab.stages import regularization
from aelab.sweep import compare, epochs_to_target, markdown_table, varying_settings
from conftest import compose_cfg, read_metrics


def test_epochs_to_target_and_default_target_is_a_loss_every_run_reached():
    assert epochs_to_target([0.9, 0.5, 0.4], 0.5) == 2
    assert epochs_to_target([0.9, 0.8], 0.5) is None
    rows = compare([{"name": "a"}, {"name": "b"}], [[(10, 0.9), (20, 0.5), (30, 0.3)], [(10, 0.6), (20, 0.45)]])
    assert rows[0]["target_val_loss"] == 0.45  # b's best: the worst of the bests
    assert (rows[0]["epochs_to_target"], rows[0]["steps_to_target"]) == (3, 30)
    assert (rows[1]["epochs_to_target"], rows[1]["steps_to_target"]) == (2, 20)


def test_varying_settings_drop_shared_overrides():
    assert varying_settings(["a=1 x=0", "a=2 x=0"]) == ["a=1", "a=2"]
    assert varying_settings(["x=0"]) == ["(defaults)"]


def test_markdown_table_formats_floats_and_missing_values():
    table = markdown_table([{"v": "a", "loss": 0.123456, "n": None}])
    assert table.splitlines() == ["| v | loss | n |", "|---|---|---|", "| a | 0.1235 | — |"]


def test_two_job_multirun_makes_one_parent_and_two_child_runs(tiny_raw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "aelab.stages.pretrain", "-m", "model.norm=none,bn_pre", "profile=smoke",
           "data.train_limit=null", "data.test_limit=null", "trainer.max_epochs=2", "trainer.accelerator=cpu",
           "trainer.enable_progress_bar=false", "pretrain.batch_size=32", "hydra.sweep.dir=sweep"]
    proc = subprocess.run(cmd, cwd=tiny_raw, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Sweep comparison" in proc.stdout

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["aelab"], output_format="list")
    parents = [r for r in runs if r.data.tags["stage"] == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 2 and len(runs) == 3
    assert sorted(c.data.params["model.norm"] for c in children) == ["bn_pre", "none"]
    assert all(c.info.status == "FINISHED" for c in runs)

    table = (tiny_raw / "sweep/comparison.md").read_text().splitlines()
    assert table[0].startswith("| settings | best_val_loss |") and "epochs_to_target" in table[0]
    assert [line.split(" | ")[0] for line in table[2:]] == ["| model.norm=none", "| model.norm=bn_pre"]
    for job in ("0", "1"):  # each job writes into its own folder, not over the DVC outputs
        assert (tiny_raw / f"sweep/{job}/models/pretrain/ae.ckpt").exists()
    assert not (tiny_raw / "models").exists()


def test_regularization_study_on_tiny_data(tiny_raw, smoke_overrides):
    cfg = compose_cfg(*smoke_overrides, "regularization.train_limit=120", "regularization.xgb_estimators=3")
    cfg.regularization.variants = {"baseline": [], "bn_pre": ["model.norm=bn_pre"],
                                   "sparse_kl": ["model.code_activation=sigmoid", "pretrain.penalty.sparsity_kl=0.1"]}
    rows = regularization.main(cfg)
    assert [r["variant"] for r in rows] == ["baseline", "bn_pre", "sparse_kl"]
    assert rows[0]["target_val_loss"] == pytest.approx(rows[0]["best_val_loss"], abs=1e-6)
    assert rows[0]["epochs_to_target"] is not None
    for row in rows:
        assert 0 <= row["frac_near_zero"] <= 1 and 0 <= row["xgb_accuracy_on_codes"] <= 1
        assert row["gap_val_minus_train"] == pytest.approx(row["final_val_loss"] - row["final_train_loss"])
    assert 0 < rows[2]["mean_activation"] < 1  # sigmoid codes
    saved = read_metrics(tiny_raw / "reports/metrics/regularization.json")
    assert set(saved) == {"baseline", "bn_pre", "sparse_kl"}
    curves = (tiny_raw / "reports/plots/regularization_val_loss.csv").read_text().splitlines()
    assert curves[0] == "epoch,baseline,bn_pre,sparse_kl" and len(curves) == 1 + cfg.regularization.max_epochs
    runs = mlflow.search_runs(experiment_names=["aelab"], output_format="list")
    parent = next(r for r in runs if r.data.tags["stage"] == "regularization" and "variant" not in r.data.tags)
    assert sum(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in runs) == 3


def test_bad_variant_is_rejected_before_training(tiny_raw, smoke_overrides):
    cfg = compose_cfg(*smoke_overrides)
    cfg.regularization.variants = {"baseline": [], "broken": ["model.dropout_hidden=1.5"]}
    with pytest.raises(ValueError, match=r"(?s)regularization\.variants\.broken.*model\.dropout_hidden"):
        regularization.main(cfg)
    assert not (tiny_raw / "reports").exists()
