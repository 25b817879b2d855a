"""Stage download: fetch and verify the configured data set into ``data/raw/<name>/`` with a manifest.json."""

from __future__ import annotations

import logging

import hydra
import mlflow
from omegaconf import DictConfig

from aelab.config import validate
from aelab.data.catalog import get_spec, raw_dir
from aelab.data.download import download_dataset, manifest_hash
from aelab.stages import CONF_DIR
from aelab.tracking import start_run

log = logging.getLogger(__name__)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    validate(cfg)
    out = raw_dir(cfg.data)
    manifest = download_dataset(get_spec(cfg.data.name), out, cfg.data.mirror)
    with start_run(cfg, "download", out / "manifest.json"):
        mlflow.log_artifact(str(out / "manifest.json"))
        mlflow.log_metric("bytes", sum(f["bytes"] for f in manifest["files"].values()))
        mlflow.set_tag("data_hash", manifest_hash(manifest))
    for name, entry in manifest["files"].items():
        log.info("%s <- %s", name, entry["source"])
    return manifest


if __name__ == "__main__":
    main()
