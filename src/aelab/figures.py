"""Figures written by the stages (PNG under reports/figures/, also logged to MLflow)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from aelab.paths import atomic_path  # noqa: E402


def image_rows(path: Path | str, rows: dict[str, torch.Tensor]) -> Path:
    """One labelled row per entry of ``rows`` (each a (N, 1 or 3, H, W) batch in [0, 1]), saved as a PNG."""
    from torchvision.utils import make_grid  # imported here: torchvision costs a second at import

    fig, axes = plt.subplots(len(rows), 1, figsize=(12, 1.3 * len(rows)), squeeze=False)
    for ax, (label, images) in zip(axes[:, 0], rows.items()):
        grid = make_grid(images.detach().float().cpu().clamp(0, 1), nrow=len(images), padding=2, pad_value=1.0)
        ax.imshow(grid.permute(1, 2, 0).numpy())  # make_grid repeats 1-channel images into gray RGB
        ax.set_ylabel(label, rotation=0, ha="right", va="center")
        ax.set_xticks([])
        ax.set_yticks([])
    return save_figure(fig, path)


def label_overlay(images: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int | None = None,
                  alpha: float = 0.6) -> torch.Tensor:
    """Images (N, 1 or 3, H, W) in [0, 1] with per-pixel class labels (N, H, W) blended in as colours (one per
    class, tab20 or turbo); ignored pixels keep the image. Returns (N, 3, H, W) for ``image_rows``."""
    palette = torch.tensor(plt.get_cmap("tab20" if num_classes <= 20 else "turbo", num_classes)(range(num_classes)),
                           dtype=torch.float32)[:, :3]
    images = images.detach().float().cpu().expand(-1, 3, -1, -1)
    labels = labels.detach().cpu().long()
    known = (labels >= 0) & (labels < num_classes) & (labels != (-1 if ignore_index is None else ignore_index))
    colors = palette[labels.clamp(0, num_classes - 1)].permute(0, 3, 1, 2)
    return torch.where(known[:, None], (1 - alpha) * images + alpha * colors, images)


def confusion_matrix(path: Path | str, matrix: np.ndarray, classes: list[str], title: str) -> Path:
    """A row-normalised confusion matrix heat map with counts in the cells."""
    fig, ax = plt.subplots(figsize=(7, 6))
    norm = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i, j in np.ndindex(matrix.shape):
        ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7,
                color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    return save_figure(fig, path)


def save_figure(fig, path: Path | str) -> Path:
    """Save a matplotlib figure as a PNG, atomically, and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.tight_layout()
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def roc_panels(path: Path | str, fpr: np.ndarray, curves: dict[str, dict[str, np.ndarray]],
               aucs: dict[str, dict[str, float]]) -> Path:
    """Small multiples, one panel per entry of ``curves`` ({panel: {method: TPR at ``fpr``}}); ``aucs`` in legends."""
    cols = min(len(curves), 5)
    rows = -(-len(curves) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.8 * cols, 2.8 * rows), sharex=True, sharey=True, squeeze=False)
    for ax, (panel, by_method) in zip(axes.flat, curves.items()):
        ax.plot([0, 1], [0, 1], ":", color="gray", lw=0.8)
        for method, tpr in by_method.items():
            ax.plot(fpr, tpr, label=f"{method} {aucs[panel][method]:.3f}")
        ax.set_title(panel, fontsize=9)
        ax.legend(fontsize=7, loc="lower right", title="ROC-AUC", title_fontsize=7)
    for ax in axes.flat[len(curves):]:
        ax.set_axis_off()
    fig.supxlabel("false positive rate")
    fig.supylabel("true positive rate")
    return save_figure(fig, path)
