"""Color space, colorfulness and baselines on tiny generated images; CIFAR-10 through the download machinery
(loopback server, user mirror); the photograph fallback and its split; both color stages end to end."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import pickle
import tarfile

import hydra
import mlflow
import numpy as np
import pytest
import torch
from http_fixtures import ScriptedServer
from PIL import Image
from skimage.color import rgb2lab

from aelab.config import ConfigError, validate
from aelab.data.catalog import DATASETS
from aelab.data.color import (FallbackError, lab_to_rgb, photo_patches, read_cifar, resolve_photo, rgb_to_lab,
                              split_by_photo, to_model_space, to_rgb)
from aelab.data.download import DownloadError, download_dataset
from aelab.lit.image2image import ImageToImageModule
from aelab.metrics import colorfulness
from aelab.stages import colorize, make_color_set
from conftest import compose_cfg, read_metrics

CIFAR = DATASETS["cifar10"]
FAST = dict(retries=2, backoff=0.01, timeout=5.0, progress=False)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch):
    """No user mirror and no proxies leak in: tests only ever talk to 127.0.0.1."""
    for var in ("AELAB_MIRROR", "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def tiny_cifar(per_batch: int = 4, seed: int = 0) -> tuple[bytes, np.ndarray, np.ndarray]:
    """A cifar-10-python.tar.gz laid out like the real one (pickled batches), with its train and test images."""
    rng = np.random.default_rng(seed)
    buf, images = io.BytesIO(), []
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for member in CIFAR.files[0].members:
            data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)  # rows: R plane, G plane, B plane
            payload = pickle.dumps({b"data": data, b"labels": rng.integers(0, 10, per_batch).tolist()})
            info = tarfile.TarInfo(member)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return buf.getvalue(), np.concatenate(images[:-1]), images[-1]


def tiny_cifar_spec(archive: bytes, mirrors=()):
    """The catalog's cifar10 entry with ``mirrors`` and the md5 of ``archive``."""
    f = dataclasses.replace(CIFAR.files[0], archive_md5=hashlib.md5(archive).hexdigest())
    return dataclasses.replace(CIFAR, mirrors=tuple(mirrors), files=(f,))


