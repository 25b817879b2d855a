"""The fast training step: its switches, and the same loss curve as a plain PyTorch loop on a fixed seed."""

from __future__ import annotations

import lightning as L
import mlflow
import pytest
import torch
from omegaconf import OmegaConf

from aelab.data.images import ImageDataModule
from aelab.lit.autoencoder import autoencoder_module
from aelab.lit import fast
from aelab.lit.fast import FastSettings, GraphedStep, TrainingDiverged, resolve_fast
from aelab.stages import pretrain
from aelab.lit.segmentation import SegmentationModule
import aelab.lit.trainer as trainer_module
from aelab.lit.trainer import fit_best, resolve_precision
from conftest import compose_cfg

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FAST = OmegaConf.create({"cuda_graph": "auto", "fused_optimizer": "auto", "channels_last": "auto"})


def test_auto_switches_everything_on_for_cuda_and_only_channels_last_for_conv_nets_on_cpu():
    dense = autoencoder_module(compose_cfg("model=deep"))
    conv = autoencoder_module(compose_cfg("model=conv"))
    assert resolve_fast(FAST, torch.device("cpu"), "32-true", conv) == FastSettings(channels_last=True)
    assert resolve_fast(FAST, torch.device("cpu"), "32-true", dense) == FastSettings()
    assert resolve_fast(FAST, torch.device("cuda"), "32-true", conv) == FastSettings(True, True, True)
    assert resolve_fast(FAST, torch.device("cuda"), "32-true", dense) == FastSettings(True, True, False)
    assert not resolve_fast(FAST, torch.device("cuda"), "16-mixed", dense).cuda_graph  # GradScaler: no graph


def test_forced_switches_are_honoured_or_refused_naming_the_key():
    dense = autoencoder_module(compose_cfg("model=deep"))
    fused = OmegaConf.merge(FAST, {"fused_optimizer": True, "cuda_graph": False})
    assert resolve_fast(fused, torch.device("cpu"), "32-true", dense).fused_optimizer
    with pytest.raises(ValueError, match="trainer.fast.cuda_graph=true"):
        resolve_fast(OmegaConf.merge(FAST, {"cuda_graph": True}), torch.device("cpu"), "32-true", dense)


def test_precision_auto_is_measured_per_model_and_bf16_only_on_cpus_that_compute_it(monkeypatch):
    cfg = compose_cfg("model=deep", "trainer.accelerator=cpu")
    segmenter = SegmentationModule({"_target_": "aelab.models.segnet.SegNet", "channels": [4], "convs": [1]}, 1,
                                   ["a", "b"])
    autoencoder = autoencoder_module(cfg)
    assert (autoencoder.cuda_precision, segmenter.cuda_precision) == ("32-true", "bf16-mixed")
    for bf16_cpu, expected in ((True, ["32-true", "bf16-mixed"]), (False, ["32-true", "32-true"])):
        monkeypatch.setattr(trainer_module, "cpu_computes_bf16", lambda: bf16_cpu)
        assert [resolve_precision(cfg.trainer, m) for m in (autoencoder, segmenter)] == expected


def plain_epoch_losses(cfg, data: ImageDataModule, epochs: int) -> list[float]:
    """Per-epoch mean training loss of a plain PyTorch loop over the same batches, from the same start."""
    L.seed_everything(cfg.seed, verbose=False)
    module = autoencoder_module(cfg)
    opt = torch.optim.Adam(module.parameters(), lr=cfg.pretrain.optim.lr)
    train = data.batches("train", "cpu")
    means = []
    for _ in range(epochs):
        total, n = 0.0, 0
        for batch in train:
            loss = module.train_losses(batch)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + float(loss.detach()) * len(batch[0]), n + len(batch[0])
        means.append(total / n)
    return means


