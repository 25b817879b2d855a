"""The README's picture of ``python -m aelab.predict``: each image subcommand run, as a user would, on files written
from the pipeline's own test inputs (Fashion-MNIST test images under the denoiser's noise, a held-out colorization
photo made gray, generated segmentation canvases, Fashion-MNIST items and non-clothing images for the anomaly score),
inputs above outputs.

    python -m aelab.predict_figure [--out docs/predict.png]    # after `dvc repro`, from the project root
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from aelab import predict
from aelab.data.color import resolve_photo
from aelab.data.images import load_split
from aelab.data.noise import corrupt
from aelab.figures import save_figure

ITEMS = 4


def write_inputs(cfg, folder: Path) -> dict[str, list[Path]]:
    """The sample input files of each subcommand, written under ``folder``."""
    images = load_split(cfg.data, "test")[0][:ITEMS]
    noisy = corrupt(torch.from_numpy(images).float() / 255, cfg.denoise.noise, cfg.denoise.level,
                    torch.Generator().manual_seed(0))
    with np.load(Path(cfg.segment.data.root) / "test.npz") as f:
        canvases = f["images"][:2]
    photo = Image.open(resolve_photo(cfg.colorize.data.fallback.test_photos[0])).convert("L")
    photo.thumbnail((cfg.colorize.data.fallback.max_side,) * 2)
    rng = np.random.default_rng(0)
    odd = [(rng.random((28, 28)) * 255).astype(np.uint8),  # noise, and a bright ring: not clothing
           (255 * (np.abs(np.hypot(*np.mgrid[-14:14, -14:14]) - 9) < 2)).astype(np.uint8)]
    files = {"denoise": [(f"noisy{i}.png", (x.numpy()[0] * 255).round().astype(np.uint8))
                         for i, x in enumerate(noisy[:, None])],
             "colorize": [("photo.png", np.asarray(photo))],
             "segment": [(f"canvas{i}.png", np.squeeze(c)) for i, c in enumerate(canvases)],
             "anomaly": [(f"item{i}.png", x) for i, x in enumerate(images[:2])] + [("noise.png", odd[0]),
                                                                                   ("ring.png", odd[1])]}
    paths = {}
    for command, named in files.items():
        (folder / command).mkdir(parents=True)
        paths[command] = []
        for name, pixels in named:
            Image.fromarray(pixels).save(folder / command / name)
            paths[command].append(folder / command / name)
    return paths


def captions(out: Path) -> dict[str, str]:
    """What to write under each output: the anomaly scores, the segmentation's classes (background aside)."""
    with open(out / "anomaly" / "scores.csv", newline="") as f:
        text = {Path(row["input"]).stem: f"MSE {float(row['mse']):.3f}\npercentile {float(row['percentile']):.0f}"
                for row in csv.DictReader(f)}
    with open(out / "segment" / "summary.csv", newline="") as f:
        text.update({Path(row["input"]).stem: "\n".join([part for part in row["classes"].split("; ")
                                                         if not part.startswith("background")][:3])
                     for row in csv.DictReader(f)})
    return text


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/predict.png"))
    args = parser.parse_args(argv)
    cfg = OmegaConf.load("params.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inputs = write_inputs(cfg, tmp / "in")
        for command, paths in inputs.items():
            status = predict.main([command, *map(str, paths), "--out", str(tmp / "out" / command)])
            if status:
                raise SystemExit(f"predict {command} failed (exit {status}): see {tmp / 'out' / command}")
        text = captions(tmp / "out")
        columns = [(command, path) for command, paths in inputs.items() for path in paths]
        widths = [3 if command == "colorize" else 1.5 if command == "segment" else 1 for command, _ in columns]
        fig, axes = plt.subplots(2, len(columns), figsize=(sum(widths) * 1.3, 3.6), width_ratios=widths)
        for (command, path), (top, bottom) in zip(columns, axes.T):
            output = tmp / "out" / command / f"{path.stem}.png"
            top.imshow(Image.open(path), cmap="gray", vmin=0, vmax=255)
            top.set_title(f"{command}\n{path.name}", fontsize=7)
            if command == "anomaly":
                bottom.text(0.5, 0.5, text[path.stem], ha="center", va="center", fontsize=7)
            else:
                bottom.imshow(Image.open(output), cmap="gray", vmin=0, vmax=255)
            if command == "segment":
                bottom.set_xlabel(text[path.stem], fontsize=6)
            for ax in (top, bottom):
                ax.set_xticks([])
                ax.set_yticks([])
        axes[0, 0].set_ylabel("input", fontsize=8)
        axes[1, 0].set_ylabel("output", fontsize=8)
        fig.tight_layout()
        return save_figure(fig, args.out)


if __name__ == "__main__":
    print(main())