def write_photos(folder, n: int = 4) -> list[str]:
    """``n`` 64x48 textured photographs, each of its own hue, as PNGs; returns their paths."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    hues = [(200, 40, 40), (40, 160, 60), (50, 70, 210), (220, 200, 40), (150, 60, 180)]
    paths = []
    for i in range(n):
        pixels = np.clip(np.array(hues[i]) + rng.normal(0, 12, (48, 64, 3)), 0, 255).astype(np.uint8)
        paths.append(str(folder / f"photo{i}.png"))
        Image.fromarray(pixels).save(paths[-1])
    return paths


def color_overrides(photos: list[str]) -> list[str]:
    """The fallback on ``photos``, the last two held out for testing, and a tiny colorizer."""
    return [f"colorize.data.fallback.photos=[{','.join(photos)}]",
            f"colorize.data.fallback.test_photos=[{','.join(photos[-2:])}]",
            "colorize.data.fallback.patches_per_photo=30", "colorize.data.fallback.max_side=64",
            "colorize.model.channels=[8,16,32]", "colorize.max_epochs=2", "colorize.batch_size=16"]


def test_lab_round_trip_and_agreement_with_scikit_image():
    rgb = np.random.default_rng(0).integers(0, 256, size=(6, 16, 16, 3), dtype=np.uint8)
    rgb[0], rgb[1] = 0, 255  # black and white
    x = torch.from_numpy(rgb).permute(0, 3, 1, 2).double() / 255
    lab = rgb_to_lab(x)
    expected = torch.from_numpy(rgb2lab(rgb)).permute(0, 3, 1, 2)
    assert torch.allclose(lab, expected, atol=1e-6)
    assert torch.allclose(lab_to_rgb(lab), x, atol=1e-6)
    assert torch.allclose(lab_to_rgb(rgb_to_lab(x.float())), x.float(), atol=1e-4)  # float32, as trained
    assert lab[1, 0].min() == pytest.approx(100, abs=1e-3) and lab[0].abs().max() < 1e-6


def test_model_space_ranges_and_gray_baseline():
    rgb = np.random.default_rng(1).integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    l_in, ab = to_model_space(rgb)
    assert l_in.shape == (5, 1, 8, 8) and ab.shape == (5, 2, 8, 8)
    assert 0 <= l_in.min() and l_in.max() <= 1 and ab.abs().max() < 1
    assert torch.allclose(to_rgb(l_in, ab), torch.from_numpy(rgb).permute(0, 3, 1, 2) / 255, atol=1e-4)
    gray = to_rgb(l_in, torch.zeros_like(ab))
    assert (gray.max(dim=1).values - gray.min(dim=1).values).max() < 1e-4  # grayscale replicated to 3 channels


def test_colorfulness_of_gray_and_saturated_images():
    gray = torch.rand(2, 1, 8, 8).expand(2, 3, 8, 8)
    assert torch.allclose(colorfulness(gray), torch.zeros(2), atol=1e-3)
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1
    assert colorfulness(red).item() == pytest.approx(0.3 * math.hypot(255, 127.5))  # no spread, mean offset only
    assert colorfulness(torch.rand(1, 3, 8, 8)).item() > colorfulness(torch.rand(1, 3, 8, 8) * 0.1).item()


def test_a_model_predicting_no_chroma_scores_exactly_the_gray_baseline():
    rgb = np.random.default_rng(2).integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    l_in, ab = to_model_space(rgb)
    module = ImageToImageModule({"_target_": "torch.nn.Conv2d", "in_channels": 1, "out_channels": 2, "kernel_size": 1})
    torch.nn.init.zeros_(module.model.weight)
    torch.nn.init.zeros_(module.model.bias)
    result = colorize.evaluate(module, l_in, ab, torch.from_numpy(rgb).permute(0, 3, 1, 2) / 255, batch_size=4)
    for metric in ("psnr", "ssim", "ab_mae"):
        assert result[metric]["model"] == pytest.approx(result[metric]["gray"])
    assert result["ab_mae"]["gray"] == pytest.approx(float(ab.abs().mean()) * 110)
    assert result["colorfulness"]["gray"] < 0.01 < result["colorfulness"]["true"]


@pytest.mark.parametrize("group", ["default", "gpu"])
def test_colorizer_configs_validate_and_map_luminance_to_chroma(group):
    cfg = compose_cfg(f"colorize={group}")
    validate(cfg)
    out = hydra.utils.instantiate(cfg.colorize.model)(torch.rand(2, 1, 32, 32))
    assert out.shape == (2, 2, 32, 32) and out.abs().max() < 1


def test_cifar10_catalog_entry():
    (archive,) = CIFAR.files
    assert CIFAR.channels == 3 and len(CIFAR.classes) == 10
    assert CIFAR.mirrors == ("https://www.cs.toronto.edu/~kriz",) and archive.name == "cifar-10-python.tar.gz"
    assert archive.archive_md5 == "c58f30108f718f92721af3b95e74349a" and len(archive.members) == 6


def test_cifar10_downloads_verifies_resumes_and_reads(tmp_path):
    archive, train, test = tiny_cifar()
    with ScriptedServer() as server:
        server.route("/bad/cifar-10-python.tar.gz", tiny_cifar(seed=1)[0])  # a valid archive, wrong md5
        server.route("/kriz/cifar-10-python.tar.gz", archive, "truncate", "ok")
        manifest = download_dataset(tiny_cifar_spec(archive, [server.url + "/bad", server.url + "/kriz"]),
                                    tmp_path, **FAST)
        second = server.requests_for("/kriz/cifar-10-python.tar.gz")[1]
    entry = manifest["files"]["cifar-10-python.tar.gz"]
    assert entry["source"] == server.url + "/kriz/cifar-10-python.tar.gz"
    assert second[1]["Range"] == f"bytes={len(archive) // 2}-" and second[2] == 206  # resumed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-python.tar.gz", "manifest.json"]
    got_train, got_test = read_cifar(tmp_path / "cifar-10-python.tar.gz", CIFAR.files[0].members)
    assert got_train.shape == (20, 32, 32, 3) and np.array_equal(got_train, train) and np.array_equal(got_test, test)


def test_cifar10_archive_without_the_batches_is_rejected(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.addfile(tarfile.TarInfo("something/else"), io.BytesIO(b""))
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "cifar-10-python.tar.gz").write_bytes(buf.getvalue())
    with pytest.raises(DownloadError, match=r"tar archive lacks cifar-10-batches-py/data_batch_1"):
        download_dataset(tiny_cifar_spec(buf.getvalue()), tmp_path / "out", mirror=str(mirror), **FAST)


def test_make_color_set_uses_cifar10_from_a_user_mirror(workdir, smoke_overrides, monkeypatch):
    archive, train, test = tiny_cifar()
    monkeypatch.setitem(DATASETS, "cifar10", tiny_cifar_spec(archive))
    (workdir / "mirror").mkdir()
    (workdir / "mirror/cifar-10-python.tar.gz").write_bytes(archive)
    manifest = make_color_set.main(compose_cfg(*smoke_overrides, "colorize.data.mirror=mirror"))

    assert manifest["source"] == "cifar10" and manifest["train"] == [20, 32, 32, 3]
    assert manifest["download"]["files"]["cifar-10-python.tar.gz"]["source"] == "mirror/cifar-10-python.tar.gz"
    with np.load(workdir / "data/color/images.npz") as f:
        assert np.array_equal(f["train"], train) and np.array_equal(f["test"], test)


def test_fallback_patches_are_split_by_photograph_and_the_test_tiles_do_not_depend_on_the_seed(tmp_path):
    photos = write_photos(tmp_path / "photos")  # 64x48 each
    arrays, info = photo_patches(photos, [photos[2]], 16, 25, 64, seed=3)
    assert arrays["train"].shape == (75, 16, 16, 3) and arrays["test"].shape == (12, 16, 16, 3)  # 4 x 3 tiles
    assert np.bincount(arrays["train_photo"]).tolist() == [25, 25, 0, 25] and set(arrays["test_photo"]) == {2}
    assert arrays["photo_names"].tolist() == photos
    assert [entry["split"] for entry in info.values()] == ["train", "train", "test", "train"]
    assert info[photos[2]]["patches"] == 12
    assert info[photos[2]]["sha256"] == hashlib.sha256(open(photos[2], "rb").read()).hexdigest()
    held_out = np.array(Image.open(photos[2]))
    assert np.array_equal(arrays["test"][5], held_out[16:32, 16:32])  # row 1, column 1
    rows = arrays["test"].reshape(3, 4, 16, 16, 3)
    tiled = np.concatenate([np.concatenate(list(row), axis=1) for row in rows])
    assert np.array_equal(tiled, held_out)  # every pixel once
    hue_of = lambda patches: patches.reshape(len(patches), -1, 3).mean(axis=1).argmax(axis=1)  # noqa: E731
    assert (hue_of(arrays["train"]) == hue_of(arrays["test"][:1])[0]).sum() <= 25  # the other photo of that hue
    again, _ = photo_patches(photos, [photos[2]], 16, 25, 64, seed=3)
    other_seed, _ = photo_patches(photos, [photos[2]], 16, 25, 64, seed=4)
    assert all(np.array_equal(again[k], arrays[k]) for k in arrays)
    assert np.array_equal(other_seed["test"], arrays["test"])
    assert not np.array_equal(other_seed["train"], arrays["train"])


def test_validation_holds_out_whole_photographs():
    photo = np.repeat([4, 0, 7, 2, 9], 3)
    train, val = split_by_photo(photo, 0.2, seed=0)
    assert len(set(photo[val])) == 1 and not set(photo[val]) & set(photo[train])
    assert sorted([*train, *val]) == list(range(15))
    assert len(set(photo[split_by_photo(photo, 0.9, seed=0)[0]])) == 1  # always one photo left to train on
    with pytest.raises(FallbackError, match="1 training photograph"):
        split_by_photo(np.zeros(5, int), 0.2, seed=0)


def test_fallback_errors_are_clear(tmp_path):
    photos = write_photos(tmp_path / "photos", n=3)
    with pytest.raises(FallbackError, match=r"3 fallback photograph\(s\) with 2 held out .* fewer than two"):
        photo_patches(photos, photos[:2], 16, 5, 64, seed=0)
    with pytest.raises(FallbackError, match=r"\['x.png'\] are not among the fallback photos"):
        photo_patches(photos, ["x.png"], 16, 5, 64, seed=0)
    with pytest.raises(FallbackError, match=r"not found"):
        photo_patches([*photos, str(tmp_path / "nope.png")], [photos[0]], 16, 5, 64, seed=0)
    with pytest.raises(FallbackError, match=r"smaller than patch_size=32"):
        photo_patches(photos, [photos[0]], 32, 5, 24, seed=0)
    assert resolve_photo("skimage:data/astronaut.png").is_file()
    with pytest.raises(FallbackError, match="package 'no_such_pkg' is not installed"):
        resolve_photo("no_such_pkg:data/x.png")


@pytest.mark.parametrize("overrides, key", [
    (["colorize.data.fallback.photos=[a.png,b.png]"], r"colorize\.data\.fallback\.test_photos: .*not among"),
    (["colorize.data.fallback.photos=[a.png,b.png]", "colorize.data.fallback.test_photos=[a.png]"],
     r"colorize\.data\.fallback\.test_photos: .*1 test photograph\(s\) out of 2 .*fewer than two"),
    (["colorize.data.dataset=fashion_mnist"], r"colorize\.data\.dataset: .*1-channel images but 3-channel"),
    (["colorize.data.fallback.patch_size=20"], r"colorize\.data\.fallback\.patch_size"),
])
def test_bad_colorize_config_fails_before_any_work(workdir, smoke_overrides, overrides, key):
    with pytest.raises(ConfigError, match=key):
        make_color_set.main(compose_cfg(*smoke_overrides, *overrides))
    assert not (workdir / "data").exists() and not (workdir / "mlflow.db").exists()


def test_no_source_and_no_fallback_is_an_error_naming_the_mirror_key(workdir, smoke_overrides, monkeypatch):
    monkeypatch.setitem(DATASETS, "cifar10", dataclasses.replace(CIFAR, mirrors=()))
    with pytest.raises(DownloadError, match=r"(?s)no sources configured.*colorize\.data\.mirror"):
        make_color_set.main(compose_cfg(*smoke_overrides, "colorize.data.fallback=null"))


def test_color_stages_on_the_fallback(workdir, smoke_overrides, monkeypatch):
    monkeypatch.setitem(DATASETS, "cifar10", dataclasses.replace(CIFAR, mirrors=()))  # offline, fast
    photos = write_photos(workdir / "photos", n=5)
    cfg = compose_cfg(*smoke_overrides, *color_overrides([f"photos/{p.rsplit('/', 1)[1]}" for p in photos]))

    manifest = make_color_set.main(cfg)
    assert manifest["source"] == "fallback" and "no sources configured" in manifest["reason"]
    assert manifest["train"] == [90, 32, 32, 3] and manifest["test"] == [4, 32, 32, 3]  # 2 x 1 tiles of 2 photos
    assert sum(e["split"] == "test" for e in manifest["fallback"]["photos"].values()) == 2
    assert json.loads((workdir / "data/color/manifest.json").read_text()) == manifest

    metrics = colorize.main(cfg)
    assert metrics["fallback"] == 1 and metrics["test_images"] == 4 and metrics["epochs"] == 2
    for metric in ("psnr", "ssim", "ab_mae"):
        assert set(metrics[metric]) == {"model", "gray"} and all(math.isfinite(v) for v in metrics[metric].values())
    assert set(metrics["per_photo"]) == {"photo3", "photo4"}
    gains = [p["psnr_gain_vs_gray"] for p in metrics["per_photo"].values()]
    assert metrics["per_photo_std"]["psnr_gain_vs_gray"] == pytest.approx(float(np.std(gains, ddof=1)))
    assert metrics["psnr_gain_vs_gray"] == pytest.approx(metrics["psnr"]["model"] - metrics["psnr"]["gray"])
    assert set(metrics["colorfulness"]) == {"model", "gray", "true"}
    assert read_metrics(workdir / "reports/metrics/colorize.json") == metrics
    assert (workdir / "reports/figures/colorize_grid.png").stat().st_size > 1000
    assert sorted(p.name for p in (workdir / "models/colorize").iterdir()) == ["colorizer.ckpt", "model"]

    runs = {r.data.tags["stage"]: r for r in mlflow.search_runs(experiment_names=["aelab"], output_format="list")}
    assert set(runs) == {"make_color_set", "colorize"}
    for run in runs.values():
        assert run.data.tags["color_source"] == "fallback" and run.data.tags["dataset"] == "cifar10"
    client = mlflow.MlflowClient()
    assert len(client.get_metric_history(runs["colorize"].info.run_id, "val_loss")) == 2
    assert {"colorizer.ckpt", "colorize_grid.png", "colorize_loss.csv"} <= {
        a.path for a in client.list_artifacts(runs["colorize"].info.run_id)}


def test_colorize_stops_after_patience_epochs_without_a_lower_val_loss(workdir, smoke_overrides, monkeypatch):
    monkeypatch.setitem(DATASETS, "cifar10", dataclasses.replace(CIFAR, mirrors=()))
    photos = write_photos(workdir / "photos", n=4)
    cfg = compose_cfg(*smoke_overrides, *color_overrides([f"photos/{p.rsplit('/', 1)[1]}" for p in photos]),
                      "colorize.max_epochs=6", "colorize.patience=1", "colorize.lr=0.05")
    make_color_set.main(cfg)
    metrics = colorize.main(cfg)

    rows = list(csv.DictReader((workdir / "reports/plots/colorize_loss.csv").open()))
    val = [float(r["val_loss"]) for r in rows]
    stalled = [i for i in range(1, len(val)) if val[i] >= min(val[:i])]  # epochs that bring no new best
    # Lightning's rule with patience 1: the fit ends at the first epoch that brings no new best
    assert stalled and len(val) == metrics["epochs"] == stalled[0] + 1 < 6  # here it does stop early
    assert metrics["best_val_loss"] == pytest.approx(min(val), abs=1e-6)