@pytest.mark.parametrize("fused", [False, True])
def test_project_path_follows_the_plain_loop(tiny_raw, smoke_overrides, tmp_path, fused):
    cfg = compose_cfg(*smoke_overrides, "model=simple", "trainer.max_epochs=3",
                      f"trainer.fast.fused_optimizer={str(fused).lower()}")
    data = ImageDataModule(cfg.data, cfg.pretrain.batch_size, cfg.seed)
    data.setup()
    assert len(data.train_set) % cfg.pretrain.batch_size  # a ragged last batch is part of the check
    L.seed_everything(cfg.seed, verbose=False)
    _, history, _ = fit_best(autoencoder_module(cfg), data, cfg.trainer, False, tmp_path / "ae.ckpt")
    expected = plain_epoch_losses(cfg, data, 3)
    assert [row["train_loss"] for row in history.rows] == pytest.approx(expected, rel=1e-4)


class EagerReplay(GraphedStep):
    """A CPU stand-in for the CUDA graph with its memory semantics: a replay writes new values into the gradient
    and output tensors of the capture, whatever ``.grad`` points at by then."""

    def _capture(self, fn, module):
        self.fn = fn
        for p in self.params:
            p.grad = None
        return fn(*self.inputs)

    def _replay(self) -> None:
        attached = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        out = self.fn(*self.inputs)
        for static, p in zip(self.grads, self.params):
            static.copy_(p.grad)
        for key, value in out.items():
            self.outputs[key].copy_(value)
        for p, grad in zip(self.params, attached):
            p.grad = grad


def test_graphed_steps_follow_the_plain_loop_through_lightning(tiny_raw, smoke_overrides, tmp_path, monkeypatch):
    """Replays, the eager ragged batch, and Lightning releasing the gradients before each validation (which once
    left the optimizer stepping on stale gradients) give the plain loop's losses."""
    monkeypatch.setattr(fast, "GraphedStep", EagerReplay)
    monkeypatch.setattr(fast, "resolve_fast", lambda *args: FastSettings(cuda_graph=True))
    cfg = compose_cfg(*smoke_overrides, "model=simple", "trainer.max_epochs=3")
    data = ImageDataModule(cfg.data, cfg.pretrain.batch_size, cfg.seed)
    data.setup()
    L.seed_everything(cfg.seed, verbose=False)
    module = autoencoder_module(cfg)
    _, history, _ = fit_best(module, data, cfg.trainer, False, tmp_path / "ae.ckpt")
    assert isinstance(module._graph, EagerReplay)
    assert [row["train_loss"] for row in history.rows] == pytest.approx(plain_epoch_losses(cfg, data, 3), rel=1e-4)


@CUDA
def test_cuda_graph_step_gives_the_eager_loss_curve(tiny_raw, smoke_overrides, tmp_path):
    curves = {}
    for graph in (False, True):
        cfg = compose_cfg(*smoke_overrides, "model=conv", "trainer.accelerator=gpu", "trainer.max_epochs=4",
                          "trainer.precision=32-true", f"trainer.fast.cuda_graph={str(graph).lower()}")
        data = ImageDataModule(cfg.data, cfg.pretrain.batch_size, cfg.seed)
        L.seed_everything(cfg.seed, verbose=False)
        module, history, _ = fit_best(autoencoder_module(cfg), data, cfg.trainer, False, tmp_path / f"{graph}.ckpt")
        curves[graph] = [row["train_loss"] for row in history.rows]
    assert curves[True] == pytest.approx(curves[False], rel=2e-3)


def test_divergence_fails_the_stage_and_keeps_nothing(tiny_raw, smoke_overrides):
    cfg = compose_cfg(*smoke_overrides, "pretrain.optim.name=sgd", "pretrain.optim.lr=1e4", "trainer.max_epochs=2")
    with pytest.raises(TrainingDiverged, match=r"training diverged in epoch \d+ by batch \d+ .*learning rate 10000"):
        pretrain.main(cfg)
    assert not (tiny_raw / "reports/metrics/pretrain.json").exists()
    assert not (tiny_raw / "models").exists()  # no NaN checkpoint, no temporary folder
    run = mlflow.search_runs(experiment_names=["aelab"], output_format="list")[0]
    assert run.data.tags["stage"] == "pretrain" and run.info.status == "FAILED"
