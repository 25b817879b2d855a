"""Segmentation: SegNet's index unpooling, shapes, the paper's metrics, class weights, the generated set, the
CamVid-layout folder set (with its bad-input errors) and the two stages on tiny data."""

from __future__ import annotations

import json
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from aelab.config import ConfigError, validate
from aelab.data.segmentation import (ITEM, FolderSegmentation, SegmentationDataError, generate_sets,
                                     median_frequency_weights, place_items)
from aelab.lit.segmentation import SegmentationModule, segmentation_metrics, summarize
from aelab.models.segnet import SegNet
from aelab.paths import MissingUpstreamError
from aelab.stages import make_segmentation_set, segment
from conftest import compose_cfg, read_metrics

TINY_SEGNET = ["segment.model.channels=[8,8]", "segment.model.convs=[1,1]"]
TINY_SET = ["segment.generate.n_train=20", "segment.generate.n_val=6", "segment.generate.n_test=10"]


# --- the model -----------------------------------------------------------------------------------------------------

def test_decoder_unpools_to_the_positions_the_encoder_pooled_from():
    torch.manual_seed(0)
    model = SegNet(in_channels=1, classes=3, channels=[4], convs=[1]).eval()
    seen = {}
    model.pool.register_forward_hook(lambda m, args, out: seen.update(before=args[0], pooled=out[0]))
    model.unpool.register_forward_hook(lambda m, args, out: seen.update(unpooled=out))
    model(torch.rand(2, 1, 8, 10))

    before, unpooled = seen["before"], seen["unpooled"]
    window_max = nn.functional.interpolate(seen["pooled"], scale_factor=2, mode="nearest")
    at_max = before == window_max  # where each 2x2 window's maximum was
    # Only those positions carry values, and they carry the maxima: plain (nearest/bilinear) upsampling would fill
    # all four pixels of every window.
    assert torch.equal(unpooled, torch.where(at_max, before, torch.zeros_like(before)))
    assert (unpooled != 0).float().mean() <= 0.25 + 1e-6


def test_decoder_output_follows_where_the_maxima_were():
    """The same pooled values at other positions give other outputs: the indices, not the values, place them."""
    model = SegNet(in_channels=1, classes=2, channels=[1], convs=[1]).eval()
    with torch.no_grad():
        for conv in (model.encoders[0][0], model.decoders[0][0]):
            conv.weight.zero_()
            conv.weight[0, 0, 1, 1] = 1.0  # identity convolution
    left, right = torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    left[..., 0, 0], right[..., 1, 1] = 1.0, 1.0
    out_left, out_right = model.unpool(*model.pool(left)), model.unpool(*model.pool(right))
    assert torch.equal(out_left, left) and torch.equal(out_right, right)
    assert not torch.equal(model(left), model(right))


@pytest.mark.parametrize("size", [(64, 84), (63, 85), (17, 33), (16, 16)])
@pytest.mark.parametrize("stages", [1, 4])
def test_segnet_output_is_as_large_as_its_input(size, stages):
    model = SegNet(in_channels=3, classes=5, channels=[4] * stages, convs=[2] * stages).eval()
    assert model(torch.rand(2, 3, *size)).shape == (2, 5, *size)


@pytest.mark.parametrize("model", ["segnet", "segnet_basic", "segnet64_3x3", "segnet_vgg16", "unet"])
def test_configured_models_keep_the_odd_canvas_size(model):
    cfg = compose_cfg(f"segment/model={model}", "segment.generate.height=33", "segment.generate.width=47")
    validate(cfg)
    module = SegmentationModule(OmegaConf.to_container(cfg.segment.model), 1, [str(i) for i in range(11)])
    assert module(torch.rand(1, 1, 33, 47)).shape == (1, 11, 33, 47)
    assert cfg.segment.model.name == model and isinstance(module.model, smp.Unet if model == "unet" else SegNet)


