"""Stage lr_search: the lecture's learning-rate search — 100 learning rates on a log scale, each trained for a few
dozen mini-batches from the same start, best by validation loss; of the autoencoder, or of the classifier with
``search.subject=classifier``.

Outputs: ``reports/metrics/lr_search.json`` (``best_lr``, read by momentum_search), ``reports/plots/lr_search.csv``,
``reports/figures/lr_search.png`` (loss vs learning rate, log x). The metrics say whether the candidates trained as
one vectorised ensemble (``vectorized``) and on which ``device``.
"""

from __future__ import annotations

import logging

import hydra
import mlflow
from omegaconf import DictConfig

from aelab.config import validate
from aelab.data.images import raw_dir
from aelab.paths import require, write_json
from aelab.search import log_grid, run_search, search_data, search_losses, subject_optim
from aelab.stages import CONF_DIR, output_root, publishes_outputs
from aelab.tracking import start_run

log = logging.getLogger(__name__)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
@publishes_outputs
def main(cfg: DictConfig) -> dict:
    validate(cfg)
    root = output_root()
    manifest = require(raw_dir(cfg.data) / "manifest.json", "download")
    s = cfg.search
    lrs = log_grid(s.lr_min, s.lr_max, s.n_lr)
    optim = subject_optim(cfg)
    train, val = search_data(cfg)
    with start_run(cfg, "lr_search", manifest):
        losses, how = search_losses(cfg, [{**optim, "lr": float(lr)} for lr in lrs], train, val, s.lr_batches)
        result = run_search("lr_search", losses, lrs, "learning rate",
                            f"validation loss after {s.lr_batches} mini-batches", root, **how)
        result.update(best_lr=float(lrs[result.pop("best_index")]), optimizer=optim["name"],
                      n_batches=s.lr_batches, train_images=len(train[0]), subject=s.subject)
        mlflow.log_metrics({"best_lr": result["best_lr"], "best_loss": result["best_loss"]})
        write_json(root / "reports/metrics/lr_search.json", result)
    log.info("best learning rate %.3g (validation loss %.4f after %d mini-batches)", result["best_lr"],
             result["best_loss"], s.lr_batches)
    return result


if __name__ == "__main__":
    main()
