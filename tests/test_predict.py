"""``python -m aelab.predict`` on generated files: the four networks built as the stages build them (the default
configs, untrained weights: what is tested is the command, not the training), saved as the stages save them, and
the denoiser trained on tiny data and loaded from the registry."""

from __future__ import annotations

import csv

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from aelab import predict
from aelab.lit.autoencoder import autoencoder_module
from aelab.lit.image2image import ImageToImageModule
from aelab.lit.segmentation import SegmentationModule
from aelab.pyfunc import AutoencoderModel, ColorizerModel, DenoiserModel, SegmenterModel, save_network
from conftest import compose_cfg, make_tiny_images

CLASSES = ["background", "shirt", "bag"]


def save_untrained(module: L.LightningModule, model, folder, example: np.ndarray, params: dict | None = None):
    """``module`` written as a Lightning checkpoint in ``folder`` and saved beside it as the stage would."""
    folder.mkdir(parents=True)
    ckpt = folder / "net.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": L.__version__}, ckpt)
    save_network(model, ckpt, example, params)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project folder holding ``models/<stage>/model`` for the four networks."""
    root = tmp_path_factory.mktemp("project")
    cfg = compose_cfg()
    torch.manual_seed(0)
    image = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    save_untrained(ImageToImageModule(OmegaConf.to_container(cfg.denoise.model, resolve=True)), DenoiserModel(),
                   root / "models/denoise", image)
    save_untrained(ImageToImageModule(OmegaConf.to_container(cfg.colorize.model, resolve=True)), ColorizerModel(),
                   root / "models/colorize", image)
    save_untrained(SegmentationModule(OmegaConf.to_container(cfg.segment.model, resolve=True), 1, CLASSES),
                   SegmenterModel(), root / "models/segment", image)
    autoencoder = AutoencoderModel(reference=np.linspace(0, 0.5, 101))
    save_untrained(autoencoder_module(cfg), autoencoder, root / "models/pretrain", image, {"output": "code"})
    return root


@pytest.fixture
def inputs(project, monkeypatch, tmp_path):
    """cwd = the project; returns a folder for this test's input files."""
    monkeypatch.chdir(project)
    folder = tmp_path / "in"
    folder.mkdir()
    return folder


