"""Which process of a data-parallel (Lightning DDP) run this is, and leaving the process group once the shared work
is done. A DDP stage runs in every process; only rank 0 tracks it in MLflow and writes its outputs."""

from __future__ import annotations

import os

import torch.distributed as dist


def global_rank(trainer_cfg) -> int:
    """This process's rank among all ranks (0 outside DDP), known before any Trainer exists: torchrun's ``RANK``;
    Lightning's own launcher's ``NODE_RANK`` and ``LOCAL_RANK`` (its spawned processes have them from the start,
    the launching one is local rank 0); srun's ``SLURM_PROCID``."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"])
    node = int(env.get("NODE_RANK", 0))
    if "LOCAL_RANK" in env or node:
        per_node = trainer_cfg.devices if isinstance(trainer_cfg.devices, int) else 1
        return node * per_node + int(env.get("LOCAL_RANK", 0))
    return int(env.get("SLURM_PROCID", 0))


def is_main_process(trainer_cfg) -> bool:
    """True in rank 0 (and outside DDP): the process that tracks the stage and writes its outputs."""
    return global_rank(trainer_cfg) == 0


def leave_process_group() -> bool:
    """Call after a stage's last step that all ranks share (fit, test): every rank waits for the others, leaves the
    process group, and only rank 0 goes on (True) to evaluate alone and write the outputs; the others are done
    (False). Outside DDP: True."""
    if not (dist.is_available() and dist.is_initialized()):
        return True
    dist.barrier()
    rank = dist.get_rank()
    dist.destroy_process_group()
    return rank == 0
