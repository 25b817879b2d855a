"""Figures written by the stages (PNG under reports/figures/, also logged to MLflow)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

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


def class_palette(num_classes: int) -> torch.Tensor:
    """One RGB colour in [0, 1] per class (tab20, or turbo beyond 20 classes), (num_classes, 3)."""
    cmap = plt.get_cmap("tab20" if num_classes <= 20 else "turbo", num_classes)
    return torch.tensor(cmap(range(num_classes)), dtype=torch.float32)[:, :3]


def label_overlay(images: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int | None = None,
                  alpha: float = 0.6) -> torch.Tensor:
    """Images (N, 1 or 3, H, W) in [0, 1] with per-pixel class labels (N, H, W) blended in as colours (one per
    class, ``class_palette``); ignored pixels keep the image. Returns (N, 3, H, W)."""
    palette = class_palette(num_classes)
    images = images.detach().float().cpu().expand(-1, 3, -1, -1)
    labels = labels.detach().cpu().long()
    known = (labels >= 0) & (labels < num_classes) & (labels != (-1 if ignore_index is None else ignore_index))
    colors = palette[labels.clamp(0, num_classes - 1)].permute(0, 3, 1, 2)
    return torch.where(known[:, None], (1 - alpha) * images + alpha * colors, images)


def confusion_axes(ax, matrix: np.ndarray, classes: list[str], percent: bool = False) -> None:
    """A row-normalised confusion matrix heat map on ``ax``: counts in the cells, or the row's percentages
    (``percent``, blank below 0.5%)."""
    norm = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i, j in np.ndindex(matrix.shape):
        text = (f"{100 * norm[i, j]:.0f}" if norm[i, j] >= 0.005 else "") if percent else int(matrix[i, j])
        ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")


def confusion_matrix(path: Path | str, matrix: np.ndarray, classes: list[str], title: str) -> Path:
    """A row-normalised confusion matrix heat map with counts in the cells."""
    fig, ax = plt.subplots(figsize=(7, 6))
    confusion_axes(ax, matrix, classes)
    ax.set_title(title)
    return save_figure(fig, path)


def segmentation_scores(path: Path | str, matrix: np.ndarray, classes: list[str], iou: list[float],
                        title: str) -> Path:
    """The pixel confusion matrix (percent of each true class) beside a bar chart of the per-class IoU (NaN: a
    class in neither truth nor prediction, no bar) with the mean IoU marked."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 6.5), gridspec_kw={"width_ratios": [1.15, 1]})
    confusion_axes(left, matrix, classes, percent=True)
    left.set_title("confusion (% of the true class's pixels)")
    values = np.array(iou, dtype=float)
    right.barh(range(len(classes)), np.nan_to_num(values), color=class_palette(len(classes)).numpy(),
               edgecolor="black", linewidth=0.5)
    for i, v in enumerate(values):
        right.text(min(np.nan_to_num(v), 0.88) + 0.01, i, "n/a" if np.isnan(v) else f"{v:.3f}", va="center",
                   fontsize=9)
    mean = np.nanmean(values) if not np.isnan(values).all() else 0.0
    right.axvline(mean, color="black", linestyle="--", linewidth=1, label=f"mIoU {mean:.3f}")
    right.legend(loc="lower right")
    right.set_yticks(range(len(classes)), classes)
    right.invert_yaxis()
    right.set_xlim(0, 1)
    right.set_xlabel("IoU")
    right.set_title("per-class IoU")
    fig.suptitle(title)
    return save_figure(fig, path)


def segmentation_overlays(path: Path | str, images: torch.Tensor, truth: torch.Tensor, pred: torch.Tensor,
                          classes: list[str], ignore_index: int | None = None, min_height: int = 240) -> Path:
    """One row per image (N, 1 or 3, H, W): the image, its true labels and the predicted ones blended in, and a
    legend of the class colours. Panels keep the images' resolution (upscaled to ``min_height`` pixels where
    smaller), so a 360x480 frame is drawn at 360x480."""
    n, _, h, w = images.shape
    scale = max(1.0, min_height / h) / 100  # inches per image pixel at save_figure's 100 dpi
    colors = dict(num_classes=len(classes), ignore_index=ignore_index)
    columns = {"image": images.detach().float().cpu().expand(-1, 3, -1, -1).clamp(0, 1),
               "true labels": label_overlay(images, truth, **colors),
               "predicted labels": label_overlay(images, pred, **colors)}
    palette = class_palette(len(classes)).numpy()
    handles = [Patch(facecolor=palette[i], edgecolor="black", label=name) for i, name in enumerate(classes)]
    if ignore_index is not None:
        handles.append(Patch(facecolor="white", edgecolor="black", label=f"void ({ignore_index}): not scored"))
    width = 3 * w * scale + 0.6
    ncol = max(1, min(len(handles), int(width // 1.9)))
    legend_height = 0.3 * -(-len(handles) // ncol) + 0.2
    fig = plt.figure(figsize=(width, n * (h * scale + 0.35) + legend_height))
    grid = fig.add_gridspec(n + 1, 3, height_ratios=[h * scale] * n + [legend_height])
    for row in range(n):
        for col, (label, batch) in enumerate(columns.items()):
            ax = fig.add_subplot(grid[row, col])
            ax.imshow(batch[row].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(label, fontsize=11)
    legend = fig.add_subplot(grid[n, :])
    legend.axis("off")
    legend.legend(handles=handles, loc="center", ncol=ncol, fontsize=10, frameon=False)
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
