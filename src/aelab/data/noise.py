"""Input corruption for the denoising autoencoder (seeded through a torch.Generator), the DataModule using it,
and the classical filters the autoencoder is measured against.

Noise kinds (``level`` is the noise strength, always in (0, 1)):

- ``zero_mask``: each pixel is set to 0 with probability ``level`` (the lecture's zero-mask noise);
- ``gaussian``: adds N(0, ``level``^2) and clips back to [0, 1];
- ``salt_pepper``: each pixel is replaced with probability ``level``, by 0 or 1 with equal odds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch.utils.data import TensorDataset

from aelab.data.images import ImageDataModule
from aelab.data.noise_kinds import NOISE_KINDS, NoiseLevelError, check_noise  # noqa: F401 (re-exported)


def corrupt(x: torch.Tensor, kind: str, level: float, generator: torch.Generator) -> torch.Tensor:
    """A noisy copy of ``x`` (images in [0, 1]); the same generator state gives the same noise."""
    check_noise(kind, level)
    if kind == "gaussian":
        return (x + level * torch.randn(x.shape, generator=generator, device=x.device)).clamp(0, 1)
    u = torch.rand(x.shape, generator=generator, device=x.device)
    if kind == "zero_mask":
        return x.masked_fill(u < level, 0.0)
    return torch.where(u < level, (u < level / 2).to(x.dtype), x)  # salt (1) below level / 2, pepper (0) above


class NoisyImageDataModule(ImageDataModule):
    """Batches of (noisy, clean) images: fresh seeded noise on every training batch, fixed noise for val/test."""

    def __init__(self, data_cfg, batch_size: int, seed: int, kind: str, level: float):
        super().__init__(data_cfg, batch_size, seed)
        check_noise(kind, level)
        self.kind, self.level = kind, level
        self._train_gen: torch.Generator | None = None

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.clean = {"val": self.val_set.tensors[0], "test": self.test_set.tensors[0]}
        self.val_set = TensorDataset(*self.fixed_noise("val"))
        self.test_set = TensorDataset(*self.fixed_noise("test"))

    def fixed_noise(self, split: str, kind: str | None = None, level: float | None = None):
        """(noisy, clean) for all of ``val`` or ``test``, the noise seeded by split (training noise by default)."""
        gen = torch.Generator().manual_seed(self.seed + {"val": 1, "test": 2}[split])
        clean = self.clean[split]
        return corrupt(clean, kind or self.kind, level or self.level, gen), clean

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if not self.trainer.training:
            return batch
        clean = batch[0]
        if self._train_gen is None or self._train_gen.device != clean.device:
            self._train_gen = torch.Generator(device=clean.device).manual_seed(self.seed)
        return corrupt(clean, self.kind, self.level, self._train_gen), clean


def median_filter(x: torch.Tensor, size: int) -> torch.Tensor:
    """Median over each ``size`` x ``size`` window (reflect padding); the classical answer to impulse noise."""
    n, c, h, w = x.shape
    pad = size // 2
    windows = F.pad(x, (pad, pad, pad, pad), mode="reflect").unfold(2, size, 1).unfold(3, size, 1)
    return windows.reshape(n, c, h, w, size * size).median(dim=-1).values  # (F.unfold is ~30x slower on CPU)


def gaussian_filter(x: torch.Tensor, size: int) -> torch.Tensor:
    """Gaussian blur with a ``size`` x ``size`` kernel (torchvision's default sigma for that size)."""
    return TF.gaussian_blur(x, [size, size])


CLASSICAL_FILTERS = {"median": median_filter, "gaussian": gaussian_filter}
