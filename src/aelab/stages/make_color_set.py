"""Stage make_color_set: the color images for colorization, in ``colorize.data.out_dir``.

CIFAR-10 comes through the download machinery (canonical URL, md5, retries and resume, atomic writes, the user
mirror ``colorize.data.mirror`` or AELAB_MIRROR). When no source can provide it and ``colorize.data.fallback``
is set, the offline fallback is used instead: color photographs that installed packages ship, split into train
and test by photograph so that no test patch shares a photo with training: seeded random crops of the training
photographs, and the grid of tiles of the named test photographs (the same whatever the seed).
``manifest.json`` records which source was used and why.

Outputs: ``<out_dir>/images.npz`` (``train``, ``test``: uint8 N x H x W x 3; for the fallback also ``train_photo``
and ``test_photo``, each patch's photograph as an index into ``photo_names``, so validation can hold out whole
photos and the test is scored per photo), ``<out_dir>/manifest.json``, and for CIFAR-10 the verified tarball in
``<out_dir>/cifar10/``.
"""

from __future__ import annotations

import logging

import hydra
import mlflow
import numpy as np
from omegaconf import DictConfig, OmegaConf

from aelab.config import validate
from aelab.data.catalog import image_set
from aelab.data.color import photo_patches, read_cifar
from aelab.data.download import DownloadError, download_dataset
from aelab.paths import atomic_path, write_json
from aelab.stages import CONF_DIR, output_root, publishes_outputs
from aelab.tracking import start_run

log = logging.getLogger(__name__)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
@publishes_outputs
def main(cfg: DictConfig) -> dict:
    validate(cfg)
    d = cfg.colorize.data
    out = output_root() / d.out_dir
    spec = image_set(d.dataset, channels=3)
    try:
        download = download_dataset(spec, out / spec.name, d.mirror)
        archive = spec.files[0]
        train, test = read_cifar(out / spec.name / archive.name, archive.members)
        arrays = {"train": train, "test": test}
        manifest = {"dataset": spec.name, "source": spec.name, "download": download}
    except DownloadError as exc:
        if d.fallback is None:
            raise DownloadError(f"{exc}\nfor colorization the mirror is colorize.data.mirror; "
                                "colorize.data.fallback is null, so there is no offline fallback") from exc
        log.warning("%s unavailable, using the offline fallback (photograph patches): %s", spec.name, exc)
        fb = OmegaConf.to_container(d.fallback, resolve=True)
        arrays, photos = photo_patches(fb["photos"], fb["test_photos"], fb["patch_size"], fb["patches_per_photo"],
                                       fb["max_side"], cfg.seed)
        train, test = arrays["train"], arrays["test"]
        manifest = {"dataset": spec.name, "source": "fallback", "reason": str(exc),
                    "fallback": {**{k: v for k, v in fb.items() if k != "photos"}, "seed": cfg.seed, "photos": photos}}
    manifest.update(train=list(train.shape), test=list(test.shape))
    with atomic_path(out / "images.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    write_json(out / "manifest.json", manifest)
    log.info("color set from %s: %d train, %d test images of %s", manifest["source"], len(train), len(test),
             train.shape[1:])
    with start_run(cfg, "make_color_set", out / "manifest.json", dataset=spec.name):
        mlflow.set_tag("color_source", manifest["source"])
        mlflow.log_metrics({"train_images": len(train), "test_images": len(test)})
        mlflow.log_artifact(str(out / "manifest.json"))
    return manifest


if __name__ == "__main__":
    main()
