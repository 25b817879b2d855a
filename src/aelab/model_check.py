"""Do the MLflow models reproduce their stage's test metrics? Load each trained network as a user would, through
``mlflow.pyfunc``, score it on its stage's own test split with the stage's own scoring, and compare with the numbers
the stage wrote to ``reports/metrics/<stage>.json``.

    python -m aelab.model_check [--registry] [--tolerance 1e-6] [--conf] [override ...]

The models are the pipeline's folders ``models/<stage>/model`` (DVC outputs) or, with ``--registry``, the registered
versions ``models:/aelab-<kind>@pipeline`` of the project's tracking store (``mlflow.tracking_uri``, or
``MLFLOW_TRACKING_URI``). The config is the one the stages read: ``params.yaml`` when the working directory has one
(overrides of its keys allowed), else ``conf/`` composed with the overrides (``--conf`` forces this, for group
overrides such as ``model=conv``). The test split is rebuilt by the stage's own DataModule, every forward pass is the
pyfunc's ``predict`` on numpy arrays, and the scores come from the stage's scoring functions and torchmetrics:

- autoencoder (pretrain): ``test_mse`` and ``test_loss`` on the reconstructions (``params={"output": ...}``);
- denoiser (denoise): the stage's ``evaluate`` at its training noise, the pyfunc as the network: PSNR and SSIM of the
  model, and of the noisy input and the filters (which check the rebuilt test split), the filters' sizes;
- colorizer (colorize): PSNR and SSIM of its RGB output (``ab_mae`` is measured in Lab before the RGB conversion,
  which the pyfunc does not return);
- segmenter (segment): global and class-average accuracy and mean IoU.

Prints a table and writes ``reports/model_check.json``; exit status 1 when a metric differs by more than
``--tolerance`` (each named), 2 when an input is missing. A kind whose model is missing is reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from aelab.errors import reported
from aelab.paths import MissingUpstreamError, write_json
from aelab.pyfunc import MODEL_DIR
from aelab.tracking import ALIAS, REGISTERED, flatten

REPORT = Path("reports/model_check.json")
COLORIZE_BATCH = 500  # colorize.evaluate's batch: SSIM sums its per-image values batch by batch in float32


class PyfuncNet:
    """A loaded pyfunc as the network a stage's scoring calls: a tensor in, a tensor out, every forward pass the
    pyfunc's ``predict`` on a numpy array (on the CPU; the pyfunc itself runs where it was loaded)."""

    device = torch.device("cpu")

    def __init__(self, model, params: dict | None = None):
        self.model, self.params = model, params

    def __call__(self, x: torch.Tensor, params: dict | None = None) -> torch.Tensor:
        out = self.model.predict(x.detach().cpu().numpy().astype(np.float32), params=params or self.params)
        return torch.from_numpy(np.asarray(out))


def autoencoder(net: PyfuncNet, cfg) -> dict[str, float]:
    """pretrain's ``test_mse`` (torchmetrics, per test batch, as ``AutoencoderModule.test_step``) and ``test_loss``
    on the test split: the reconstruction loss of each batch (BCE of the pyfunc's sigmoid output, where the stage
    takes it from the logits), weighted by batch size and summed in float32 as Lightning does with a logged mean."""
    import torchmetrics

    from aelab.data.images import ImageDataModule

    data = ImageDataModule(cfg.data, cfg.pretrain.batch_size, cfg.seed)
    data.setup()
    mse, loss, count = torchmetrics.MeanSquaredError(), torch.zeros(()), 0
    for x, _ in data.test_dataloader():
        recon = net(x, {"output": "reconstruction"})
        mse.update(recon.flatten(), x.flatten())
        batch_loss = F.binary_cross_entropy(recon, x) if cfg.pretrain.loss == "bce" else F.mse_loss(recon, x)
        loss, count = loss + batch_loss * len(x), count + len(x)  # in float32, as Lightning sums a logged mean
    return {"test_mse": float(mse.compute()), "test_loss": float(loss / count)}


