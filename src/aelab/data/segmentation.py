"""Segmentation data: the generated M2NIST-style multi-object set, CamVid-layout folders, class weights.

Generated set (stage make_segmentation_set): canvases holding up to ``max_items`` non-overlapping 28x28 items of
the downloaded image set at random positions; a pixel's label is its item's class + 1 where the item's intensity
exceeds ``threshold``, else 0 (background). Train and val canvases draw items from the training split, test
canvases from the test split; no item is used twice. Stored as ``<out_dir>/{train,val,test}.npz`` (``images``,
``masks``, ``sources`` = source indices of the items, -1 padded) and ``meta.json`` (class names, counts).

Folder set: the layout of the SegNet tutorial's CamVid, ``<root>/{train,trainannot,val,valannot,test,testannot}/``,
each annotation a single-channel PNG of class indices with the image's file stem.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from aelab.data.resident import ResidentBatches, loader_device, trainer_epoch, trainer_shard
from aelab.paths import atomic_path, require, write_json

SPLITS = ("train", "val", "test")
ITEM = 28
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class SegmentationDataError(ValueError):
    """Segmentation data that cannot be used as configured; the message names the file or folder."""


# --- the generated multi-object set -------------------------------------------------------------------------------

def place_items(rng: np.random.Generator, n_items: int, height: int, width: int,
                tries: int = 50) -> list[tuple[int, int]]:
    """Top-left corners of up to ``n_items`` pairwise disjoint ITEMxITEM boxes in the canvas (rejection sampling)."""
    boxes: list[tuple[int, int]] = []
    for _ in range(n_items):
        for _ in range(tries):
            y, x = int(rng.integers(0, height - ITEM + 1)), int(rng.integers(0, width - ITEM + 1))
            if all(abs(y - by) >= ITEM or abs(x - bx) >= ITEM for by, bx in boxes):
                boxes.append((y, x))
                break
    return boxes


def make_canvases(images: np.ndarray, labels: np.ndarray, order: np.ndarray, n: int, gen_cfg,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``n`` canvases from the items ``order[0], order[1], ...`` (each used once); also returns how many it used."""
    h, w = gen_cfg.height, gen_cfg.width
    canvases = np.zeros((n, h, w), np.uint8)
    masks = np.zeros((n, h, w), np.uint8)
    sources = np.full((n, gen_cfg.max_items), -1, np.int64)
    used = 0
    for i in range(n):
        boxes = place_items(rng, int(rng.integers(gen_cfg.min_items, gen_cfg.max_items + 1)), h, w)
        if used + len(boxes) > len(order):
            raise SegmentationDataError(f"{len(order)} items left in the split are too few for {n} canvases of up to "
                                        f"{gen_cfg.max_items} items: lower segment.generate.n_train/n_val/n_test "
                                        "(or raise data.train_limit/test_limit)")
        for j, (y, x) in enumerate(boxes):
            item = order[used]
            used += 1
            canvases[i, y:y + ITEM, x:x + ITEM] = images[item]
            masks[i, y:y + ITEM, x:x + ITEM][images[item] > gen_cfg.threshold] = labels[item] + 1
            sources[i, j] = item
    return canvases, masks, sources, used


def generate_sets(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], gen_cfg,
                  seed: int) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{"train"|"val"|"test": (images, masks, sources)}; train and val from ``train``'s items, test from ``test``'s."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train[0]))
    tr_images, tr_masks, tr_sources, used = make_canvases(*train, order, gen_cfg.n_train, gen_cfg, rng)
    val = make_canvases(*train, order[used:], gen_cfg.n_val, gen_cfg, rng)[:3]
    test_set = make_canvases(*test, rng.permutation(len(test[0])), gen_cfg.n_test, gen_cfg, rng)[:3]
    return {"train": (tr_images, tr_masks, tr_sources), "val": val, "test": test_set}


def save_generated(out_dir: Path | str, sets: dict, classes: list[str], source: dict) -> dict:
    """Write the three splits and ``meta.json``; return the meta."""
    out_dir = Path(out_dir)
    for split, (images, masks, sources) in sets.items():
        with atomic_path(out_dir / f"{split}.npz") as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, images=images, masks=masks, sources=sources)
    meta = {"classes": classes, "source": source, "counts": {split: len(s[0]) for split, s in sets.items()},
            "shape": list(sets["train"][0].shape[1:])}
    write_json(out_dir / "meta.json", meta)
    return meta


def read_meta(root: Path | str) -> dict:
    """The generated set's meta.json (fails naming the stage that writes it)."""
    return json.loads(require(Path(root) / "meta.json", "make_segmentation_set").read_text())


# --- datasets ------------------------------------------------------------------------------------------------------

