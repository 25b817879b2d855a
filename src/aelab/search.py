"""The lecture's hyper-parameter recipe: one very short training per candidate value, best by validation loss.

Every candidate starts from the same initial weights and sees the same mini-batches, so only the searched value
differs. The trainings are a few dozen steps each and there are a hundred of them, so they run as a plain loop over
the LightningModule's own ``losses`` and ``configure_optimizers`` (a Trainer's start-up would cost more than the
training itself); loss, penalties and optimizer are exactly those of the pretrain stage.
"""

from __future__ import annotations

import math
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from tqdm import tqdm  # noqa: E402

from aelab.data.images import load_split, split_indices, to_tensor  # noqa: E402
from aelab.figures import save_figure  # noqa: E402
from aelab.lit.autoencoder import AutoencoderModule  # noqa: E402
from aelab.paths import write_csv  # noqa: E402


def log_grid(low: float, high: float, n: int) -> np.ndarray:
    """``n`` values evenly spaced on a log scale from ``low`` to ``high``."""
    return np.logspace(math.log10(low), math.log10(high), n)


def search_data(cfg: DictConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``search.train_limit`` / ``search.val_limit`` images of the seeded train / val split."""
    images, _ = load_split(cfg.data, "train")
    train_idx, val_idx = split_indices(len(images), cfg.data.val_fraction, cfg.seed)
    return to_tensor(images[train_idx[:cfg.search.train_limit]]), to_tensor(images[val_idx[:cfg.search.val_limit]])


def short_training_loss(cfg: DictConfig, optim: dict, x_train: torch.Tensor, x_val: torch.Tensor,
                        n_batches: int) -> float:
    """Validation loss after ``n_batches`` mini-batches with ``optim``; ``inf`` when training diverged."""
    torch.manual_seed(cfg.seed)
    plain = OmegaConf.to_container(cfg, resolve=True)
    module = AutoencoderModule(plain["model"], plain["pretrain"]["loss"], {**optim, "schedule": "none"},
                               plain["pretrain"]["penalty"])
    opt = module.configure_optimizers()
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(cfg.seed))
    size = cfg.search.batch_size
    module.train()
    for step in range(n_batches):
        start = (step * size) % len(x_train)
        recon, penalty = module.losses(x_train[order[start:start + size]])
        loss = recon + penalty
        if not torch.isfinite(loss):
            return math.inf
        opt.zero_grad()
        loss.backward()
        opt.step()
    module.eval()
    with torch.no_grad():
        val = float(module.reconstruction_loss(module.model(x_val), x_val))
    return val if math.isfinite(val) else math.inf


def run_search(name: str, candidates: list, loss_fn: Callable[[object], float], plot_x: np.ndarray, xlabel: str,
               ylabel: str, root) -> dict:
    """``loss_fn`` of every candidate; write ``reports/plots/<name>.csv`` and ``reports/figures/<name>.png``, log
    them to the active MLflow run; return the best candidate's index and loss (diverged runs count as ``inf``)."""
    losses = []
    for candidate in tqdm(candidates, desc=name, unit="run"):
        losses.append(loss_fn(candidate))
        mlflow.log_metric("val_loss", min(losses[-1], 1e6), step=len(losses) - 1)
    best = int(np.argmin(losses))
    finite = np.isfinite(losses)
    write_csv(root / f"reports/plots/{name}.csv",
              [{"x": float(x), "log10_x": math.log10(x), "val_loss": loss if math.isfinite(loss) else ""}
               for x, loss in zip(plot_x, losses)])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(plot_x[finite], np.asarray(losses)[finite], marker=".")
    ax.axvline(plot_x[best], color="tab:red", linestyle="--", label=f"best: {xlabel} = {plot_x[best]:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    mlflow.log_artifact(str(save_figure(fig, root / f"reports/figures/{name}.png")))
    return {"best_index": best, "best_loss": losses[best], "n_candidates": len(candidates),
            "n_diverged": int((~finite).sum())}
