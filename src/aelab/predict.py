"""Use the trained networks on your own images and tables.

    python -m aelab.predict denoise  PATH... [--out DIR] [--model URI] [--gray]
    python -m aelab.predict colorize PATH...
    python -m aelab.predict segment  PATH... [--gray]
    python -m aelab.predict encode   PATH... [--gray] [--invert auto|always|never]
    python -m aelab.predict anomaly  PATH... [--gray] [--invert auto|always|never]

(``aelab-predict`` is the same command.) A PATH is an image file (anything Pillow reads: PNG, JPEG, TIFF, BMP,
WebP...), a folder (its images, subfolders included) or, for ``encode`` and ``anomaly``, a CSV of 28x28 images, one
per row: 784 pixel columns in 0..255 (the Fashion-MNIST CSV layout), optionally a ``label`` column, kept.

The rule for sizes: denoise, colorize and segment run their fully convolutional networks on each image whole, at its
own size (padded by its edge pixels to the network's stride and cropped back), up to ``MAX_PIXELS``; a larger image
is refused (resize or tile it first). encode and anomaly use the autoencoder, which takes 28x28: each image is
letterboxed onto a square of its background and resized to 28x28 (Lanczos), and, since Fashion-MNIST draws light
clothes on black, an image with a light border is inverted first (``--invert`` decides). A colour image given to a
grayscale network is an error unless ``--gray`` converts it (images whose channels are equal count as gray).

Outputs go to ``--out`` (default ``predictions/<command>/``): a PNG per input (denoised, colorized, the segmentation
overlay and its class-index mask) or ``codes.csv`` / ``scores.csv``, and ``summary.csv`` with each input's status.
A bad input (not an image, too large, RGB for a gray network, a malformed CSV row) is reported there and on stderr,
and the rest are still processed; the exit status is 1 when any input failed, 2 when nothing could start (no such
path, an empty folder, no model).

The model is the pipeline's, ``models/<stage>/model`` (a DVC output), or ``--model``: an MLflow model URI such as
``models:/aelab-denoiser@pipeline`` (the registry of the project's tracking store) or a model folder.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from aelab.errors import UserError
from aelab.pyfunc import MODEL_DIR
from aelab.tracking import ALIAS, REGISTERED

MAX_PIXELS = 4_000_000  # per image for the convolutional networks: about 1 GB of activations on the CPU
GRAY_TOLERANCE = 2  # an RGB image whose channels differ by at most this (of 255) is gray (JPEG's chroma noise)
AE_SIZE = 28
COMMANDS = {  # command -> (pipeline stage folder, model kind (tracking.REGISTERED), what it does)
    "denoise": ("models/denoise", "denoiser", "denoise grayscale images"),
    "colorize": ("models/colorize", "colorizer", "colorize gray (or RGB, by their luminance) images"),
    "segment": ("models/segment", "segmenter", "label every pixel with a class"),
    "encode": ("models/pretrain", "autoencoder", "the autoencoder's code of each image or CSV row"),
    "anomaly": ("models/pretrain", "autoencoder", "reconstruction error (anomaly score) of each image or row"),
}


class BadInput(UserError):
    """One input that cannot be used; the message names it and says why."""


class UsageError(UserError):
    """Nothing can run: a missing path, an empty folder, no model."""


@dataclass
class Item:
    """One input: an image file, or one row of a CSV (``row`` set)."""

    path: Path
    name: str  # the output's name, unique in the run
    row: int | None = None
    pixels: np.ndarray | None = None  # a CSV row's 784 values
    label: str = ""
    error: str = ""  # why it failed
    result: dict = field(default_factory=dict)

    @property
    def source(self) -> str:
        return f"{self.path}" if self.row is None else f"{self.path}:{self.row}"


def gather(paths: list[str], tables: bool) -> list[Item]:
    """The inputs under ``paths`` in order (folders walked, sorted); CSV files become one item per row when
    ``tables``. Raises UsageError for a missing path or a folder with no file."""
    items, names = [], set()
    for given in paths:
        root = Path(given)
        if not root.exists():
            raise UsageError(f"{root}: no such file or folder")
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()
                                                     and not p.name.startswith("."))
        if not files:
            raise UsageError(f"{root}: the folder has no files")
        for path in files:
            stem = str(path.relative_to(root).with_suffix("")) if root.is_dir() else path.stem
            if tables and path.suffix.lower() == ".csv":
                items.extend(read_table(path))
                continue
            name = stem if stem not in names else f"{stem}_{path.suffix.lstrip('.')}"
            names.add(name)
            items.append(Item(path, name))
    if not items:
        raise UsageError(f"no inputs in {' '.join(paths)}: the CSVs have no data rows")
    return items


def read_table(path: Path) -> list[Item]:
    """One item per data row of the CSV ``path``: 784 pixel values (0..255) and an optional ``label`` column, with
    or without a header. A row that does not fit becomes an item that fails, naming the row."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return [Item(path, path.stem, row=0, error="the CSV is empty")]
    header = rows[0] if any(not is_number(v) for v in rows[0]) else None
    body = rows[1:] if header else rows
    width = AE_SIZE * AE_SIZE
    label_col = None
    if header and "label" in header:
        label_col = header.index("label")
    elif not header and len(rows[0]) == width + 1:
        label_col = 0  # Fashion-MNIST's CSV: the label first
    items = []
    for number, row in enumerate(body, start=2 if header else 1):
        item = Item(path, f"{path.stem}:{number}", row=number)
        values = [v for i, v in enumerate(row) if i != label_col]
        item.label = row[label_col] if label_col is not None and label_col < len(row) else ""
        if len(values) != width:
            item.error = (f"{len(values)} pixel values; a row needs {width} (28x28)"
                          + (", plus an optional 'label' column" if label_col is None else ""))
        elif not all(is_number(v) for v in values):
            item.error = "a pixel value is not a number"
        else:
            pixels = np.array(values, dtype=np.float32)
            if not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 255:
                item.error = f"pixel values span {pixels.min():g}..{pixels.max():g}; expected 0..255"
            else:
                item.pixels = pixels.reshape(1, AE_SIZE, AE_SIZE) / 255
        items.append(item)
    return items