class _Segmentation(Dataset):
    """(image float (C, H, W) in [0, 1], mask long (H, W)) pairs, resized, and flipped/cropped when training."""

    def __init__(self, data_cfg, train: bool):
        self.size = tuple(data_cfg.size) if data_cfg.size else None
        self.crop = tuple(data_cfg.crop) if train and data_cfg.crop else None
        self.flip = train and data_cfg.flip

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def mask(self, i: int) -> torch.Tensor:
        """Mask ``i`` at the configured size, without augmentation (for class statistics)."""
        return self._resize(None, torch.from_numpy(self.load(i)[1]).long())[1]

    def _resize(self, image, mask):
        if self.size and tuple(mask.shape) != self.size:
            mask = F.interpolate(mask[None, None].float(), self.size, mode="nearest")[0, 0].long()
            if image is not None:
                image = F.interpolate(image[None], self.size, mode="bilinear", align_corners=False)[0]
        return image, mask

    def __getitem__(self, i: int):
        image, mask = self.load(i)
        image = torch.from_numpy(image).float().div_(255)
        image = image[None] if image.ndim == 2 else image.permute(2, 0, 1)
        image, mask = self._resize(image, torch.from_numpy(mask).long())
        if self.crop:
            h, w = self.crop
            if h > mask.shape[0] or w > mask.shape[1]:
                raise SegmentationDataError(f"segment.data.crop {list(self.crop)} is larger than image {i} "
                                            f"({mask.shape[0]}x{mask.shape[1]}); set a larger segment.data.size")
            top = int(torch.randint(0, mask.shape[0] - h + 1, ()))
            left = int(torch.randint(0, mask.shape[1] - w + 1, ()))
            image, mask = image[:, top:top + h, left:left + w], mask[top:top + h, left:left + w]
        if self.flip and bool(torch.rand(()) < 0.5):
            image, mask = image.flip(-1), mask.flip(-1)
        return image, mask


class GeneratedSegmentation(_Segmentation):
    """One split of the generated set (``<root>/<split>.npz``)."""

    def __init__(self, data_cfg, split: str, train: bool = False):
        super().__init__(data_cfg, train)
        with np.load(require(Path(data_cfg.root) / f"{split}.npz", "make_segmentation_set")) as f:
            self.images, self.masks = f["images"], f["masks"]

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.images[i], self.masks[i]