def gray_png(path, width: int, height: int, seed: int = 0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def color_jpeg(path, width: int = 40, height: int = 30):
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[..., 0], rgb[..., 2] = 200, np.arange(width, dtype=np.uint8)[None] * 5
    Image.fromarray(rgb).save(path, quality=95)


def summary(out) -> list[dict]:
    with open(out / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_denoise_keeps_each_size_and_reports_bad_files_while_finishing_the_rest(inputs, tmp_path, capsys):
    gray_png(inputs / "small.png", 28, 28)
    gray_png(inputs / "odd.png", 41, 30, seed=1)
    color_jpeg(inputs / "photo.jpg")
    (inputs / "notes.png").write_text("not an image")
    out = tmp_path / "out"
    assert predict.main(["denoise", str(inputs), "--out", str(out)]) == 1
    rows = {row["input"].rsplit("/", 1)[1]: row for row in summary(out)}
    assert rows["small.png"]["status"] == rows["odd.png"]["status"] == "ok"
    assert Image.open(out / "odd.png").size == (41, 30) and Image.open(out / "odd.png").mode == "L"
    assert Image.open(out / "small.png").size == (28, 28)
    assert "colour image" in rows["photo.jpg"]["message"] and "--gray" in rows["photo.jpg"]["message"]
    assert "not an image" in rows["notes.png"]["message"]
    err = capsys.readouterr().err
    assert "photo.jpg: a colour image" in err and "2 of 4 input(s) done, 2 failed" in err
    assert not (out / "photo.png").exists() and not list(out.glob(".*"))  # nothing half-written

    assert predict.main(["denoise", str(inputs / "photo.jpg"), "--gray", "--out", str(out)]) == 0
    assert Image.open(out / "photo.png").size == (40, 30)


def test_denoise_output_is_the_models_prediction(inputs, tmp_path):
    import mlflow

    pixels = gray_png(inputs / "a.png", 33, 20)
    out = tmp_path / "out"
    assert predict.main(["denoise", str(inputs / "a.png"), "--out", str(out)]) == 0
    expected = mlflow.pyfunc.load_model("models/denoise/model").predict((pixels / 255).astype(np.float32)[None, None])
    written = np.asarray(Image.open(out / "a.png"), dtype=np.float32) / 255
    assert np.abs(written - expected[0, 0]).max() <= 0.5 / 255 + 1e-6  # the PNG's rounding only


def test_oversized_images_are_refused_before_decoding(inputs, tmp_path, monkeypatch):
    monkeypatch.setattr(predict, "MAX_PIXELS", 1000)
    gray_png(inputs / "big.png", 50, 40)
    out = tmp_path / "out"
    assert predict.main(["denoise", str(inputs / "big.png"), "--out", str(out)]) == 1
    assert "50x40 is 0.0 MP, over the 0.001 MP limit" in summary(out)[0]["message"]


def test_colorize_takes_gray_and_rgb_and_keeps_the_luminance(inputs, tmp_path):
    gray_png(inputs / "g.png", 30, 22)
    color_jpeg(inputs / "c.jpg")
    out = tmp_path / "out"
    assert predict.main(["colorize", str(inputs), "--out", str(out)]) == 0
    colored = Image.open(out / "g.png")
    assert colored.mode == "RGB" and colored.size == (30, 22)
    gray = np.asarray(Image.open(inputs / "g.png"), dtype=np.float32)
    luma = np.asarray(colored.convert("L"), dtype=np.float32)
    assert np.abs(luma - gray).mean() < 6  # L is kept: only the chroma is the network's


def test_segment_writes_an_overlay_a_class_mask_and_the_class_shares(inputs, tmp_path):
    gray_png(inputs / "scene.png", 50, 36)
    out = tmp_path / "out"
    assert predict.main(["segment", str(inputs / "scene.png"), "--out", str(out)]) == 0
    mask = np.asarray(Image.open(out / "scene_mask.png"))
    assert mask.shape == (36, 50) and mask.max() < len(CLASSES)
    assert Image.open(out / "scene.png").mode == "RGB"
    shares = summary(out)[0]["classes"]
    assert sum(float(part.rsplit(" ", 1)[1].rstrip("%")) for part in shares.split("; ")) == pytest.approx(100, abs=0.2)
    assert all(part.rsplit(" ", 1)[0] in CLASSES for part in shares.split("; "))


def fashion_csv(path, images: np.ndarray, labels: np.ndarray, header: bool = True):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(["label", *(f"pixel{i + 1}" for i in range(784))])
        writer.writerows([[label, *image.ravel()] for image, label in zip(images, labels)])


def test_encode_a_csv_gives_the_autoencoders_codes_and_names_bad_rows(inputs, tmp_path):
    import mlflow

    images, labels = make_tiny_images(5, seed=3)
    fashion_csv(inputs / "table.csv", images, labels)
    with open(inputs / "table.csv", "a") as f:
        f.write("7," + ",".join(["1"] * 100) + "\n")  # a short row
    out = tmp_path / "out"
    assert predict.main(["encode", str(inputs / "table.csv"), "--out", str(out)]) == 1
    with open(out / "codes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["label"] for row in rows] == [str(label) for label in labels]
    codes = np.array([[float(row[k]) for k in row if k.startswith("code_")] for row in rows])
    model = mlflow.pyfunc.load_model("models/pretrain/model")
    expected = model.predict((images / 255).astype(np.float32)[:, None], params={"output": "code"})
    np.testing.assert_allclose(codes, expected, rtol=1e-5, atol=1e-6)
    header_only = inputs / "empty" / "header.csv"
    header_only.parent.mkdir()
    header_only.write_text("label," + ",".join(f"pixel{i + 1}" for i in range(784)) + "\n")
    assert predict.main(["encode", str(header_only.parent), "--out", str(tmp_path / "none")]) == 2
    bad = [row for row in summary(out) if row["status"] == "failed"]
    assert len(bad) == 1 and bad[0]["input"].endswith("table.csv:7")
    assert "100 pixel values; a row needs 784" in bad[0]["message"]


def test_headerless_csv_with_labels_first_and_images_of_any_size_score_for_anomaly(inputs, tmp_path):
    images, labels = make_tiny_images(3, seed=4)
    fashion_csv(inputs / "rows.csv", images, labels, header=False)
    Image.fromarray(255 - np.kron(images[0], np.ones((3, 2), np.uint8))).save(inputs / "big_light.png")  # 84x56
    out = tmp_path / "out"
    assert predict.main(["anomaly", str(inputs), "--out", str(out)]) == 0
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(0 <= float(row["percentile"]) <= 100 and float(row["mse"]) >= 0 for row in rows)
    assert [row["label"] for row in rows if "rows.csv" in row["input"]] == [str(label) for label in labels]


def test_the_autoencoder_input_is_letterboxed_inverted_and_resized():
    light = np.ones((1, 40, 20), np.float32)
    light[0, 10:30, 5:15] = 0  # a dark item on white
    x = predict.to_autoencoder(light, "auto")
    assert x.shape == (1, 28, 28)
    assert x[0, 14, 14] > 0.9 and x[0, 14, 0] < 0.1  # inverted: light item, black letterbox
    assert predict.to_autoencoder(light, "never")[0, 14, 0] > 0.9


def test_usage_errors_name_the_path_and_exit_2(inputs, tmp_path, capsys, monkeypatch):
    assert predict.main(["denoise", str(tmp_path / "missing.png")]) == 2
    assert f"{tmp_path / 'missing.png'}: no such file or folder" in capsys.readouterr().err
    assert predict.main(["denoise", str(inputs)]) == 2
    assert "the folder has no files" in capsys.readouterr().err
    gray_png(inputs / "a.png", 28, 28)
    monkeypatch.chdir(tmp_path)
    assert predict.main(["denoise", str(inputs)]) == 2
    assert "no model at models/denoise/model: run the pipeline first" in capsys.readouterr().err


def test_predict_from_the_registry_with_a_stage_trained_denoiser(tiny_raw, smoke_overrides):
    from aelab.stages import denoise

    denoise.main(compose_cfg(*smoke_overrides))
    images, _ = make_tiny_images(2, seed=5)
    for i, image in enumerate(images):
        Image.fromarray(image).save(tiny_raw / f"item{i}.png")
    registry, folder = tiny_raw / "from_registry", tiny_raw / "from_folder"
    assert predict.main(["denoise", "item0.png", "item1.png", "--out", str(folder)]) == 0
    assert predict.main(["denoise", "item0.png", "item1.png", "--model", "models:/aelab-denoiser@pipeline",
                         "--out", str(registry)]) == 0
    for i in range(2):
        assert np.array_equal(np.asarray(Image.open(registry / f"item{i}.png")),
                              np.asarray(Image.open(folder / f"item{i}.png")))