def denoiser(net: PyfuncNet, cfg) -> dict[str, float]:
    """denoise's headline: its own ``evaluate`` on the whole test set at the training noise, the pyfunc as the
    network."""
    from aelab.data.noise import NoisyImageDataModule
    from aelab.stages import denoise

    p = cfg.denoise
    data = NoisyImageDataModule(cfg.data, p.batch_size, cfg.seed, p.noise, p.level)
    data.setup()
    return numbers(denoise.evaluate(net, data, p.noise, p.level, cfg))


def colorizer(net: PyfuncNet, cfg) -> dict[str, float]:
    """colorize's PSNR and SSIM of the model's RGB images against the true test images, with ``ImageQuality`` in
    colorize.evaluate's batches; the pyfunc takes the RGB images and keeps their luminance."""
    from aelab.data.color import ColorDataModule
    from aelab.metrics import ImageQuality

    c = cfg.colorize
    data = ColorDataModule(c, c.batch_size, cfg.seed)
    data.setup()
    quality = ImageQuality(["model"])
    for start in range(0, len(data.test_rgb), COLORIZE_BATCH):
        true = data.test_rgb[start:start + COLORIZE_BATCH]
        quality.update(true, {"model": net(true)})
    return numbers(quality.compute())


def segmenter(net: PyfuncNet, cfg) -> dict[str, float]:
    """segment's test G, C and mIoU: the module's own metric collection, fed the pyfunc's class indices batch by
    batch of the stage's test loader."""
    from aelab.data.segmentation import SegmentationDataModule
    from aelab.lit.segmentation import segmentation_metrics, summarize

    p = cfg.segment
    data = SegmentationDataModule(p.data, p.batch_size, cfg.seed, cfg.data.num_workers)
    metrics = segmentation_metrics(len(data.info["classes"]), data.info["ignore_index"])
    for x, y in data.test_dataloader():
        metrics.update(net(x), y)
    return {f"test_{k}": v for k, v in summarize(metrics.compute()).items()}


@dataclass(frozen=True)
class Kind:
    """A registered model kind: the stage that trains it and how to score it."""

    stage: str
    score: Callable[[PyfuncNet, object], dict[str, float]]


KINDS = {"autoencoder": Kind("pretrain", autoencoder), "denoiser": Kind("denoise", denoiser),
         "colorizer": Kind("colorize", colorizer), "segmenter": Kind("segment", segmenter)}


