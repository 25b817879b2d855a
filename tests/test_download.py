import dataclasses
import gzip
import hashlib
import json
import logging
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from http_fixtures import ScriptedServer, tiny_archives, tiny_arrays, tiny_payloads, tiny_spec

from aelab.data import download
from aelab.data.catalog import DATASETS, UnknownDatasetError, get_spec
from aelab.data.download import DownloadError, download_dataset, manifest_hash
from aelab.data.idx import encode_idx, read_idx

IMAGES = "train-images-idx3-ubyte.gz"
FAST = dict(retries=3, backoff=0.01, timeout=5.0, progress=False)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch):
    """No user mirror and no proxies leak in: tests only ever talk to 127.0.0.1."""
    for var in ("AELAB_MIRROR", "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def server():
    with ScriptedServer() as srv:
        yield srv


def serve_all(srv, prefix="/m", archives=None, **modes):
    """Serve every tiny archive under ``prefix``; ``modes`` maps a file name to its mode list."""
    archives = archives or tiny_archives()
    for name, body in archives.items():
        srv.route(f"{prefix}/{name}", body, *modes.get(name, ("ok",)))
    return srv.url + prefix


def assert_tiny_dataset(out_dir):
    for name, array in tiny_arrays().items():
        np.testing.assert_array_equal(read_idx(out_dir / name), array)


def leftovers(out_dir):
    return sorted(p.name for p in Path(out_dir).iterdir())


def test_downloads_from_first_mirror_and_writes_manifest(server, tmp_path):
    base = serve_all(server)
    out = tmp_path / "out"
    manifest = download_dataset(tiny_spec([base, server.url + "/unused"]), out, **FAST)

    assert_tiny_dataset(out)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["dataset"] == "tiny"
    archives, payloads = tiny_archives(), tiny_payloads()
    for name, entry in manifest["files"].items():
        assert entry == {
            "source": f"{base}/{name}",
            "bytes": len(archives[name]),
            "sha256": hashlib.sha256(archives[name]).hexdigest(),
            "decoded_sha256": hashlib.sha256(payloads[name]).hexdigest(),
            "shape": list(tiny_arrays()[name].shape),
        }
    assert not any(path.startswith("/unused") for path, _, _ in server.requests)
    assert leftovers(out) == sorted([*archives, "manifest.json"])


def test_404_is_not_retried_and_next_mirror_is_used(server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="aelab.download")
    base = serve_all(server, "/good")
    manifest = download_dataset(tiny_spec([server.url + "/missing", base]), tmp_path, **FAST)

    assert len(server.requests_for(f"/missing/{IMAGES}")) == 1
    assert manifest["files"][IMAGES]["source"] == f"{base}/{IMAGES}"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(f"/missing/{IMAGES}: HTTP 404" in m for m in warnings)
    assert f"{IMAGES}: using {base}/{IMAGES}" in infos


def test_transient_500_is_retried_until_success(server, tmp_path):
    base = serve_all(server, **{IMAGES: ("500", "500", "ok")})
    manifest = download_dataset(tiny_spec([base]), tmp_path, **FAST)

    assert [status for _, _, status in server.requests_for(f"/m/{IMAGES}")] == [500, 500, 200]
    assert manifest["files"][IMAGES]["source"] == f"{base}/{IMAGES}"
    assert_tiny_dataset(tmp_path)


def test_persistent_500_gives_up_after_retries(server, tmp_path):
    base = serve_all(server, **{IMAGES: ("500",)})
    with pytest.raises(DownloadError, match=r"HTTP 500 .*gave up after 3 attempts"):
        download_dataset(tiny_spec([base]), tmp_path, **{**FAST, "retries": 2})
    assert len(server.requests_for(f"/m/{IMAGES}")) == 3
    assert leftovers(tmp_path) == []


def test_interrupted_download_resumes_with_range(server, tmp_path):
    body = tiny_archives()[IMAGES]
    base = serve_all(server, **{IMAGES: ("truncate", "ok")})
    download_dataset(tiny_spec([base]), tmp_path, **{**FAST, "progress": True})  # also exercises the tqdm bar

    first, second = server.requests_for(f"/m/{IMAGES}")
    assert "Range" not in first[1] and first[2] == 200
    assert second[1]["Range"] == f"bytes={len(body) // 2}-" and second[2] == 206
    assert (tmp_path / IMAGES).read_bytes() == body
    assert not (tmp_path / f"{IMAGES}.part").exists()


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    body = tiny_archives()[IMAGES]
    base = serve_all(server, **{IMAGES: ("truncate", "no-range")})
    download_dataset(tiny_spec([base]), tmp_path, **FAST)

    second = server.requests_for(f"/m/{IMAGES}")[1]
    assert second[1]["Range"] == f"bytes={len(body) // 2}-" and second[2] == 200
    assert (tmp_path / IMAGES).read_bytes() == body  # not the first half followed by the whole body


def test_timeout_is_retried(server, tmp_path):
    base = serve_all(server, **{IMAGES: ("stall", "ok")})
    manifest = download_dataset(tiny_spec([base]), tmp_path, **{**FAST, "timeout": 0.2})
    assert len(server.requests_for(f"/m/{IMAGES}")) == 2
    assert manifest["files"][IMAGES]["source"] == f"{base}/{IMAGES}"


def test_checksum_mismatch_falls_through_to_next_mirror(server, tmp_path):
    bad = serve_all(server, "/bad", archives=tiny_archives(seed=1))  # valid IDX, wrong content
    good = serve_all(server, "/good")
    manifest = download_dataset(tiny_spec([bad, good]), tmp_path, **FAST)

    assert all(entry["source"].startswith(good) for entry in manifest["files"].values())
    assert_tiny_dataset(tmp_path)


def test_checksum_mismatch_everywhere_leaves_nothing_behind(server, tmp_path):
    base = serve_all(server, archives=tiny_archives(seed=1))
    with pytest.raises(DownloadError) as info:
        download_dataset(tiny_spec([base]), tmp_path, **FAST)

    expected = hashlib.sha256(tiny_payloads()[IMAGES]).hexdigest()
    actual = hashlib.sha256(tiny_payloads(seed=1)[IMAGES]).hexdigest()
    assert f"{base}/{IMAGES}: checksum mismatch for {IMAGES}: expected decoded sha256 {expected}, got {actual}" in str(
        info.value
    )
    assert leftovers(tmp_path) == []  # no final file, no .part, no manifest


def test_archive_md5_is_checked_when_decoded_sha_unknown(server, tmp_path):
    # Same payload, different gzip header bytes: decoded content is right but the archive md5 is not.
    rezipped = serve_all(server, "/rezipped", archives=tiny_archives(mtime=12345))
    with pytest.raises(DownloadError, match=rf"{IMAGES}: expected archive md5 [0-9a-f]{{32}}, got [0-9a-f]{{32}}"):
        download_dataset(tiny_spec([rezipped], use_md5=True), tmp_path / "a", **FAST)

    original = serve_all(server, "/original")
    manifest = download_dataset(tiny_spec([original], use_md5=True), tmp_path / "b", **FAST)
    assert manifest["files"][IMAGES]["source"] == f"{original}/{IMAGES}"


def test_wrong_shape_is_rejected(server, tmp_path):
    archives = tiny_archives()
    archives[IMAGES] = gzip.compress(encode_idx(np.zeros((20, 28, 27), dtype=np.uint8)))
    base = serve_all(server, archives=archives)
    with pytest.raises(DownloadError, match=r"IDX shape \(20, 28, 27\) does not match expected \(20, 28, 28\)"):
        download_dataset(tiny_spec([base]), tmp_path, **FAST)
    assert not (tmp_path / IMAGES).exists()


def test_system_dir_source(server, tmp_path):
    system = tmp_path / "system"
    system.mkdir()
    for name, body in tiny_archives().items():
        (system / name).write_bytes(body)
    manifest = download_dataset(tiny_spec([server.url + "/missing"], system_dir=str(system)), tmp_path / "out", **FAST)

    assert manifest["files"][IMAGES]["source"] == str(system / IMAGES)
    assert_tiny_dataset(tmp_path / "out")


def test_user_mirror_directory_with_uncompressed_files(server, tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name, payload in tiny_payloads().items():
        (mirror / name).write_bytes(payload)  # a mirror may serve raw IDX under the .gz name
    empty_system = tmp_path / "system"
    empty_system.mkdir()
    spec = tiny_spec([server.url + "/missing"], system_dir=str(empty_system))
    manifest = download_dataset(spec, tmp_path / "out", mirror=str(mirror), **FAST)

    assert manifest["files"][IMAGES]["source"] == str(mirror / IMAGES)
    assert (tmp_path / "out" / IMAGES).read_bytes() == tiny_payloads()[IMAGES]
    assert_tiny_dataset(tmp_path / "out")


def test_user_mirror_url(server, tmp_path):
    user = serve_all(server, "/user")
    manifest = download_dataset(tiny_spec([server.url + "/missing"]), tmp_path, mirror=user + "/", **FAST)
    assert manifest["files"][IMAGES]["source"] == f"{user}/{IMAGES}"


def test_env_var_mirror_and_explicit_override(server, tmp_path, monkeypatch):
    env_base = serve_all(server, "/env")
    arg_base = serve_all(server, "/arg")
    monkeypatch.setenv("AELAB_MIRROR", env_base)
    spec = tiny_spec([server.url + "/missing"])

    from_env = download_dataset(spec, tmp_path / "a", **FAST)
    assert from_env["files"][IMAGES]["source"] == f"{env_base}/{IMAGES}"
    from_arg = download_dataset(spec, tmp_path / "b", mirror=arg_base, **FAST)
    assert from_arg["files"][IMAGES]["source"] == f"{arg_base}/{IMAGES}"


def test_cached_rerun_makes_no_requests_and_repairs_bad_files(server, tmp_path):
    base = serve_all(server)
    spec = tiny_spec([base])
    first = download_dataset(spec, tmp_path, **FAST)
    n_requests = len(server.requests)

    second = download_dataset(spec, tmp_path, **FAST)
    assert len(server.requests) == n_requests
    assert {entry["source"] for entry in second["files"].values()} == {"cached"}
    assert manifest_hash(second) == manifest_hash(first)

    (tmp_path / IMAGES).write_bytes(b"garbage")
    third = download_dataset(spec, tmp_path, **FAST)
    assert third["files"][IMAGES]["source"] == f"{base}/{IMAGES}"
    assert len(server.requests) == n_requests + 1
    assert_tiny_dataset(tmp_path)


def test_cached_rerun_decodes_only_what_the_manifest_does_not_vouch_for(server, tmp_path, monkeypatch):
    base = serve_all(server)
    spec = tiny_spec([base])
    first = download_dataset(spec, tmp_path, **FAST)
    decoded = []
    decompress = download.decompress
    monkeypatch.setattr(download, "decompress", lambda raw, source: decoded.append(source) or decompress(raw, source))

    second = download_dataset(spec, tmp_path, **FAST)
    assert decoded == []  # each stored file is byte for byte the one the manifest recorded
    assert second["files"] == {name: {**entry, "source": "cached"} for name, entry in first["files"].items()}

    stored = tmp_path / IMAGES
    before = stored.stat()
    body = bytearray(stored.read_bytes())
    body[len(body) // 2] ^= 0xFF  # one byte changed; same size and mtime
    stored.write_bytes(bytes(body))
    os.utime(stored, ns=(before.st_atime_ns, before.st_mtime_ns))
    n_requests = len(server.requests)
    third = download_dataset(spec, tmp_path, **FAST)
    assert decoded[0] == str(stored) and third["files"][IMAGES]["source"] == f"{base}/{IMAGES}"
    assert len(server.requests) == n_requests + 1
    assert_tiny_dataset(tmp_path)

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["files"][IMAGES]["decoded_sha256"] = "0" * 64  # a manifest vouching for other content is not believed
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert download_dataset(spec, tmp_path, **FAST)["files"][IMAGES]["source"] == f"{base}/{IMAGES}"
    assert_tiny_dataset(tmp_path)


def test_every_source_failing_names_each_source_and_reason(server, tmp_path, monkeypatch):
    # A name that "fails DNS" without touching any resolver: getaddrinfo is faked for it alone.
    real_getaddrinfo, dns_calls = socket.getaddrinfo, []

    def fake_getaddrinfo(host, *args, **kwargs):
        if host == "mirror.invalid":
            dns_calls.append(host)
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    with socket.socket() as s:  # a loopback port with nobody listening
        s.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{s.getsockname()[1]}"
    server.route(f"/trunc/{IMAGES}", tiny_archives()[IMAGES], "truncate")
    server.route(f"/corrupt/{IMAGES}", b"\x1f\x8b" + b"not really gzip", "ok")
    system = tmp_path / "system"
    system.mkdir()
    user = tmp_path / "user"
    user.mkdir()
    (user / IMAGES).write_bytes(b"\x08\x03\x00\x00" + b"\x00" * 100)
    mirrors = ["http://mirror.invalid/x", server.url + "/nope", server.url + "/err", refused, server.url + "/trunc"]
    mirrors.append(server.url + "/corrupt")
    server.route(f"/err/{IMAGES}", b"", "500")
    spec = tiny_spec(mirrors, system_dir=str(system))

    with pytest.raises(DownloadError) as info:
        download_dataset(spec, tmp_path / "out", mirror=str(user), **{**FAST, "retries": 1})
    lines = str(info.value).splitlines()

    assert lines[0] == f"could not obtain {IMAGES}; sources tried:"
    assert lines[1].startswith(f"  - http://mirror.invalid/x/{IMAGES}: DNS resolution failed")
    assert lines[2] == f"  - {server.url}/nope/{IMAGES}: HTTP 404 Not Found"
    assert lines[3] == f"  - {server.url}/err/{IMAGES}: HTTP 500 Internal Server Error (gave up after 2 attempts)"
    assert lines[4].startswith(f"  - {refused}/{IMAGES}: ") and "refused" in lines[4]
    assert lines[5].startswith(f"  - {server.url}/trunc/{IMAGES}: connection closed after ")
    assert lines[6].startswith(f"  - {server.url}/corrupt/{IMAGES}: corrupt gzip data")
    assert lines[7] == f"  - {system / IMAGES}: not found"
    assert lines[8] == f"  - {user / IMAGES}: bad IDX magic 0x08030000 (is it an IDX file?)"
    assert lines[9] == "hint: set data.mirror=<url or dir> or AELAB_MIRROR"
    assert len(lines) == 10
    assert dns_calls == ["mirror.invalid"]  # DNS failures are not retried
    assert len(server.requests_for(f"/trunc/{IMAGES}")) == 2  # short bodies are
    assert leftovers(tmp_path / "out") == []


def test_manifest_hash_identifies_data_not_source(server, tmp_path):
    base = serve_all(server)
    system = tmp_path / "system"
    system.mkdir()
    for name, body in tiny_archives(mtime=99).items():  # different archive bytes, same payloads
        (system / name).write_bytes(body)
    via_http = download_dataset(tiny_spec([base]), tmp_path / "a", **FAST)
    via_dir = download_dataset(tiny_spec([], system_dir=str(system)), tmp_path / "b", **FAST)

    assert via_http["files"][IMAGES]["sha256"] != via_dir["files"][IMAGES]["sha256"]
    digest = manifest_hash(via_http)
    assert digest == manifest_hash(via_dir) == manifest_hash(json.loads(json.dumps(via_http)))
    assert len(digest) == 64 and int(digest, 16) >= 0
    changed = json.loads(json.dumps(via_http))
    changed["files"][IMAGES]["decoded_sha256"] = "0" * 64
    assert manifest_hash(changed) != digest
    assert manifest_hash({**via_http, "dataset": "other"}) != digest


def test_get_spec_and_unknown_name():
    assert get_spec("fashion_mnist") is DATASETS["fashion_mnist"]
    known = r"^unknown dataset 'foo'; known datasets: cifar10, fashion_mnist, kmnist, mnist$"
    with pytest.raises(UnknownDatasetError, match=known):
        get_spec("foo")
    with pytest.raises(ValueError):
        get_spec("")


@pytest.mark.parametrize("name", sorted(n for n, spec in DATASETS.items() if spec.channels == 1))
def test_catalog_entries_are_well_formed(name):  # the IDX sets; cifar10 is checked in test_colorize.py
    spec = DATASETS[name]
    assert spec.name == name and len(spec.classes) == 10 and spec.mirrors
    assert [f.shape for f in spec.files] == [(60000, 28, 28), (60000,), (10000, 28, 28), (10000,)]
    for f in spec.files:
        assert f.decoded_sha256 or f.archive_md5
        assert f.archive_md5 is None or (len(f.archive_md5) == 32 and int(f.archive_md5, 16) >= 0)
        assert f.decoded_sha256 is None or (len(f.decoded_sha256) == 64 and int(f.decoded_sha256, 16) >= 0)


@pytest.mark.skipif(
    not Path(DATASETS["fashion_mnist"].system_dir).is_dir(), reason="Debian dataset-fashion-mnist not installed"
)
def test_fashion_mnist_system_copy_verifies(tmp_path):
    """The catalog's decoded sha256s match the Debian system copy (local files only; mirrors removed)."""
    spec = dataclasses.replace(DATASETS["fashion_mnist"], mirrors=())
    manifest = download_dataset(spec, tmp_path, progress=False)
    sources = {e["source"] for e in manifest["files"].values()}
    assert sources == {str(Path(spec.system_dir) / f.name) for f in spec.files}
    labels = read_idx(tmp_path / "train-labels-idx1-ubyte.gz")
    assert labels.shape == (60000,) and np.bincount(labels).tolist() == [6000] * 10
