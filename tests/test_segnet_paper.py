"""The SegNet paper on CamVid: its SegNet-Basic and training recipe as configs (`segment=camvid_paper`), the loss
and metrics ignoring void, median-frequency weights from a CamVid-layout folder, trial-run limits and plain progress
lines, and the readable figures (overlays with a class legend, per-class IoU beside the confusion matrix)."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from aelab import figures
from aelab.config import ConfigError, validate
from aelab.data.segmentation import SegmentationDataModule
from aelab.lit import trainer as lit_trainer
from aelab.lit.segmentation import SegmentationModule, build_model
from aelab.stages import segment
from conftest import compose_cfg
from test_segmentation import write_camvid

CAMVID = compose_cfg("segment/data=camvid").segment.data
VOID = CAMVID.ignore_index  # 11, "Unlabelled"
PAPER_PARAMS = 3 * 64 * 7 * 7 + 7 * 64 * 64 * 7 * 7 + 8 * 2 * 64 + 64 * 11 + 11  # convs, BN scale/shift, classifier


def paper_cfg(root, *overrides):
    """`segment=camvid_paper` on the folder ``root``, shrunk to a trial run of one training step on the CPU."""
    return compose_cfg("segment=camvid_paper", f"segment.data.root={root}", "segment.data.size=[32,48]",
                       "segment.batch_size=2", "segment.max_epochs=1", "segment.overlays=2",
                       "trainer.accelerator=cpu", "trainer.limit_train_batches=1", *overrides)


def layers(model: nn.Module, kind: type) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, kind)]


# --- the model -----------------------------------------------------------------------------------------------------

def test_paper_segnet_basic_has_the_papers_layers_and_parameter_count():
    model = build_model(OmegaConf.to_container(compose_cfg("segment/model=segnet_basic").segment.model), 3, 11)
    assert isinstance(model.input_norm, nn.LocalResponseNorm) and model.input_norm.size == 5
    assert [len(layers(e, nn.Conv2d)) for e in model.encoders] == [1, 1, 1, 1]
    assert [len(layers(d, nn.Conv2d)) for d in model.decoders] == [1, 1, 1, 1]
    assert {c.kernel_size for c in layers(model.encoders, nn.Conv2d) + layers(model.decoders, nn.Conv2d)} == {(7, 7)}
    assert {c.out_channels for c in layers(model.encoders, nn.Conv2d)} == {64}
    assert len(layers(model.encoders, nn.ReLU)) == 4 and not layers(model.decoders, nn.ReLU)  # no ReLU decoding
    assert len(layers(model.decoders, nn.BatchNorm2d)) == 4 and model.classifier.kernel_size == (1, 1)
    assert sum(p.numel() for p in model.parameters()) == PAPER_PARAMS == 1_416_075  # the paper: about 1.4 M
    assert model(torch.rand(2, 3, 45, 60)).shape == (2, 11, 45, 60)  # 360x480 / 8: odd sizes unpool back


def test_every_difference_from_the_3x3_segnet_is_a_key():
    """segnet64_3x3 (formerly `segnet_basic`) becomes the paper's SegNet-Basic by config keys alone."""
    old = compose_cfg("segment/model=segnet64_3x3").segment.model
    assert (list(old.convs), old.kernel_size, old.decoder_relu, old.input_lrn, old.init) == ([2] * 4, 3, True, None,
                                                                                            "default")
    made = compose_cfg("segment/model=segnet64_3x3", "segment.model.convs=[1,1,1,1]", "segment.model.kernel_size=7",
                       "segment.model.decoder_relu=false", "segment.model.init=he",
                       "segment.model.input_lrn={size:5,alpha:6.5025,beta:0.75,k:1.0}").segment.model
    paper = compose_cfg("segment/model=segnet_basic").segment.model
    assert {**OmegaConf.to_container(made), "name": "segnet_basic"} == OmegaConf.to_container(paper)
    model = build_model(OmegaConf.to_container(old), 3, 11)
    assert [len(layers(e, nn.Conv2d)) for e in model.encoders] == [2] * 4 and len(layers(model.decoders, nn.ReLU)) == 8


def test_lrn_alpha_carries_caffes_normalisation_of_0_255_pixels_to_0_1():
    x = torch.rand(2, 3, 8, 8)
    caffe = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)(255 * x)
    ours = nn.LocalResponseNorm(**compose_cfg("segment/model=segnet_basic").segment.model.input_lrn)(x)
    assert torch.allclose(caffe, 255 * ours, rtol=1e-5)