def test_vgg16_preset_has_thirteen_encoder_convs():
    model = SegNet(1, 11, **{k: v for k, v in compose_cfg("segment/model=segnet_vgg16").segment.model.items()
                             if k in ("channels", "convs", "kernel_size")})
    assert sum(isinstance(m, nn.Conv2d) for m in model.encoders.modules()) == 13


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_segnet_trains_on_the_gpu_in_bf16():
    """What `segment=gpu` runs: unpooling and the loss under bf16 autocast on CUDA."""
    model = SegNet(1, 11).cuda()
    x, y = torch.rand(4, 1, 64, 84, device="cuda"), torch.randint(0, 11, (4, 64, 84), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(x)
    loss = nn.functional.cross_entropy(logits.float(), y)
    loss.backward()
    assert logits.shape == (4, 11, 64, 84) and torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_canvas_too_small_for_the_pooling_stages_is_rejected():
    with pytest.raises(ConfigError, match=r"5 pooling stages: inputs need sides of at least 32, got 30x84"):
        validate(compose_cfg("segment/model=segnet_vgg16", "segment.generate.height=30"))


# --- metrics and class weights -------------------------------------------------------------------------------------

def _scores(pred, truth, num_classes, ignore_index=None):
    metrics = segmentation_metrics(num_classes, ignore_index)
    metrics.update(torch.tensor(pred)[None], torch.tensor(truth)[None])
    values = metrics.compute()
    return summarize(values), values["iou"]


def test_perfect_prediction_scores_one():
    truth = [[0, 0, 1, 1], [2, 2, 1, 0]]
    summary, iou = _scores(truth, truth, 3)
    assert summary == {"global_acc": 1.0, "class_acc": 1.0, "miou": 1.0}
    assert iou.tolist() == [1.0, 1.0, 1.0]


def test_known_confusion_gives_known_iou():
    # class 0: 2 true pixels, one predicted as 1 -> IoU 1/2; class 1: 2 true + 1 false positive -> IoU 2/3.
    # Class 2 appears nowhere: NaN IoU, left out of the mean and of the class average.
    summary, iou = _scores([[0, 1, 1, 1]], [[0, 0, 1, 1]], 3)
    assert iou[:2].tolist() == pytest.approx([1 / 2, 2 / 3]) and iou[2].isnan()
    assert summary["miou"] == pytest.approx(7 / 12)
    assert summary["global_acc"] == pytest.approx(3 / 4)
    assert summary["class_acc"] == pytest.approx((1 / 2 + 1) / 2)


def test_ignored_pixels_count_nowhere():
    summary, _ = _scores([[0, 1, 1, 1]], [[255, 0, 1, 1]], 2, ignore_index=255)
    assert summary["global_acc"] == pytest.approx(2 / 3)
    assert summary["miou"] == pytest.approx((0 + 2 / 3) / 2)


def test_confusion_plot_rows_are_the_row_normalised_rates_in_percent():
    rows = segment.confusion_rows(torch.tensor([[90, 10, 0], [0, 0, 0], [5, 15, 0]]), ["a", "b", "c"])
    counts = {pair: rows.count(pair) for pair in set(rows)}
    assert counts == {("a", "a"): 90, ("a", "b"): 10, ("c", "a"): 25, ("c", "b"): 75}  # b never occurs


def test_median_frequency_weights_on_a_toy_label_set():
    masks = [torch.tensor([[0, 0], [0, 1]]), torch.tensor([[0, 0], [2, 2]]), torch.tensor([[9, 9], [9, 9]])]
    # freq: class 0 = 5/8, class 1 = 1/4 (only image 1 counts), class 2 = 2/4; median 1/2; class 3 never occurs.
    weights = median_frequency_weights(masks, num_classes=4, ignore_index=9)
    assert weights.tolist() == pytest.approx([0.8, 2.0, 1.0, 0.0])


# --- the generated set ---------------------------------------------------------------------------------------------

def _items(n: int, low: int, high: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(low, high, size=(n, ITEM, ITEM), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


GEN = SimpleNamespace(height=64, width=84, min_items=1, max_items=3, threshold=0, n_train=40, n_val=10, n_test=20)


def test_placed_boxes_are_disjoint_and_inside_the_canvas():
    rng = np.random.default_rng(0)
    for _ in range(300):
        boxes = place_items(rng, 3, 64, 84)
        assert 1 <= len(boxes) <= 3
        for i, (y, x) in enumerate(boxes):
            assert 0 <= y <= 64 - ITEM and 0 <= x <= 84 - ITEM
            assert all(abs(y - by) >= ITEM or abs(x - bx) >= ITEM for by, bx in boxes[i + 1:])


def test_generator_never_overlaps_items_and_draws_each_split_from_its_own_items():
    train, test = _items(200, 1, 128, seed=0), _items(100, 128, 256, seed=1)  # every item pixel is non-zero
    sets = generate_sets(train, test, GEN, seed=3)
    for split, (images, masks, sources) in sets.items():
        pool = test if split == "test" else train
        assert images.shape == masks.shape == (getattr(GEN, f"n_{split}"), 64, 84)
        lit = images[images > 0]
        assert (lit >= 128).all() if split == "test" else (lit < 128).all()
        for image, mask, src in zip(images, masks, sources):
            src = src[src >= 0]
            assert 1 <= len(src) <= 3
            # No item covers another: every item pixel survives on the canvas, labelled with its class + 1.
            assert (mask > 0).sum() == len(src) * ITEM * ITEM
            assert int(image.sum(dtype=np.int64)) == sum(int(pool[0][i].sum(dtype=np.int64)) for i in src)
            assert sorted(np.unique(mask[mask > 0])) == sorted({int(pool[1][i]) + 1 for i in src})
    used = {split: sets[split][2][sets[split][2] >= 0] for split in sets}
    for split in used:
        assert len(np.unique(used[split])) == len(used[split])  # no item twice
    assert not set(used["train"]) & set(used["val"])
    again = generate_sets(train, test, GEN, seed=3)
    assert all(np.array_equal(a, b) for split in sets for a, b in zip(sets[split], again[split]))


def test_generator_fails_clearly_when_the_split_has_too_few_items():
    with pytest.raises(SegmentationDataError, match="too few"):
        generate_sets(_items(30, 1, 255, 0), _items(100, 1, 255, 1), GEN, seed=0)


def test_threshold_leaves_dark_item_pixels_as_background():
    images, labels = _items(200, 0, 256, 0)
    cfg = SimpleNamespace(**{**vars(GEN), "threshold": 100})
    canvases, masks, _ = generate_sets((images, labels), (images, labels), cfg, seed=0)["train"]
    assert ((masks > 0) == (canvases > 100)).all()


# --- the CamVid-layout folder set ----------------------------------------------------------------------------------

CLASSES = ["road", "car", "sky"]


def write_camvid(root, sizes=None, n: dict | None = None, seed: int = 0, labels=(2, 1, 0), void: int = 255,
                 size=(20, 26)) -> None:
    """A tiny CamVid-layout folder: RGB images whose masks hold ``labels`` (top third, bottom-right quarter, the
    rest) and ``void`` (unlabelled) in a corner."""
    rng = np.random.default_rng(seed)
    for split, count in (n or {"train": 6, "val": 2, "test": 3}).items():
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for i in range(count):
            h, w = (sizes or {}).get((split, i), size)
            mask = np.full((h, w), labels[2], np.uint8)
            mask[: h // 3] = labels[0]
            mask[h // 2:, w // 2:] = labels[1]
            mask[:2, :3] = void
            image = rng.integers(0, 60, (h, w, 3)).astype(np.uint8) + (mask[..., None] % 4 * 60).astype(np.uint8)
            Image.fromarray(image).save(root / split / f"f{i:03d}.png")
            Image.fromarray(mask).save(root / f"{split}annot" / f"f{i:03d}.png")


def camvid_cfg(root, **changes):
    values = dict(root=str(root), classes=CLASSES, ignore_index=255, channels=3, size=None, crop=None, flip=False)
    return SimpleNamespace(**{**values, **changes})


def test_folder_set_resizes_and_augments_the_training_split_only(tmp_path):
    write_camvid(tmp_path)
    train = FolderSegmentation(camvid_cfg(tmp_path, size=[16, 24], crop=[8, 12], flip=True), "train", train=True)
    test = FolderSegmentation(camvid_cfg(tmp_path, size=[16, 24], crop=[8, 12], flip=True), "test")
    image, mask = train[0]
    assert image.shape == (3, 8, 12) and mask.shape == (8, 12) and image.dtype == torch.float32
    image, mask = test[0]
    assert image.shape == (3, 16, 24) and mask.dtype == torch.long
    assert set(mask.unique().tolist()) <= {0, 1, 2, 255}
    assert torch.equal(test[0][1], test[0][1])  # no randomness outside training


@pytest.mark.parametrize("split, damage, message", [
    ("val", lambda root: (root / "valannot" / "f001.png").unlink(), r"f001.png: no mask .*valannot/f001.png"),
    ("test", lambda root: [p.unlink() for p in (root / "test").iterdir()], r"test: empty split 'test'"),
    ("train", lambda root: [p.unlink() for p in (root / "trainannot").iterdir()] and (root / "trainannot").rmdir(),
     r"trainannot: missing folder; the CamVid layout needs"),
    ("train", lambda root: Image.fromarray(np.zeros((20, 25), np.uint8)).save(root / "trainannot" / "f002.png"),
     r"train/f002.png: image is 26x20 but its mask .*trainannot/f002.png is 25x20"),
    ("val", lambda root: [Image.fromarray(np.zeros((22, 26), np.uint8)).save(root / d / "f001.png")
                          for d in ("val", "valannot")],
     r"val/f001.png is 26x22 but .*val/f000.png is 26x20: set segment.data.size"),
])
def test_bad_folders_fail_naming_the_file(tmp_path, split, damage, message):
    write_camvid(tmp_path)
    damage(tmp_path)
    with pytest.raises(SegmentationDataError, match=message):
        FolderSegmentation(camvid_cfg(tmp_path), split)


def test_crop_larger_than_the_images_is_an_error(tmp_path):
    write_camvid(tmp_path)
    data = FolderSegmentation(camvid_cfg(tmp_path, crop=[24, 24]), "train", train=True)
    with pytest.raises(SegmentationDataError, match=r"crop \[24, 24\] is larger than image 0 \(20x26\)"):
        data[0]


def test_class_index_outside_the_configured_classes_names_the_mask(tmp_path):
    write_camvid(tmp_path)
    Image.fromarray(np.full((20, 26), 7, np.uint8)).save(tmp_path / "trainannot" / "f004.png")
    data = FolderSegmentation(camvid_cfg(tmp_path), "train")
    with pytest.raises(SegmentationDataError, match=r"trainannot/f004.png: class indices \[7\] outside the 3"):
        data[4]


# --- the stages ----------------------------------------------------------------------------------------------------

def _check_outputs(root, metrics, classes):
    assert 0 <= metrics["test_miou"] <= 1 and 0 <= metrics["test_global_acc"] <= 1
    assert list(metrics["test_iou"]) == classes
    assert read_metrics(root / "reports/metrics/segment.json") == metrics
    assert (root / "models/segment/segmenter.ckpt").is_file()
    assert sorted(p.name for p in (root / "models/segment").iterdir()) == ["model", "segmenter.ckpt"]
    history = (root / "reports/plots/segment_history.csv").read_text().splitlines()
    assert history[0] == "epoch,epoch_seconds,train_loss,val_loss,val_miou,val_global_acc,val_class_acc"
    confusion = (root / "reports/plots/segment_confusion.csv").read_text().splitlines()
    assert confusion[0] == "actual,predicted" and len(confusion) > 100
    iou = (root / "reports/plots/segment_iou.csv").read_text().splitlines()
    assert iou[0] == "class,iou" and len(iou) == len(classes) + 1
    for figure in ("segment_overlays", "segment_confusion"):
        assert (root / f"reports/figures/{figure}.png").stat().st_size > 1000


def test_stages_run_on_tiny_generated_data(tiny_raw, smoke_overrides):
    cfg = compose_cfg(*smoke_overrides, *TINY_SET, *TINY_SEGNET, "segment.class_weights=median_frequency")
    meta = make_segmentation_set.main(cfg)
    assert meta["counts"] == {"train": 20, "val": 6, "test": 10} and len(meta["classes"]) == 11
    with np.load(tiny_raw / "data/segmentation/test.npz") as f:
        assert f["images"].shape == (10, 64, 84) and f["masks"].max() <= 10

    metrics = segment.main(cfg)
    _check_outputs(tiny_raw, metrics, meta["classes"])
    assert metrics["model"] == "segnet" and metrics["class_weights"] == "median_frequency"
    module = SegmentationModule.load_from_checkpoint(tiny_raw / "models/segment/segmenter.ckpt")
    assert module.class_weights.shape == (11,) and (module.class_weights >= 0).all()

    runs = {run.data.tags["stage"]: run for run in mlflow.search_runs(experiment_names=["aelab"], output_format="list")}
    assert set(runs) == {"make_segmentation_set", "segment"}
    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(runs["segment"].info.run_id)}
    assert {"segmenter.ckpt", "segment_overlays.png", "segment_confusion.png", "segment_iou.csv"} <= artifacts
    assert len(client.get_metric_history(runs["segment"].info.run_id, "val_miou")) == metrics["epochs"] == 2
    assert "test_iou_background" in runs["segment"].data.metrics


def test_unet_baseline_is_one_override_away(tiny_raw, smoke_overrides):
    cfg = compose_cfg(*smoke_overrides, *TINY_SET, "segment/model=unet", "segment.model.encoder_depth=3",
                      "segment.model.decoder_channels=[16,8,8]", "segment.class_weights=none",
                      "segment.max_epochs=1")
    meta = make_segmentation_set.main(cfg)
    metrics = segment.main(cfg)
    assert metrics["model"] == "unet" and metrics["class_weights"] == "none"
    _check_outputs(tiny_raw, metrics, meta["classes"])


def test_segment_on_a_camvid_layout_folder(workdir, smoke_overrides):
    write_camvid(workdir / "camvid")
    cfg = compose_cfg(*smoke_overrides, *TINY_SEGNET, "segment/data=camvid", f"segment.data.root={workdir}/camvid",
                      f"segment.data.classes=[{','.join(CLASSES)}]", "segment.data.ignore_index=255",
                      "segment.data.size=[16,24]", "segment.data.crop=[12,16]", "segment.overlays=2",
                      "segment.max_epochs=1")
    metrics = segment.main(cfg)
    _check_outputs(workdir, metrics, CLASSES)


def test_segment_without_its_generated_set_names_the_stage(tiny_raw, smoke_overrides):
    with pytest.raises(MissingUpstreamError, match=r"data/segmentation/meta.json.*dvc repro make_segmentation_set"):
        segment.main(compose_cfg(*smoke_overrides, *TINY_SEGNET))
