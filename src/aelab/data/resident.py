"""Batches sliced from tensors that live on the training device: the in-memory sets without a DataLoader.

A DataLoader collates every batch sample by sample on the host and copies it to the GPU; for sets that fit in
memory (all the 28x28 sets, the generated segmentation set, the color patches) that is where the time goes. Here
the whole split is moved to the device once and each batch is one index (or slice) of it. Lightning takes any
sized iterable as a loader and leaves batches that are already on its device where they are.
"""

from __future__ import annotations

import math
from typing import Callable

import lightning as L
import torch
from torch.utils.data import TensorDataset


class ResidentBatches:
    """Batches of ``batch_size`` rows of ``tensors`` (same first dimension), on ``device``.

    With ``shuffle`` every iteration (epoch) visits all rows once in a new order: a permutation drawn from a CPU
    generator seeded with ``seed`` + the epoch number, so the order does not depend on the device. The epoch number
    is ``epoch_of()`` when given (a Trainer's, so a resumed training continues the sequence of orders), else the
    count of iterations so far. Without ``shuffle`` the batches are plain slices in row order. ``prepare`` turns a
    batch of stored rows into the model's batch (e.g. uint8 -> float), on the device.

    Under data-parallel training (``world_size`` > 1) each ``rank`` takes every ``world_size``-th row of that order,
    as ``DistributedSampler`` does: every row once per epoch across the ranks, so rank r's k-th batch and the other
    ranks' k-th batches together are the k-th batch of ``batch_size * world_size`` rows of a single process. A
    shuffled (training) order is padded with its first rows to a multiple of ``world_size`` (every rank must take
    the same number of steps); an evaluation order is not, so every row is scored exactly once.
    """

    def __init__(self, tensors: tuple[torch.Tensor, ...], batch_size: int, shuffle: bool = False, seed: int = 0,
                 device: torch.device | str = "cpu", prepare: Callable[..., tuple] | None = None,
                 epoch_of: Callable[[], int] | None = None, rank: int = 0, world_size: int = 1):
        if len({len(t) for t in tensors}) != 1:
            raise ValueError(f"tensors of different lengths: {[len(t) for t in tensors]}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of the {world_size} ranks")
        self.tensors = tuple(t.to(device) for t in tensors)
        self.batch_size, self.shuffle, self.seed, self.prepare = batch_size, shuffle, seed, prepare
        self.epoch_of, self.epoch = epoch_of, 0
        self.rank, self.world_size = rank, world_size
        n = len(self.tensors[0])
        self.n_rows = math.ceil(n / world_size) if shuffle else len(range(rank, n, world_size))

    def __len__(self) -> int:
        return math.ceil(self.n_rows / self.batch_size)

    def __iter__(self):
        rows = self.rows()
        for start in range(0, self.n_rows, self.batch_size):
            if rows is None:
                batch = tuple(t[start:start + self.batch_size] for t in self.tensors)
            else:
                batch = tuple(t.index_select(0, rows[start:start + self.batch_size]) for t in self.tensors)
            yield self.prepare(*batch) if self.prepare else batch

    def rows(self) -> torch.Tensor | None:
        """This rank's rows for the next epoch, in order (on the device); None for all rows in stored order."""
        n = len(self.tensors[0])
        if not self.shuffle:
            return None if self.world_size == 1 else torch.arange(self.rank, n, self.world_size,
                                                                  device=self.tensors[0].device)
        epoch = self.epoch if self.epoch_of is None else self.epoch_of()
        self.epoch += 1
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
        order = torch.cat([order, order[:-n % self.world_size]])  # padded: the same number of steps on every rank
        return order[self.rank::self.world_size].to(self.tensors[0].device)


def loader_device(datamodule) -> torch.device:
    """The device of the Trainer a DataModule is attached to (the CPU when it is used on its own)."""
    trainer = getattr(datamodule, "trainer", None)
    return trainer.strategy.root_device if trainer is not None else torch.device("cpu")


def trainer_epoch(datamodule) -> Callable[[], int] | None:
    """The current epoch of the Trainer a DataModule is attached to, as ``ResidentBatches``'s ``epoch_of``."""
    trainer = getattr(datamodule, "trainer", None)
    return (lambda: trainer.current_epoch) if trainer is not None else None


def trainer_shard(datamodule) -> dict[str, int]:
    """``rank`` and ``world_size`` of the Trainer a DataModule is attached to (0 of 1 when used on its own)."""
    trainer = getattr(datamodule, "trainer", None)
    return {"rank": trainer.global_rank, "world_size": trainer.world_size} if trainer is not None else {}


class ResidentDataModule(L.LightningDataModule):
    """``train_set``/``val_set``/``test_set`` (TensorDatasets, set here or by a subclass's ``setup``) served as
    :class:`ResidentBatches` on the Trainer's device (this rank's share under DDP); the training batches reshuffled
    every epoch from ``seed``."""

    def __init__(self, batch_size: int, seed: int, train_set: TensorDataset | None = None,
                 val_set: TensorDataset | None = None, test_set: TensorDataset | None = None):
        super().__init__()
        self.batch_size, self.seed = batch_size, seed
        self.train_set, self.val_set, self.test_set = train_set, val_set, test_set

    def batches(self, split: str, device: torch.device | str, epoch_of: Callable[[], int] | None = None,
                rank: int = 0, world_size: int = 1) -> ResidentBatches:
        """The ``train`` (shuffled), ``val`` or ``test`` split as batches on ``device`` (``rank``'s share)."""
        dataset = {"train": self.train_set, "val": self.val_set, "test": self.test_set}[split]
        return ResidentBatches(dataset.tensors, self.batch_size, split == "train", self.seed, device,
                               epoch_of=epoch_of, rank=rank, world_size=world_size)

    def train_dataloader(self) -> ResidentBatches:
        return self.batches("train", loader_device(self), trainer_epoch(self), **trainer_shard(self))

    def val_dataloader(self) -> ResidentBatches:
        return self.batches("val", loader_device(self), **trainer_shard(self))

    def test_dataloader(self) -> ResidentBatches:
        return self.batches("test", loader_device(self), **trainer_shard(self))