@pytest.mark.parametrize("override, message", [
    ("segment.model.init=msra", r"segment.model.*SegNet.init: Input should be 'default', 'xavier' or 'he'"),
    ("segment.optimizer=adam", r"segment.optimizer: Input should be 'adamw' or 'sgd'"),
    ("segment.schedule=step", r"segment.schedule: Input should be 'onecycle' or 'none'"),
    ("segment.loss_normalization=mean", r"segment.loss_normalization: Input should be 'weights' or 'pixels'"),
    ("trainer.limit_val_batches=0", r"trainer.limit_val_batches"),
])
def test_bad_recipe_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_cfg("segment=camvid_paper", override))


# --- the recipe ----------------------------------------------------------------------------------------------------

def test_camvid_paper_preset_is_the_papers_recipe():
    cfg = compose_cfg("segment=camvid_paper")
    validate(cfg)
    p = cfg.segment
    assert p.model.name == "segnet_basic" and p.data.kind == "folder" and list(p.data.size) == [360, 480]
    assert (p.optimizer, p.lr, p.momentum, p.weight_decay, p.schedule) == ("sgd", 0.1, 0.9, 0.0005, "none")
    assert (p.batch_size, p.class_weights, p.loss_normalization) == (12, "median_frequency", "pixels")
    assert p.data.crop is None and not p.data.flip and p.data.ignore_index == 11 and len(p.data.classes) == 11
    module = SegmentationModule(OmegaConf.to_container(p.model), 3, list(p.data.classes), VOID, None, p.lr,
                                p.weight_decay, p.optimizer, p.momentum, p.schedule, p.loss_normalization)
    opt = module.configure_optimizers()  # schedule none: a bare optimizer, no scheduler
    assert isinstance(opt, torch.optim.SGD)
    assert {k: opt.defaults[k] for k in ("lr", "momentum", "weight_decay")} == {"lr": 0.1, "momentum": 0.9,
                                                                                "weight_decay": 0.0005}


def _module(loss_normalization: str, weights: list[float] | None) -> SegmentationModule:
    model = {"_target_": "aelab.models.segnet.SegNet", "channels": [4], "convs": [1]}
    return SegmentationModule(model, 3, ["a", "b", "c"], ignore_index=VOID, class_weights=weights,
                              loss_normalization=loss_normalization)


def test_void_pixels_count_in_neither_loss_nor_metrics():
    torch.manual_seed(0)
    logits, y = torch.randn(2, 3, 4, 5), torch.randint(0, 3, (2, 4, 5))
    y[:, 0] = VOID
    weights = [0.5, 2.0, 1.0]
    ce = nn.functional.cross_entropy(logits, y.clamp(max=2), weight=torch.tensor(weights), reduction="none")
    labelled, w = ce[y != VOID], torch.tensor(weights)[y[y != VOID]]
    pixels, by_weights = _module("pixels", weights), _module("weights", weights)
    assert pixels._loss(logits, y) == pytest.approx(float(labelled.sum() / labelled.numel()))  # Caffe's
    assert by_weights._loss(logits, y) == pytest.approx(float(labelled.sum() / w.sum()))  # PyTorch's mean
    noisy = logits.clone()
    noisy[:, :, 0] = 100 * torch.randn(2, 3, 5)  # anything at the void pixels
    assert pixels._loss(noisy, y) == pixels._loss(logits, y)

    pixels.model.forward = lambda x: noisy  # the metrics see the predictions of ``noisy``
    pixels.test_step((torch.rand(2, 3, 4, 5), y), 0)
    assert pixels.test_confusion.compute().sum() == (y != VOID).sum() == 30


def test_median_frequency_weights_from_a_folder_with_known_frequencies(tmp_path):
    # train image a: 8 px of class 0, 4 of class 1, 4 void; image b: 4 of class 0, 12 of class 2.
    # freq_c = pixels of c / labelled pixels of the images holding c: 12/28, 4/12, 12/16; median 3/7.
    a = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [VOID] * 4], np.uint8)
    b = np.array([[0, 0, 0, 0], [2, 2, 2, 2], [2, 2, 2, 2], [2, 2, 2, 2]], np.uint8)
    for split in ("train", "val", "test"):
        for folder in (split, f"{split}annot"):
            (tmp_path / folder).mkdir()
        for name, mask in (("a", a), ("b", b)):
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / split / f"{name}.png")
            Image.fromarray(mask).save(tmp_path / f"{split}annot" / f"{name}.png")
    data_cfg = OmegaConf.merge(CAMVID, {"root": str(tmp_path), "classes": ["a", "b", "c"], "size": None})
    weights = SegmentationDataModule(data_cfg, batch_size=2, seed=0).class_weights()
    assert weights.tolist() == pytest.approx([1.0, 9 / 7, 4 / 7])


