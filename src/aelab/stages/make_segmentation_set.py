"""Stage make_segmentation_set: the M2NIST-style multi-object segmentation set from the downloaded 28x28 images.

Outputs: ``<segment.generate.out_dir>/{train,val,test}.npz`` and ``meta.json`` (see aelab.data.segmentation);
one MLflow run with the meta and the class pixel shares of the training masks.
"""

from __future__ import annotations

import logging

import hydra
import mlflow
import numpy as np
from omegaconf import DictConfig

from aelab.config import validate
from aelab.data.catalog import get_spec
from aelab.data.images import load_split, raw_dir
from aelab.data.segmentation import generate_sets, save_generated
from aelab.paths import require
from aelab.stages import CONF_DIR, output_root, publishes_outputs
from aelab.tracking import file_hash, start_run

log = logging.getLogger(__name__)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
@publishes_outputs
def main(cfg: DictConfig) -> dict:
    validate(cfg)
    gen = cfg.segment.generate
    manifest = require(raw_dir(cfg.data) / "manifest.json", "download")
    classes = ["background", *get_spec(cfg.data.name).classes]
    sets = generate_sets(load_split(cfg.data, "train"), load_split(cfg.data, "test"), gen, cfg.seed)
    source = {"dataset": cfg.data.name, "manifest_sha256": file_hash(manifest), "seed": cfg.seed}
    with start_run(cfg, "make_segmentation_set", manifest):
        meta = save_generated(output_root() / gen.out_dir, sets, classes, source)
        masks = sets["train"][1]
        share = np.bincount(masks.ravel(), minlength=len(classes)) / masks.size
        items = (sets["train"][2] >= 0).sum(1)
        mlflow.log_dict(meta, "meta.json")
        mlflow.log_metrics({"background_share": float(share[0]), "mean_items_per_canvas": float(items.mean()),
                            **{f"{split}_canvases": n for split, n in meta["counts"].items()}})
    log.info("segmentation set: %s canvases of %s, %.2f items each, %.1f%% background pixels", meta["counts"],
             meta["shape"], items.mean(), 100 * share[0])
    return meta


if __name__ == "__main__":
    main()
