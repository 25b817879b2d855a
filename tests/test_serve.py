"""The registered denoiser served over HTTP: ``mlflow models serve`` (aelab.server.model_server) of
``models:/aelab-denoiser@pipeline`` from a tiny denoise run's sqlite store, on a free loopback port, answering as the
model loaded in this process does; and the serving benchmark against the same store."""

from __future__ import annotations

import json
import os

import mlflow
import numpy as np
import pytest

from aelab import serve_bench
from aelab.server import NO_PROXY, ServingError, free_port, invoke, model_server
from aelab.stages import denoise
from conftest import compose_cfg, make_tiny_images

MODEL = "models:/aelab-denoiser@pipeline"


@pytest.fixture
def denoiser(tiny_raw, smoke_overrides):
    """A denoiser trained for one epoch on the tiny data, registered in the test's store with alias ``pipeline``."""
    denoise.main(compose_cfg(*smoke_overrides, "denoise.max_epochs=1", "denoise.batch_size=32",
                             "denoise.model.channels=[8,8]", "denoise.eval_images=20"))
    return tiny_raw


def test_served_denoiser_answers_as_the_loaded_model(denoiser):
    rng = np.random.default_rng(0)
    images, _ = make_tiny_images(3, seed=2)
    clean = images[:, None].astype(np.float32) / 255
    noisy = np.where(rng.random(clean.shape) < 0.5, 0, clean).astype(np.float32)  # zero-mask noise
    odd = rng.random((2, 1, 30, 41), dtype=np.float32)  # not the training size, nor a multiple of the stride
    loaded = mlflow.pyfunc.load_model(MODEL)
    assert loaded.metadata.get_input_schema().inputs[0].shape == (-1, 1, -1, -1)

    with model_server(MODEL, free_port(), denoiser, os.environ["MLFLOW_TRACKING_URI"]) as url:
        for x in (noisy, odd):
            served = invoke(url, x)
            assert served.shape == x.shape
            np.testing.assert_allclose(served, loaded.predict(x), rtol=0, atol=1e-6)
        with pytest.raises(ServingError) as err:  # RGB: MLflow checks the signature's shape before predict
            invoke(url, np.zeros((2, 3, 28, 28), np.float32))
        assert 400 <= err.value.status < 600
        assert "(2, 3, 28, 28)" in err.value.message and "(-1, 1, -1, -1)" in err.value.message
    with pytest.raises(OSError):  # the server is gone
        NO_PROXY.open(f"{url}/ping", timeout=2)
    assert "Uvicorn running on http://127.0.0.1" in (denoiser / "model_server.log").read_text()


def test_serve_bench_times_the_pipeline_model_and_writes_its_json(denoiser):
    result = serve_bench.main(["--requests", "3", "--warmup", "1"])
    written = json.loads((denoiser / "reports/bench/serve.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert written["model_version"]["name"] == "aelab-denoiser" and written["model_version"]["version"] == "1"
    assert written["images"] == "fashion_mnist test"  # the tiny download in data/raw/fashion_mnist
    assert 0 < written["start_to_ping_s"] <= written["start_to_first_answer_s"]
    for case, n in (("single", 1), ("batch_256", 256)):  # the tiny test split's 40 images, repeated
        assert written[case]["images"] == n
        for where in ("served", "in_process"):
            timing = written[case][where]
            assert 0 < timing["min_ms"] <= timing["median_ms"] <= timing["p90_ms"]
        assert written[case]["max_abs_diff_served_vs_in_process"] <= 1e-6
    assert written["mlflow"] == mlflow.__version__ and "CPUs" in written["machine"]
