"""The downloaded 28x28 image sets as arrays, the seeded train/val split, and their LightningDataModule."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

from aelab.data.catalog import get_spec, raw_dir
from aelab.data.idx import read_idx
from aelab.data.resident import ResidentDataModule
from aelab.paths import require


def load_split(data_cfg, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) of the ``train`` or ``test`` split, cut to the configured limit."""
    spec = get_spec(data_cfg.name)
    folder = raw_dir(data_cfg)
    require(folder / "manifest.json", "download")
    images_file, labels_file = spec.files[:2] if split == "train" else spec.files[2:]
    images = read_idx(folder / images_file.name)
    labels = read_idx(folder / labels_file.name)
    limit = data_cfg.train_limit if split == "train" else data_cfg.test_limit
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def val_count(n: int, val_fraction: float) -> int:
    """How many of ``n`` images ``split_indices`` puts in the validation split."""
    return int(round(n * val_fraction))


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded permutation of ``range(n)`` cut into (train, val) index arrays."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = val_count(n, val_fraction)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) in [0, 1]."""
    return torch.from_numpy(images).float().div_(255).unsqueeze(1)


class ImageDataModule(ResidentDataModule):
    """Train/val from the training set (seeded split), test from the held-out test set, resident on the device.
    ``train_labels`` keeps only the first that many images of the seeded train split (a label budget, which must
    fit in the split), or with ``stratify`` a seeded class-stratified sample of that many; ``val_limit`` the first
    that many of the validation split; the test set stays whole."""

    def __init__(self, data_cfg, batch_size: int, seed: int, train_labels: int | None = None,
                 val_limit: int | None = None, stratify: bool = False):
        super().__init__(batch_size, seed)
        self.data_cfg, self.train_labels, self.val_limit, self.stratify = data_cfg, train_labels, val_limit, stratify

    def setup(self, stage: str | None = None) -> None:
        x, y = load_split(self.data_cfg, "train")
        train_idx, val_idx = split_indices(len(x), self.data_cfg.val_fraction, self.seed)
        x, y = to_tensor(x), torch.from_numpy(y).long()
        if self.train_labels is not None and self.train_labels > len(train_idx):
            raise ValueError(f"a label budget of {self.train_labels} images (classify.train_labels) is more than the "
                             f"{len(train_idx)} of {self.data_cfg.name}'s training split")
        if self.stratify and self.train_labels is not None and self.train_labels < len(train_idx):
            train_idx = np.sort(train_test_split(train_idx, train_size=self.train_labels, stratify=y[train_idx].numpy(),
                                                 random_state=self.seed)[0])
        train_idx, val_idx = train_idx[:self.train_labels], val_idx[:self.val_limit]
        self.train_set = TensorDataset(x[train_idx], y[train_idx])
        self.val_set = TensorDataset(x[val_idx], y[val_idx])
        xt, yt = load_split(self.data_cfg, "test")
        self.test_set = TensorDataset(to_tensor(xt), torch.from_numpy(yt).long())