class FolderSegmentation(_Segmentation):
    """One split of a CamVid-layout folder: ``<root>/<split>/NAME.*`` with ``<root>/<split>annot/NAME.png``."""

    def __init__(self, data_cfg, split: str, train: bool = False):
        super().__init__(data_cfg, train)
        self.mode = {1: "L", 3: "RGB"}[data_cfg.channels]
        self.num_classes, self.ignore_index = len(data_cfg.classes), data_cfg.ignore_index
        self.pairs = list_pairs(Path(data_cfg.root), split)
        first_image, _, first = self.pairs[0]
        for image, _, size in self.pairs if not self.size else []:
            if size != first:
                raise SegmentationDataError(f"{image} is {size[0]}x{size[1]} but {first_image} is "
                                            f"{first[0]}x{first[1]}: set segment.data.size to batch them")

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, mask_path, _ = self.pairs[i]
        with Image.open(image_path) as im:
            image = np.array(im.convert(self.mode))
        with Image.open(mask_path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise SegmentationDataError(f"{mask_path}: mask mode {im.mode}; expected a single-channel PNG of "
                                            "class indices")
            mask = np.asarray(im).astype(np.int64)
        if image.shape[:2] != mask.shape:
            raise SegmentationDataError(f"{image_path}: image is {image.shape[1]}x{image.shape[0]} but its mask "
                                        f"{mask_path} is {mask.shape[1]}x{mask.shape[0]}")
        bad = (mask >= self.num_classes) & (mask != self.ignore_index)
        if bad.any():
            raise SegmentationDataError(f"{mask_path}: class indices {sorted(np.unique(mask[bad]).tolist())} outside "
                                        f"the {self.num_classes} configured classes (ignore_index "
                                        f"{self.ignore_index})")
        return image, mask


def list_pairs(root: Path, split: str) -> list[tuple[Path, Path, tuple[int, int]]]:
    """(image, mask, (width, height)) of ``split``; fails naming the missing folder, the empty split, the missing
    mask or the mask whose size differs from its image's."""
    image_dir, mask_dir = root / split, root / f"{split}annot"
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise SegmentationDataError(f"{folder}: missing folder; the CamVid layout needs train/ trainannot/ val/ "
                                        f"valannot/ test/ testannot/ under {root} (set segment.data.root)")
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise SegmentationDataError(f"{image_dir}: empty split '{split}' (no {'/'.join(IMAGE_SUFFIXES)} images)")
    pairs = []
    for image in images:
        mask = mask_dir / f"{image.stem}.png"
        if not mask.is_file():
            raise SegmentationDataError(f"{image}: no mask {mask}")
        with Image.open(image) as im, Image.open(mask) as m:
            if im.size != m.size:
                raise SegmentationDataError(f"{image}: image is {im.size[0]}x{im.size[1]} but its mask {mask} is "
                                            f"{m.size[0]}x{m.size[1]}")
        pairs.append((image, mask, im.size))
    return pairs


# --- class statistics ----------------------------------------------------------------------------------------------

def median_frequency_weights(masks, num_classes: int, ignore_index: int | None = None) -> torch.Tensor:
    """SegNet's class balancing: weight_c = median(freq) / freq_c, freq_c = pixels of c / pixels of the images
    holding c. Classes absent from every mask get weight 0 (they never reach the loss)."""
    pixels = torch.zeros(num_classes, dtype=torch.float64)
    image_pixels = torch.zeros(num_classes, dtype=torch.float64)
    for mask in masks:
        mask = mask.flatten()
        if ignore_index is not None:
            mask = mask[mask != ignore_index]
        counts = torch.bincount(mask, minlength=num_classes)[:num_classes].double()
        pixels += counts
        image_pixels += (counts > 0) * counts.sum()
    present = pixels > 0
    freq = pixels[present] / image_pixels[present]
    weights = torch.zeros(num_classes, dtype=torch.float64)
    weights[present] = freq.median() / freq
    return weights.float()


# --- the LightningDataModule ---------------------------------------------------------------------------------------

DATASETS = {"generated": GeneratedSegmentation, "folder": FolderSegmentation}


def dataset_info(data_cfg) -> dict:
    """Class names, ignore index, input channels, a name and the file identifying the data (or None)."""
    if data_cfg.kind == "generated":
        meta = read_meta(data_cfg.root)
        return {"classes": meta["classes"], "ignore_index": None, "channels": 1,
                "name": f"segmentation set from {meta['source']['dataset']}",
                "manifest": Path(data_cfg.root) / "meta.json"}
    return {"classes": list(data_cfg.classes), "ignore_index": data_cfg.ignore_index, "channels": data_cfg.channels,
            "name": f"folder {data_cfg.root}", "manifest": None}


class SegmentationDataModule(L.LightningDataModule):
    """train/val/test of ``segment.data`` (generated set or CamVid-layout folder); augmentation on train only.

    The generated set, when neither resized, cropped nor flipped, is served resident on the Trainer's device
    (uint8 there, made float/long per batch); everything else goes through a DataLoader with ``num_workers``."""

    def __init__(self, data_cfg, batch_size: int, seed: int, num_workers: int = 0):
        super().__init__()
        self.data_cfg, self.batch_size, self.seed, self.num_workers = data_cfg, batch_size, seed, num_workers
        self.info = dataset_info(data_cfg)
        make = DATASETS[data_cfg.kind]
        self.sets = {split: make(data_cfg, split, train=split == "train") for split in SPLITS}
        self.resident = data_cfg.kind == "generated" and not (data_cfg.size or data_cfg.crop or data_cfg.flip)

    def class_weights(self) -> torch.Tensor:
        """Median-frequency weights from the (un-augmented) training masks."""
        train = self.sets["train"]
        masks = (train.mask(i) for i in range(len(train)))
        return median_frequency_weights(masks, len(self.info["classes"]), self.info["ignore_index"])

    def batches(self, split: str, device: torch.device | str, epoch_of: Callable[[], int] | None = None,
                rank: int = 0, world_size: int = 1) -> ResidentBatches:
        """The generated ``split`` as resident batches on ``device`` (``train`` reshuffled every epoch; ``rank``'s
        share under DDP)."""
        data = self.sets[split]
        return ResidentBatches((torch.from_numpy(data.images), torch.from_numpy(data.masks)), self.batch_size,
                               split == "train", self.seed, device, prepare=_float_image_long_mask,
                               epoch_of=epoch_of, rank=rank, world_size=world_size)

    def _loader(self, split: str) -> DataLoader | ResidentBatches:
        if self.resident:
            return self.batches(split, loader_device(self), trainer_epoch(self), **trainer_shard(self))
        return DataLoader(self.sets[split], batch_size=self.batch_size, shuffle=split == "train",
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader | ResidentBatches:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader | ResidentBatches:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader | ResidentBatches:
        return self._loader("test")


def _float_image_long_mask(images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, H, W) images and masks -> float (N, 1, H, W) in [0, 1] and long (N, H, W), as the Dataset gives."""
    return images.unsqueeze(1).float().div_(255), masks.long()
