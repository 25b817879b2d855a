"""Data-parallel training with Lightning DDP: every sample once per epoch across the ranks, and a 2-process fit
(CPU, gloo) that equals a 1-process fit of the same global batch, with one checkpoint and one MLflow run."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import mlflow
import pytest
import torch

from aelab.data.resident import ResidentBatches
from aelab.distributed import global_rank
from conftest import compose_cfg


def shard_epoch(n: int, world: int, batch_size: int, shuffle: bool) -> list[list[list[int]]]:
    """Per rank, one epoch's batches of row numbers."""
    rows = torch.arange(n)
    return [[b[0].tolist() for b in ResidentBatches((rows,), batch_size, shuffle, seed=3, rank=r, world_size=world)]
            for r in range(world)]


@pytest.mark.parametrize("world", [2, 3])
def test_training_shards_together_are_the_single_process_batches(world):
    single = [b[0].tolist() for b in ResidentBatches((torch.arange(96),), 8 * world, shuffle=True, seed=3)]
    ranks = shard_epoch(96, world, 8, shuffle=True)
    assert all(len(r) == len(single) for r in ranks)  # the same number of steps on every rank
    for k, batch in enumerate(single):  # the k-th batches of all ranks are the k-th global batch
        assert sorted(sum((r[k] for r in ranks), [])) == sorted(batch)


def test_shuffled_shards_are_padded_to_equal_steps_and_eval_shards_score_each_row_once():
    ranks = shard_epoch(11, 2, 4, shuffle=True)
    seen = sum((sum(r, []) for r in ranks), [])
    assert [len(sum(r, [])) for r in ranks] == [6, 6] and set(seen) == set(range(11))  # one row twice, as
    assert len(seen) == 12                                                              # DistributedSampler pads
    ranks = shard_epoch(11, 2, 4, shuffle=False)
    assert sorted(sum((sum(r, []) for r in ranks), [])) == list(range(11))


def test_the_rank_is_known_before_any_trainer(monkeypatch):
    cfg = compose_cfg("trainer=ddp", "trainer.devices=4")
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    assert global_rank(cfg.trainer) == 0  # the process that launches the others
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("NODE_RANK", "1")
    assert global_rank(cfg.trainer) == 7  # Lightning's launcher, second node
    monkeypatch.setenv("RANK", "5")
    assert global_rank(cfg.trainer) == 5  # torchrun


def run_pretrain(root, *overrides: str) -> dict:
    cmd = [sys.executable, "-m", "aelab.stages.pretrain", "profile=smoke", "trainer.max_epochs=3",
           "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "data.train_limit=null",
           "data.test_limit=null", "hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout",
           "hydra/hydra_logging=none", *overrides]
    proc = subprocess.run(cmd, cwd=root, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(root / "reports/plots/pretrain_loss.csv") as f:
        losses = [{k: float(v) for k, v in row.items() if k != "epoch_seconds"} for row in csv.DictReader(f)]
    return {"log": proc.stdout + proc.stderr, "losses": losses,
            "metrics": json.loads((root / "reports/metrics/pretrain.json").read_text())}


def test_a_two_process_ddp_fit_equals_one_process_of_the_same_global_batch(tiny_raw):
    plain = "model.norm=none"  # batch norm on CPUs normalises per process (torch's SyncBatchNorm is GPU-only)
    single = run_pretrain(tiny_raw, plain, "pretrain.batch_size=32")
    ddp = run_pretrain(tiny_raw, plain, "trainer=ddp", "trainer.devices=2", "pretrain.batch_size=16")
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in ddp["log"]  # two processes really trained
    assert ddp["losses"] == [pytest.approx(row, rel=1e-4) for row in single["losses"]]
    for key in ("best_val_loss", "test_loss", "test_mse"):
        assert ddp["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-4)
    assert sorted(p.name for p in (tiny_raw / "models/pretrain").iterdir()) == ["ae.ckpt", "model"]
    assert not list(tiny_raw.glob(".aelab-staging-*"))
    runs = mlflow.search_runs(experiment_names=["aelab"], output_format="list")
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED"]  # one run per stage run, not one per rank