def is_number(value: str) -> bool:
    try:
        float(value)
        return True
    except ValueError:
        return False


def read_image(path: Path) -> np.ndarray:
    """The image at ``path`` as float32 (C, H, W) in [0, 1], C = 1 for gray (RGB whose channels are equal
    included), 3 for colour; alpha is dropped, EXIF orientation applied, 16-bit scaled. Over ``MAX_PIXELS``, refused
    from the header alone."""
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise BadInput(f"{im.width}x{im.height} is {im.width * im.height / 1e6:.1f} MP, over the "
                               f"{MAX_PIXELS / 1e6:g} MP limit: resize it or cut it into tiles")
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                array = np.asarray(im, dtype=np.float32)
                array = array / (65535 if array.max() > 255 else 255)
                return np.clip(array, 0, 1)[None]
            if im.mode in ("1", "L", "LA"):
                return np.asarray(im.convert("L"), dtype=np.float32)[None] / 255
            rgb = np.asarray(im.convert("RGB"), dtype=np.int16)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise BadInput(f"not an image Pillow can read ({e.__class__.__name__}: {e})") from None
    if np.abs(rgb - rgb[..., :1]).max() <= GRAY_TOLERANCE:
        return rgb[..., 0].astype(np.float32)[None] / 255
    return rgb.transpose(2, 0, 1).astype(np.float32) / 255


def to_gray(image: np.ndarray, allowed: bool, network: str) -> np.ndarray:
    """``image`` (C, H, W) as one channel; a colour image only when ``allowed`` (Rec. 601 luma, as Pillow's L)."""
    if len(image) == 1:
        return image
    if not allowed:
        raise BadInput(f"a colour image; the {network} takes grayscale images: pass --gray to convert it")
    return (image * np.array([0.299, 0.587, 0.114], np.float32)[:, None, None]).sum(0, keepdims=True)


