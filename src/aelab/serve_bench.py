"""Latency of a served model: ``mlflow models serve`` of the pipeline's registered denoiser (or any model that takes
grayscale images (N, 1, 28, 28)), timed by a client on the same machine over loopback.

    python -m aelab.serve_bench [--model models:/aelab-denoiser@pipeline] [--requests N] [--warmup N]
                                [--out reports/bench/serve.json]

The model is resolved against ``MLFLOW_TRACKING_URI``, else the project's store (``sqlite:///mlflow.db`` in the
working directory, as the stages resolve it). The server runs in this environment (``aelab.server.model_server``:
``--env-manager local``, one worker). Measured:

- the seconds from starting the server to its ``/ping`` answering (the model is loaded then) and to the answer of
  the first request;
- after ``--warmup`` requests, ``--requests`` requests each of one 28x28 image and of a batch of 256: median and p90
  latency of the whole round trip (JSON encoding of ``{"inputs": ...}``, HTTP, the model's predict, decoding of
  ``{"predictions": ...}``), next to the median of the same predict in this process (``mlflow.pyfunc.load_model``),
  which is what serving adds to.

The images are Fashion-MNIST test images when ``data/raw/fashion_mnist`` is there (the download stage's), else
uniform noise. Prints a table and writes the JSON: the numbers, the model version served, the machine (CPU, GPU),
and the mlflow, torch and Python versions; the server's log goes beside it (``model_server.log``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from datetime import datetime, timezone
from pathlib import Path

import mlflow
import numpy as np
from omegaconf import OmegaConf

from aelab.data.catalog import raw_dir
from aelab.data.images import load_split
from aelab.paths import write_json
from aelab.server import free_port, invoke, model_server
from aelab.stages import CONF_DIR
from aelab.tracking import ALIAS, REGISTERED, installed_version, machine, project_tracking_uri

DEFAULT_MODEL = f"models:/{REGISTERED['denoiser']}@{ALIAS}"
CASES = {"single": 1, "batch_256": 256}  # name -> images per request


def bench_images(n: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """``n`` images (n, 1, 28, 28) float32 in [0, 1]: the first Fashion-MNIST test images when the download stage's
    folder is there (repeated, should it hold fewer), else uniform noise; and which of the two."""
    data_cfg = OmegaConf.load(Path(CONF_DIR) / "data" / "fashion_mnist.yaml")
    if (raw_dir(data_cfg) / "manifest.json").exists():
        images, _ = load_split(data_cfg, "test")
        return images[np.arange(n) % len(images), None].astype(np.float32) / 255, "fashion_mnist test"
    return np.random.default_rng(seed).random((n, 1, 28, 28), dtype=np.float32), "uniform noise"


def model_version(uri: str, client: mlflow.MlflowClient) -> dict | None:
    """The registered version ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` points at (name, version,
    run id); None for other URIs."""
    match = re.fullmatch(r"models:/([^/@]+)(?:@(.+)|/(\d+))", uri)
    if match is None:
        return None
    name, alias, number = match.groups()
    version = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
    return {"name": name, "version": str(version.version), "run_id": version.run_id}


def latencies(call, x: np.ndarray, requests: int, warmup: int) -> list[float]:
    """Seconds of each of ``requests`` calls ``call(x)``, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call(x)
    times = []
    for _ in range(requests):
        start = time.perf_counter()
        call(x)
        times.append(time.perf_counter() - start)
    return times


def summary(times: list[float]) -> dict[str, float]:
    """Median, p90, min and mean of ``times`` in milliseconds."""
    ms = np.asarray(times) * 1000
    return {"median_ms": round(float(np.median(ms)), 3), "p90_ms": round(float(np.percentile(ms, 90)), 3),
            "min_ms": round(float(ms.min()), 3), "mean_ms": round(float(ms.mean()), 3)}


def run(model: str, requests: int, warmup: int, uri: str, cwd: Path) -> dict:
    """Serve ``model`` (resolved against ``uri``), time it (see the module) and return the results."""
    batch, images = bench_images(max(CASES.values()))
    inputs = {case: batch[:n] for case, n in CASES.items()}
    client = mlflow.MlflowClient(uri)
    result = {"model": model, "model_version": model_version(model, client), "tracking_uri": uri, "images": images,
              "requests": requests, "warmup": warmup, "workers": 1}
    served = {}
    start = time.perf_counter()
    with model_server(model, free_port(), cwd, uri) as url:
        result["start_to_ping_s"] = round(time.perf_counter() - start, 3)
        invoke(url, inputs["single"])
        result["start_to_first_answer_s"] = round(time.perf_counter() - start, 3)
        for case, x in inputs.items():
            result[case] = {"images": len(x), "payload_bytes": len(json.dumps({"inputs": x.tolist()})),
                            "served": summary(latencies(lambda a: invoke(url, a), x, requests, warmup))}
        served = {case: invoke(url, x) for case, x in inputs.items()}
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pyfunc.load_model(model)
    for case, x in inputs.items():
        result[case]["in_process"] = summary(latencies(loaded.predict, x, requests, warmup))
        result[case]["max_abs_diff_served_vs_in_process"] = float(np.abs(served[case] - loaded.predict(x)).max())
    result.update(machine=machine(), mlflow=mlflow.__version__, torch=installed_version("torch"),
                  python=platform.python_version(), cpu_count=os.cpu_count(),
                  date=datetime.now(timezone.utc).strftime("%Y-%m-%d"))
    return result


def table(result: dict) -> str:
    """The results as a few lines of text."""
    version = result["model_version"]
    served = result["model"] + (f" (version {version['version']})" if version else "")
    lines = [f"{served} on {result['machine']}, {result['images']}, {result['requests']} requests after "
             f"{result['warmup']} warm-up",
             f"start -> /ping {result['start_to_ping_s']:.2f} s, start -> first answer "
             f"{result['start_to_first_answer_s']:.2f} s",
             f"{'request':<14}{'median ms':>11}{'p90 ms':>10}{'in-process ms':>15}{'payload KB':>12}"]
    for case in CASES:
        r = result[case]
        lines.append(f"{r['images']:>4} x 28x28   {r['served']['median_ms']:>11.1f}{r['served']['p90_ms']:>10.1f}"
                     f"{r['in_process']['median_ms']:>15.1f}{r['payload_bytes'] / 1000:>12.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the model URI to serve")
    parser.add_argument("--requests", type=int, default=50, help="timed requests per case")
    parser.add_argument("--warmup", type=int, default=5, help="untimed requests per case first")
    parser.add_argument("--out", type=Path, default=Path("reports/bench/serve.json"))
    args = parser.parse_args(argv)
    if args.requests < 1 or args.warmup < 0:
        parser.error("--requests must be at least 1 and --warmup at least 0")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = run(args.model, args.requests, args.warmup, project_tracking_uri(), args.out.parent)
    write_json(args.out, result)
    print(table(result), f"\nwritten to {args.out}", sep="\n")
    return result


if __name__ == "__main__":
    main()
