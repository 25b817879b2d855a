"""Stage momentum_search: the lecture's momentum search — 100 values of (1 - m) on a log scale in
[0.001, 0.1], each trained for one epoch at the learning rate lr_search chose, best by validation loss.

The network is the autoencoder, or the classifier with ``search.subject=classifier``. The momentum is SGD's
``momentum`` or, for Adam (the recipe's optimizer), its first moment decay ``beta1``.
Outputs: ``reports/metrics/momentum_search.json``, ``reports/plots/momentum_search.csv``,
``reports/figures/momentum_search.png``; the metrics say whether the candidates trained as one vectorised ensemble
(``vectorized``) and on which ``device``.
"""

from __future__ import annotations

import json
import logging
import math

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


def with_momentum(optim: dict, momentum: float) -> dict:
    """``optim`` with its momentum set: SGD's ``momentum`` or Adam's ``beta1``."""
    if optim["name"] == "sgd":
        return {**optim, "momentum": momentum}
    return {**optim, "betas": [momentum, optim["betas"][1]]}


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
@publishes_outputs
def main(cfg: DictConfig) -> dict:
    validate(cfg)
    root = output_root()
    manifest = require(raw_dir(cfg.data) / "manifest.json", "download")
    best_lr = json.loads(require("reports/metrics/lr_search.json", "lr_search").read_text())["best_lr"]
    s = cfg.search
    one_minus = log_grid(s.one_minus_momentum_min, s.one_minus_momentum_max, s.n_momentum)
    optim = {**subject_optim(cfg), "lr": best_lr}
    train, val = search_data(cfg)
    one_epoch = math.ceil(len(train[0]) / s.batch_size)
    with start_run(cfg, "momentum_search", manifest):
        losses, how = search_losses(cfg, [with_momentum(optim, 1 - v) for v in one_minus], train, val, one_epoch)
        result = run_search("momentum_search", losses, one_minus, "1 - momentum", "validation loss after one epoch",
                            root, **how)
        best = result.pop("best_index")
        result.update(best_momentum=float(1 - one_minus[best]), best_one_minus_momentum=float(one_minus[best]),
                      lr=best_lr, optimizer=optim["name"], n_batches=one_epoch, train_images=len(train[0]),
                      subject=s.subject)
        mlflow.log_metrics({"best_momentum": result["best_momentum"], "best_loss": result["best_loss"]})
        write_json(root / "reports/metrics/momentum_search.json", result)
    log.info("best momentum %.4f (1 - m = %.4g) at lr %.3g", result["best_momentum"],
             result["best_one_minus_momentum"], best_lr)
    return result


if __name__ == "__main__":
    main()