def to_autoencoder(image: np.ndarray, invert: str) -> np.ndarray:
    """A gray image (1, H, W) as the autoencoder's input (1, 28, 28): inverted if its border is light (``invert``
    auto) or always, letterboxed onto a square of its background, resized with Lanczos."""
    gray = image[0]
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if invert == "always" or (invert == "auto" and border.mean() > 0.5):
        gray, border = 1 - gray, 1 - border
    h, w = gray.shape
    side = max(h, w)
    square = np.full((side, side), float(np.median(border)), np.float32)
    square[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = gray
    resized = Image.fromarray(square).resize((AE_SIZE, AE_SIZE), Image.Resampling.LANCZOS)
    return np.clip(np.asarray(resized, dtype=np.float32), 0, 1)[None]


def save_png(path: Path, image: np.ndarray) -> None:
    """Write ``image`` (C, H, W) in [0, 1], or a uint8 (H, W) mask, as a PNG, atomically."""
    from aelab.paths import atomic_path

    if image.dtype != np.uint8:
        image = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
        image = image[0] if len(image) == 1 else image.transpose(1, 2, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def load_model(command: str, uri: str | None):
    """The MLflow pyfunc for ``command``: ``uri`` (a model URI or folder) or the pipeline's model folder."""
    import mlflow

    folder, kind, _ = COMMANDS[command]
    if uri is None:
        uri = f"{folder}/{MODEL_DIR}"
        if not Path(uri).is_dir():
            raise UsageError(f"no model at {uri}: run the pipeline first (`dvc repro`), or pass "
                             f"--model models:/{REGISTERED[kind]}@{ALIAS}")
    elif uri.startswith("models:/"):
        from aelab.tracking import project_tracking_uri

        mlflow.set_tracking_uri(project_tracking_uri())
    try:
        return mlflow.pyfunc.load_model(uri)
    except Exception as e:  # MLflow raises its own and OSErrors, with the URI in the message
        raise UsageError(f"cannot load the model {uri}: {str(e).splitlines()[0]}") from None


class Runner:
    """Runs one command over the items; each method fills ``item.result`` (its outputs) or raises BadInput."""

    def __init__(self, command: str, model, out: Path, args: argparse.Namespace):
        self.command, self.model, self.out, self.args = command, model, out, args

    def predict(self, x: np.ndarray, params: dict | None = None) -> np.ndarray:
        from aelab.pyfunc import InputError

        try:
            return np.asarray(self.model.predict(x, params=params))
        except InputError as e:
            raise BadInput(str(e)) from None

    def denoise(self, item: Item) -> None:
        image = to_gray(read_image(item.path), self.args.gray, "denoiser")
        denoised = self.predict(image[None])[0]
        save_png(self.out / f"{item.name}.png", denoised)
        item.result.update(output=f"{item.name}.png", size=f"{image.shape[2]}x{image.shape[1]}")

    def colorize(self, item: Item) -> None:
        image = read_image(item.path)
        rgb = self.predict(image[None])[0]
        save_png(self.out / f"{item.name}.png", rgb)
        item.result.update(output=f"{item.name}.png", size=f"{image.shape[2]}x{image.shape[1]}")

    def segment(self, item: Item) -> None:
        import torch

        from aelab.figures import label_overlay

        classes = self.model.unwrap_python_model().classes
        image = read_image(item.path)
        channels = self.model.unwrap_python_model().module.hparams.in_channels
        if channels == 1:
            image = to_gray(image, self.args.gray, "segmenter")
        elif len(image) == 1:
            image = np.repeat(image, channels, axis=0)
        labels = self.predict(image[None])[0].astype(np.int64)
        background = 0 if classes[0] == "background" else None  # left uncoloured
        overlay = label_overlay(torch.from_numpy(image[None]), torch.from_numpy(labels[None]), len(classes),
                                background)[0]
        save_png(self.out / f"{item.name}.png", overlay.numpy())
        save_png(self.out / f"{item.name}_mask.png", labels.astype(np.uint8))
        counts = np.bincount(labels.ravel(), minlength=len(classes)) / labels.size
        item.result.update(output=f"{item.name}.png", mask=f"{item.name}_mask.png",
                           classes="; ".join(f"{classes[i]} {100 * counts[i]:.1f}%" for i in np.argsort(-counts)
                                             if counts[i] > 0))

    def autoencoder_input(self, item: Item) -> np.ndarray:
        if item.pixels is not None:
            return item.pixels
        return to_autoencoder(to_gray(read_image(item.path), self.args.gray, "autoencoder"), self.args.invert)

    def table(self, items: list[Item], progress: tqdm) -> None:
        """encode / anomaly: every input read into one batch, predicted at once, written as one CSV."""
        ready = []
        for item in items:
            if not item.error:
                try:
                    ready.append((item, self.autoencoder_input(item)))
                except BadInput as e:
                    item.error = str(e)
            progress.update()
        if ready:
            x = np.stack([x for _, x in ready])
            if self.command == "encode":
                columns = {"code": self.predict(x, {"output": "code"})}
            else:
                columns = {"mse": self.predict(x, {"output": "error"}),
                           "percentile": self.predict(x, {"output": "percentile"})}
            for i, (item, _) in enumerate(ready):
                for key, values in columns.items():
                    if values.ndim == 2:
                        item.result.update({f"{key}_{j}": float(v) for j, v in enumerate(values[i])})
                    else:
                        item.result[key] = float(values[i])

    def run(self, items: list[Item]) -> None:
        with tqdm(total=len(items), desc=self.command, unit="input", disable=None) as progress:
            if self.command in ("encode", "anomaly"):
                self.table(items, progress)
                return
            step = getattr(self, self.command)
            for item in items:
                try:
                    step(item)
                except BadInput as e:
                    item.error = str(e)
                progress.update()


def write_outputs(command: str, items: list[Item], out: Path) -> Path:
    """``summary.csv`` (every input: status, message, outputs) and, for encode/anomaly, ``codes.csv`` or
    ``scores.csv`` (the rows that worked). Returns the summary's path."""
    from aelab.paths import write_csv

    rows = []
    for item in items:
        row = {"input": item.source, "status": "failed" if item.error else "ok", "message": item.error}
        if item.row is not None:
            row["label"] = item.label
        rows.append({**row, **(item.result if command not in ("encode", "anomaly") else {})})
    keys = list(dict.fromkeys(k for row in rows for k in row))
    write_csv(out / "summary.csv", [{k: row.get(k, "") for k in keys} for row in rows])
    if command in ("encode", "anomaly"):
        table = [{"input": item.source, "label": item.label, **item.result}
                 for item in items if not item.error]
        if table:
            write_csv(out / ("codes.csv" if command == "encode" else "scores.csv"), table)
    return out / "summary.csv"


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m aelab.predict", description=__doc__.split("\n\n")[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command, (folder, kind, summary) in COMMANDS.items():
        sub = commands.add_parser(command, help=summary, description=f"{summary}. See python -m aelab.predict -h.")
        tables = command in ("encode", "anomaly")
        sub.add_argument("paths", nargs="+", metavar="PATH",
                         help="image files or folders" + (", or CSVs of 784 pixel columns" if tables else ""))
        sub.add_argument("--out", type=Path, default=Path("predictions") / command,
                         help=f"output folder (default predictions/{command})")
        sub.add_argument("--model", help=f"an MLflow model URI or folder (default {folder}/{MODEL_DIR}; e.g. "
                                         f"models:/{REGISTERED[kind]}@{ALIAS})")
        if command != "colorize":
            sub.add_argument("--gray", action="store_true", help="convert colour images to gray instead of "
                                                                 "refusing them")
        if tables:
            sub.add_argument("--invert", choices=("auto", "always", "never"), default="auto",
                             help="invert images to light-on-dark, as Fashion-MNIST (auto: when the border is "
                                  "light)")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        items = gather(args.paths, tables=args.command in ("encode", "anomaly"))
        model = load_model(args.command, args.model)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    Runner(args.command, model, args.out, args).run(items)
    summary = write_outputs(args.command, items, args.out)
    failed = [item for item in items if item.error]
    for item in failed:
        print(f"{item.source}: {item.error}", file=sys.stderr)
    print(f"{len(items) - len(failed)} of {len(items)} input(s) done, {len(failed)} failed; outputs in {args.out}/, "
          f"summary {summary}", file=sys.stderr if failed else sys.stdout)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
