"""The catalog of supported datasets: where to get them, how to verify them and where they are kept."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class IdxFile:
    name: str  # file name on mirrors and in the output dir
    shape: tuple[int, ...]  # expected decoded shape
    decoded_sha256: str | None = None  # sha256 of the decompressed IDX payload (preferred)
    archive_md5: str | None = None  # md5 of the upstream .gz archive (used when decoded_sha256 is None)


@dataclass(frozen=True)
class TarArchive:
    name: str  # file name on mirrors and in the output dir
    shape: tuple[int, ...]  # shape of the image array its reader builds (all splits together)
    members: tuple[str, ...]  # paths the archive must contain
    decoded_sha256: str | None = None  # sha256 of the decompressed tar stream
    archive_md5: str | None = None  # md5 of the upstream archive (used when decoded_sha256 is None)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    mirrors: tuple[str, ...]  # base URLs tried in order; file URL = base.rstrip('/') + '/' + file.name
    system_dir: str | None  # local system copy directory, or None
    files: tuple[IdxFile | TarArchive, ...]  # IDX: train images, train labels, test images, test labels
    classes: tuple[str, ...]
    channels: int = 1  # 1: grayscale IDX sets (autoencoder, denoising); 3: color sets (colorization)


class UnknownDatasetError(ValueError):
    """The requested dataset name is not in the catalog."""


class ChannelError(ValueError):
    """A catalog data set with the wrong number of image channels for the stage that asked for it."""


_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
_SHAPES = ((60000, 28, 28), (60000,), (10000, 28, 28), (10000,))


def _files(archive_md5s: tuple[str, ...], decoded_sha256s: tuple[str | None, ...] = (None,) * 4) -> tuple[IdxFile, ...]:
    return tuple(
        IdxFile(name, shape, decoded_sha256=sha, archive_md5=md5)
        for name, shape, sha, md5 in zip(_NAMES, _SHAPES, decoded_sha256s, archive_md5s)
    )


DATASETS: dict[str, DatasetSpec] = {
    "fashion_mnist": DatasetSpec(
        name="fashion_mnist",
        mirrors=(
            "https://fashion-mnist.s3-website.eu-central-1.amazonaws.com",
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com",
        ),
        # Debian's dataset-fashion-mnist re-gzips the files (different archive bytes, same payload).
        system_dir="/usr/share/datasets/fashion-mnist",
        files=_files(
            (
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "25c81989df183df01b3e8a0aad5dffbe",
                "bef4ecab320f06d8554ea6380940ec79",
                "bb300cfdad3c16e7a12a480ee83cd310",
            ),
            (
                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
            ),
        ),
        classes=(
            "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
        ),
    ),
    "mnist": DatasetSpec(
        name="mnist",
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist", "https://storage.googleapis.com/cvdf-datasets/mnist"),
        system_dir=None,
        files=_files(
            (
                "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "d53e105ee54ea40749a09fcbcd1e9432",
                "9fb629c4189551a2d022fa330f9573f3",
                "ec29112dd5afa0611ce80d1b7f02629c",
            )
        ),
        classes=tuple(str(i) for i in range(10)),
    ),
    "kmnist": DatasetSpec(
        name="kmnist",
        mirrors=("https://codh.rois.ac.jp/kmnist/dataset/kmnist", "http://codh.rois.ac.jp/kmnist/dataset/kmnist"),
        system_dir=None,
        files=_files(
            (
                "bdb82020997e1d708af4cf47b453dcf7",
                "e144d726b3acfaa3e44228e80efcd344",
                "5c965bf0a639b31b8f53240b1b52f4d7",
                "7320c461ea6c1c855c0b718fb2a4b134",
            )
        ),
        classes=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
    ),
    "cifar10": DatasetSpec(
        name="cifar10",
        mirrors=("https://www.cs.toronto.edu/~kriz",),
        system_dir=None,
        files=(
            TarArchive(
                "cifar-10-python.tar.gz",
                (60000, 32, 32, 3),
                tuple(f"cifar-10-batches-py/{b}" for b in ("data_batch_1", "data_batch_2", "data_batch_3",
                                                           "data_batch_4", "data_batch_5", "test_batch")),
                archive_md5="c58f30108f718f92721af3b95e74349a",
            ),
        ),
        classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        channels=3,
    ),
}


def get_spec(name: str) -> DatasetSpec:
    """Return the catalog entry for ``name``; unknown names list the known ones."""
    try:
        return DATASETS[name]
    except KeyError:
        known = ", ".join(sorted(DATASETS))
        raise UnknownDatasetError(f"unknown dataset {name!r}; known datasets: {known}") from None


def raw_dir(data_cfg) -> Path:
    """Where the download stage puts ``data_cfg.name``: ``<raw_dir>/<name>/``."""
    return Path(data_cfg.raw_dir) / data_cfg.name


def image_set(name: str, channels: int) -> DatasetSpec:
    """The catalog entry for ``name`` if its images have ``channels`` channels; errors list the names that do."""
    fitting = sorted(n for n, spec in DATASETS.items() if spec.channels == channels)
    if name in fitting:
        return DATASETS[name]
    if name in DATASETS:
        raise ChannelError(f"{name!r} has {DATASETS[name].channels}-channel images but {channels}-channel ones are "
                           f"needed here: use one of {', '.join(fitting)}")
    raise UnknownDatasetError(f"unknown dataset {name!r}; known datasets: {', '.join(fitting)}")
