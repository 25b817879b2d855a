"""The training-step benchmark runs on the CPU at tiny sizes and writes its JSON."""

from __future__ import annotations

import json

import torch

from aelab import bench
from aelab.lit import trainer
from aelab.stages import make_segmentation_set
from conftest import compose_cfg

TINY = ["trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "pretrain.batch_size=32",
        "segment.generate.n_train=20", "segment.generate.n_val=6", "segment.generate.n_test=10",
        "segment.model.channels=[8,8]", "segment.model.convs=[1,1]", "segment.batch_size=8"]


def test_benchmark_writes_every_path_with_its_numbers(tiny_raw, monkeypatch):
    monkeypatch.setattr(trainer, "cpu_computes_bf16", lambda: False)  # auto is 32-true for both, on any CPU
    make_segmentation_set.main(compose_cfg(*TINY))
    results = bench.main(["--models", "deep", "segnet", "--epochs", "2", "--precision", "auto,32-true",
                          "--out", str(tiny_raw / "bench"), *TINY])
    for result in results:
        written = json.loads((tiny_raw / "bench" / f"{result['model']}.json").read_text())
        assert written == result and written["device"].startswith("CPU")
        assert "b_cuda_graph_step" not in written  # CUDA only
        paths = [written["a_plain_loop"], *written["c_project"].values()]
        assert list(written["c_project"]) == ["32-true"]
        for path in paths:
            assert path["epochs"] == 2 and path["median_epoch_s"] > 0 and path["samples_per_s"] > 0
            assert torch.isfinite(torch.tensor(path["test_loss"]))
        assert written["ratio_c_over_a"] == round(
            written["c_project"]["32-true"]["median_epoch_s"] / written["a_plain_loop"]["median_epoch_s"], 3)
    deep = results[0]
    assert deep["train_samples"] == 144 and deep["batch_size"] == 32
    assert abs(deep["a_plain_loop"]["test_loss"] - deep["c_project"]["32-true"]["test_loss"]) < 1e-4  # same training