# --- one step of the paper's setting on a CamVid-layout fixture ---------------------------------------------------

def test_paper_model_and_recipe_train_one_step_on_a_camvid_folder(workdir, caplog, monkeypatch):
    write_camvid(workdir / "CamVid", labels=(0, 3, 1), void=VOID, size=(36, 48))  # Sky, Road, Building
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)  # as in a log file: per-epoch lines, no bar
    with caplog.at_level(logging.INFO, logger="aelab.lit.trainer"):
        metrics = segment.main(paper_cfg(workdir / "CamVid", "trainer.limit_val_batches=1",
                                         "trainer.limit_test_batches=1"))
    assert metrics["model"] == "segnet_basic" and metrics["epochs"] == 1 and metrics["n_params"] == PAPER_PARAMS
    assert all(0 <= metrics[k] <= 1 for k in ("test_global_acc", "test_class_acc", "test_miou"))
    assert list(metrics["test_iou"]) == list(CAMVID.classes)  # void is no class
    assert {k for k, v in metrics["test_iou"].items() if v} <= {"Sky", "Building", "Road"}  # IoU > 0: in the truth
    assert any(r.getMessage().startswith("epoch 1/1 in ") and "val_miou" in r.getMessage() for r in caplog.records)

    module = SegmentationModule.load_from_checkpoint(workdir / "models/segment/segmenter.ckpt")
    h = module.hparams
    assert (h.optimizer, h.lr, h.schedule, h.loss_normalization) == ("sgd", 0.1, "none", "pixels")
    weights = module.class_weights.tolist()  # median frequency: only the three classes present get a weight
    assert [i for i, w in enumerate(weights) if w > 0] == [0, 1, 3]
    for name in ("segment_overlays", "segment_confusion"):
        assert (workdir / f"reports/figures/{name}.png").stat().st_size > 5000


def test_trial_run_limits_reach_the_lightning_trainer(monkeypatch):
    cfg = compose_cfg("trainer.limit_val_batches=2", "trainer.limit_test_batches=0.25").trainer
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    trainer = lit_trainer.build_trainer(cfg, nn.Linear(1, 1), logger=False)
    assert (trainer.limit_val_batches, trainer.limit_test_batches) == (2, 0.25)
    assert isinstance(trainer.progress_bar_callback, TQDMProgressBar)  # a terminal keeps the bar
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    plain = lit_trainer.build_trainer(cfg, nn.Linear(1, 1), logger=False).progress_bar_callback
    assert isinstance(plain, lit_trainer.EpochLines)


# --- readable figures ----------------------------------------------------------------------------------------------

def test_overlays_draw_a_camvid_frame_at_full_size_with_a_legend_of_the_class_colours(tmp_path):
    classes = list(CAMVID.classes)
    images = torch.rand(2, 3, 360, 480) * 0.2  # dark, so no image pixel looks like a legend colour
    truth = torch.randint(0, 12, (2, 360, 480))
    path = figures.segmentation_overlays(tmp_path / "o.png", images, truth, truth.clamp(max=10), classes, VOID)
    png = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert png.shape[1] >= 3 * 480 and png.shape[0] >= 2 * 360
    legend = png[-int(0.3 * 100 * 3):]  # the bottom strip: the legend's rows of colour patches
    palette = (figures.class_palette(len(classes)).numpy() * 255).round().astype(int)
    for name, colour in zip(classes, palette):
        assert (np.abs(legend - colour).max(-1) <= 2).sum() > 20, f"no legend patch of {name}'s colour"


def test_iou_chart_sits_beside_the_confusion_matrix(tmp_path):
    matrix = np.array([[90, 10, 0], [5, 95, 0], [0, 0, 0]])
    path = figures.segmentation_scores(tmp_path / "s.png", matrix, ["a", "b", "c"], [0.8, 0.85, float("nan")],
                                       "title")
    width, height = Image.open(path).size
    assert width > 1.8 * height  # two panels side by side