def numbers(result: dict) -> dict[str, float]:
    """The numbers of a nested result, by flattened key (``{"psnr": {"model": 1}}`` -> ``{"psnr.model": 1.0}``)."""
    return {k: float(v) for k, v in flatten(result).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def load_config(overrides: list[str], conf: bool = False):
    """The stages' config: ``params.yaml`` of the working directory with ``overrides`` (as dvc.yaml runs them), or
    ``conf/`` composed with them (``conf``, or no params.yaml; as the stages run by hand)."""
    from hydra import compose, initialize_config_dir

    from aelab.stages import CONF_DIR

    folder, name = (CONF_DIR, "config") if conf or not Path("params.yaml").exists() else (str(Path.cwd()), "params")
    with initialize_config_dir(config_dir=folder, version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def model_uri(kind: str, cfg, registry: bool) -> tuple[str, str | None]:
    """(the model's URI, why it is skipped or None): the stage's model folder, or its registered ``@pipeline``
    version."""
    if not registry:
        folder = Path(cfg[KINDS[kind].stage].out_dir) / MODEL_DIR
        return str(folder), None if (folder / "MLmodel").is_file() else f"no model at {folder}"
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name = REGISTERED[kind]
    try:
        MlflowClient().get_model_version_by_alias(name, ALIAS)
    except MlflowException as err:
        return f"models:/{name}@{ALIAS}", f"not registered: {str(err).splitlines()[0]}"
    return f"models:/{name}@{ALIAS}", None


def compare(stage: dict[str, float], pyfunc: dict[str, float], tolerance: float) -> dict[str, dict]:
    """Each metric the pyfunc reproduced next to the stage's: values, |diff| and whether it is within
    ``tolerance``; a metric missing from the stage's file fails."""
    rows = {}
    for key, value in pyfunc.items():
        expected = stage.get(key)
        diff = abs(value - expected) if expected is not None else math.inf
        rows[key] = {"stage": expected, "pyfunc": value, "diff": diff, "ok": diff <= tolerance}
    return rows


def check(kind: str, cfg, registry: bool, tolerance: float) -> dict:
    """One kind's entry of the report: skipped (with the reason), or its metrics compared."""
    import mlflow

    uri, skip = model_uri(kind, cfg, registry)
    if skip is not None:
        return {"status": "skipped", "uri": uri, "reason": skip}
    metrics_file = Path("reports/metrics") / f"{KINDS[kind].stage}.json"
    if not metrics_file.is_file():
        raise MissingUpstreamError(f"missing {metrics_file}: run the '{KINDS[kind].stage}' stage (`dvc repro "
                                   f"{KINDS[kind].stage}`)")
    stage = numbers(json.loads(metrics_file.read_text()))
    rows = compare(stage, KINDS[kind].score(PyfuncNet(mlflow.pyfunc.load_model(uri)), cfg), tolerance)
    return {"status": "ok" if all(r["ok"] for r in rows.values()) else "failed", "uri": uri, "metrics": rows}


def table(report: dict) -> str:
    """The report as a table: kind, metric, stage value, pyfunc value, |diff|, ok; skipped kinds on a line each."""
    lines = [f"{'kind':<12} {'metric':<18} {'stage':>14} {'pyfunc':>14} {'|diff|':>10}  ok"]
    for kind, entry in report["models"].items():
        if entry["status"] == "skipped":
            lines.append(f"{kind:<12} skipped: {entry['reason']}")
        for key, r in entry.get("metrics", {}).items():
            stage = "missing" if r["stage"] is None else f"{r['stage']:.8g}"
            lines.append(f"{kind:<12} {key:<18} {stage:>14} {r['pyfunc']:>14.8g} {r['diff']:>10.3g}  "
                         f"{'yes' if r['ok'] else 'NO'}")
    return "\n".join(lines)


def failures(report: dict) -> list[str]:
    """One message per metric beyond the tolerance, naming the model and the metric."""
    return [f"{kind} ({entry['uri']}): {key} is {r['pyfunc']:.10g} through mlflow.pyfunc, {r['stage']} in the "
            f"stage's metrics (|diff| {r['diff']:.3g} > {report['tolerance']:g})"
            for kind, entry in report["models"].items() for key, r in entry.get("metrics", {}).items() if not r["ok"]]


def run(overrides: list[str], registry: bool = False, tolerance: float = 1e-6, conf: bool = False) -> dict:
    """Check every kind (see the module) and write the report; returns it."""
    import mlflow

    from aelab.tracking import tracking_uri

    cfg = load_config(overrides, conf)
    if registry:
        mlflow.set_tracking_uri(tracking_uri(cfg))
    models = {kind: check(kind, cfg, registry, tolerance) for kind in KINDS}
    report = {"source": "registry" if registry else "folder", "tolerance": tolerance, "models": models}
    report["ok"] = not failures(report)
    write_json(REPORT, report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. denoise.level=0.3")
    parser.add_argument("--registry", action="store_true", help=f"load models:/<name>@{ALIAS}, not the folders")
    parser.add_argument("--tolerance", type=float, default=1e-6, help="largest |difference| allowed (default 1e-6)")
    parser.add_argument("--conf", action="store_true", help="compose conf/ even where params.yaml exists")
    args = parser.parse_args(argv)
    try:
        report = run(args.overrides, args.registry, args.tolerance, args.conf)
    except MissingUpstreamError as err:
        print(f"model_check: {err}", file=sys.stderr)
        return 2
    print(table(report))
    for message in failures(report):
        print(f"model_check: FAILED {message}", file=sys.stderr)
    print(f"wrote {REPORT}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    with reported("aelab.model_check"):
        sys.exit(main())
