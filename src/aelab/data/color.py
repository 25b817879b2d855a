"""Color images for colorization: CIFAR-10 read from its tarball, the offline fallback cut from photographs that
installed packages ship, the sRGB <-> CIE Lab conversion the model works in, and the DataModule.

Why Lab and not RGB: L is the luminance, a and b the chroma. The network sees L (the grayscale image) and
predicts only (a, b), so the colorized image keeps exactly the input's luminance: no capacity goes into
re-creating, or blurring, what the input already shows, and the loss only measures color. Distances in ab
also follow perceived color differences far better than RGB ones, where a wrong brightness and a wrong hue
count alike.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from aelab.data.images import ImageDataModule, split_indices
from aelab.paths import require

AB_SCALE = 110.0  # |a|, |b| < 110 for every sRGB color: ab / AB_SCALE is the network's target in (-1, 1)
_XYZ_FROM_RGB = torch.tensor([[0.412453, 0.357580, 0.180423],
                              [0.212671, 0.715160, 0.072169],
                              [0.019334, 0.119193, 0.950227]], dtype=torch.float64)  # sRGB primaries, D65
_RGB_FROM_XYZ = torch.linalg.inv(_XYZ_FROM_RGB)
_WHITE = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)  # D65 reference white
_EPS = 6 / 29


class FallbackError(ValueError):
    """The fallback photographs cannot make a train/test split (too few, missing, or too small)."""


def _mix(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,njhw->nihw", matrix.to(x), x)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB (N, 3, H, W) in [0, 1] -> CIE Lab (D65): L in [0, 100], a and b roughly in [-110, 110]."""
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = _mix(_XYZ_FROM_RGB, linear) / _WHITE.to(rgb).view(1, 3, 1, 1)
    f = torch.where(xyz > _EPS**3, xyz.clamp_min(_EPS**3) ** (1 / 3), xyz / (3 * _EPS**2) + 4 / 29)
    fx, fy, fz = f.unbind(1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """CIE Lab (N, 3, H, W) -> sRGB in [0, 1] (colors outside the sRGB gamut are clipped)."""
    l, a, b = lab.unbind(1)
    fy = (l + 16) / 116
    f = torch.stack([fy + a / 500, fy, fy - b / 200], dim=1)
    xyz = torch.where(f > _EPS, f**3, 3 * _EPS**2 * (f - 4 / 29)) * _WHITE.to(lab).view(1, 3, 1, 1)
    linear = _mix(_RGB_FROM_XYZ, xyz)
    rgb = torch.where(linear > 0.0031308, 1.055 * linear.clamp_min(0.0031308) ** (1 / 2.4) - 0.055, 12.92 * linear)
    return rgb.clamp(0, 1)


def to_model_space(images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, H, W, 3) RGB -> (L / 100 as (N, 1, H, W), ab / AB_SCALE as (N, 2, H, W)), float32."""
    lab = rgb_to_lab(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    return lab[:, :1] / 100, lab[:, 1:] / AB_SCALE


def to_rgb(l_in: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    """The RGB image (N, 3, H, W) in [0, 1] of model-space luminance and chroma; ``ab = 0`` gives the gray one."""
    return lab_to_rgb(torch.cat([l_in * 100, ab * AB_SCALE], dim=1))


def read_cifar(path: Path | str, members: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) uint8 (N, 32, 32, 3) images from the CIFAR-10 python tarball (last member: the test batch)."""
    batches = []
    with tarfile.open(path, "r:*") as tar:
        for member in members:
            with tar.extractfile(member) as f:  # a pickle from the md5-verified archive
                data = pickle.load(io.BytesIO(f.read()), encoding="bytes")[b"data"]
            batches.append(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return np.concatenate(batches[:-1]), batches[-1]


def resolve_photo(ref: str) -> Path:
    """``package:relative/path`` inside an installed package, or a plain file path."""
    package, sep, rel = ref.partition(":")
    if not sep or Path(ref).exists():
        return Path(ref)
    try:
        return Path(str(importlib.resources.files(package) / rel))
    except ModuleNotFoundError:
        raise FallbackError(f"fallback photo {ref!r}: package {package!r} is not installed") from None


def grid_tiles(pixels: np.ndarray, size: int) -> np.ndarray:
    """The non-overlapping ``size`` x ``size`` tiles of an (H, W, 3) image, row by row from the top left."""
    h, w, _ = pixels.shape
    return np.stack([pixels[y:y + size, x:x + size] for y in range(0, h - size + 1, size)
                     for x in range(0, w - size + 1, size)])


def photo_patches(photos: list[str], test_photos: list[str], patch_size: int, patches_per_photo: int, max_side: int,
                  seed: int) -> tuple[dict[str, np.ndarray], dict]:
    """Patches of each photograph (shrunk to at most ``max_side`` per side), split by photo.

    The ``test_photos`` (refs among ``photos``) are held out whole and cut into the grid of non-overlapping
    ``patch_size`` tiles: every pixel scored once, and the same test set whatever the seed. The others give
    ``patches_per_photo`` random crops each, drawn with ``seed``. Returns the arrays ``train``, ``test`` (uint8
    (N, patch_size, patch_size, 3)), ``train_photo``, ``test_photo`` (each patch's index in ``photo_names``) and
    ``photo_names`` (the refs), and a description of every photograph used.
    """
    unknown = [ref for ref in test_photos if ref not in photos]
    if unknown:
        raise FallbackError(f"test photograph(s) {unknown} are not among the fallback photos {photos}")
    if len(photos) - len(set(test_photos)) < 2:
        raise FallbackError(f"{len(photos)} fallback photograph(s) with {len(set(test_photos))} held out for testing "
                            "leave fewer than two for training and validation: list more photos")
    rng = np.random.default_rng(seed)
    patches: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    photo_of: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    info = {}
    for i, ref in enumerate(photos):
        path = resolve_photo(ref)
        if not path.is_file():
            raise FallbackError(f"fallback photo {ref!r} not found at {path}")
        image = Image.open(path).convert("RGB")
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        pixels = np.asarray(image)
        h, w, _ = pixels.shape
        if min(h, w) < patch_size:
            raise FallbackError(f"fallback photo {ref!r} is {w}x{h} after shrinking to max_side={max_side}: "
                                f"smaller than patch_size={patch_size}")
        split = "test" if ref in test_photos else "train"
        if split == "test":
            cut = grid_tiles(pixels, patch_size)
        else:
            ys = rng.integers(0, h - patch_size + 1, patches_per_photo)
            xs = rng.integers(0, w - patch_size + 1, patches_per_photo)
            cut = np.stack([pixels[y:y + patch_size, x:x + patch_size] for y, x in zip(ys, xs)])
        patches[split].append(cut)
        photo_of[split].append(np.full(len(cut), i))
        info[ref] = {"split": split, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "size": [w, h],
                     "patches": len(cut)}
    arrays = {split: np.concatenate(patches[split]) for split in patches}
    arrays.update({f"{split}_photo": np.concatenate(photo_of[split]) for split in photo_of})
    arrays["photo_names"] = np.array(photos)
    return arrays, info


def split_by_photo(photo: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices holding out whole photographs: ``val_fraction`` of them, at least one."""
    ids = np.unique(photo)
    if len(ids) < 2:
        raise FallbackError(f"{len(ids)} training photograph(s) cannot be split into train and validation by photo: "
                            "list more photos in colorize.data.fallback.photos")
    n_val = min(len(ids) - 1, max(1, int(round(len(ids) * val_fraction))))
    val = np.isin(photo, np.random.default_rng(seed).permutation(ids)[:n_val])
    return np.flatnonzero(~val), np.flatnonzero(val)


class ColorDataModule(ImageDataModule):
    """(L, ab) batches in model space from ``<colorize.data.out_dir>/images.npz``.

    Train/val: a seeded split of the first ``train_limit`` training images (for the photograph fallback, by
    photograph, so validation measures colors of unseen photos as the test does); test: the test images, whose
    original RGB is kept as ``test_rgb`` for scoring. ``test_groups``: for the fallback, the test images of each
    held-out photograph (name -> indices); empty for a catalog set.
    """

    def setup(self, stage: str | None = None) -> None:
        with np.load(require(Path(self.data_cfg.data.out_dir) / "images.npz", "make_color_set")) as f:
            train, test = f["train"][:self.data_cfg.train_limit], f["test"]
            photo = f["train_photo"][:self.data_cfg.train_limit] if "train_photo" in f.files else None
            test_photo, names = (f["test_photo"], f["photo_names"]) if "test_photo" in f.files else ([], [])
        self.test_groups = {Path(str(names[i])).stem: np.flatnonzero(test_photo == i) for i in np.unique(test_photo)}
        if photo is None:
            train_idx, val_idx = split_indices(len(train), self.data_cfg.val_fraction, self.seed)
        else:
            train_idx, val_idx = split_by_photo(photo, self.data_cfg.val_fraction, self.seed)
        l_in, ab = to_model_space(train)
        self.train_set = TensorDataset(l_in[train_idx], ab[train_idx])
        self.val_set = TensorDataset(l_in[val_idx], ab[val_idx])
        self.test_set = TensorDataset(*to_model_space(test))
        self.test_rgb = torch.from_numpy(test).permute(0, 3, 1, 2).float() / 255
