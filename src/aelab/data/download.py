"""Fetch a catalog dataset from its mirrors, a system copy or a user mirror, verified and atomically stored."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import logging
import os
import socket
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from aelab.data.catalog import DatasetSpec, IdxFile, TarArchive
from aelab.data.idx import IdxFormatError, decompress, parse_idx
from aelab.paths import atomic_path, write_json

log = logging.getLogger("aelab.download")

HINT = "set data.mirror=<url or dir> or AELAB_MIRROR"
_CHUNK = 1 << 16


class DownloadError(RuntimeError):
    """No source could provide a verified copy of a file."""


class ChecksumError(ValueError):
    """Fetched content does not match the catalog's digest."""


class ArchiveFormatError(ValueError):
    """A fetched archive is not a tar stream or lacks a member the catalog expects."""


class _SourceError(Exception):
    """One source failed; the message is '<source>: <reason>'."""


def download_dataset(
    spec: DatasetSpec,
    out_dir: Path,
    mirror: str | None = None,
    *,
    retries: int = 3,
    backoff: float = 0.5,
    timeout: float = 30.0,
    progress: bool = True,
) -> dict:
    """Download and verify every file of ``spec`` into ``out_dir``; write and return the manifest.

    Sources per file, in order: ``spec.mirrors``, ``spec.system_dir``, then the user ``mirror``
    (URL base or directory; defaults to ``$AELAB_MIRROR``). An already stored file that verifies
    is kept (source "cached"); one that the last manifest recorded byte for byte is not decoded again.
    HTTP sources get ``retries`` retries after the first attempt.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if mirror is None:
        mirror = os.environ.get("AELAB_MIRROR") or None
    http_opts = dict(retries=retries, backoff=backoff, timeout=timeout, progress=progress)
    recorded = _recorded_files(out_dir / "manifest.json", spec.name)
    files = {f.name: _obtain(f, _sources(spec, f, mirror), out_dir, recorded.get(f.name, {}), http_opts)
             for f in spec.files}
    manifest = {"dataset": spec.name, "files": files}
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def manifest_hash(manifest: dict) -> str:
    """sha256 identifying the data in a manifest (dataset, decoded digests, shapes), not where it came from."""
    ident = {
        "dataset": manifest["dataset"],
        "files": {
            name: {"decoded_sha256": entry["decoded_sha256"], "shape": list(entry["shape"])}
            for name, entry in manifest["files"].items()
        },
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _sources(spec: DatasetSpec, f: IdxFile | TarArchive, mirror: str | None) -> list[str]:
    sources = [base.rstrip("/") + "/" + f.name for base in spec.mirrors]
    if spec.system_dir:
        sources.append(str(Path(spec.system_dir) / f.name))
    if mirror:
        user = mirror.rstrip("/") + "/" + f.name if _is_url(mirror) else str(Path(mirror).expanduser() / f.name)
        sources.append(user)
    return sources


def _recorded_files(manifest: Path, dataset: str) -> dict[str, dict]:
    """The file entries of the manifest an earlier run wrote for ``dataset`` ({} if none is readable)."""
    try:
        earlier = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return {}
    return earlier.get("files", {}) if isinstance(earlier, dict) and earlier.get("dataset") == dataset else {}


def _obtain(f: IdxFile | TarArchive, sources: list[str], out_dir: Path, recorded: dict, http_opts: dict) -> dict:
    final = out_dir / f.name
    if final.exists():
        try:
            return _stored_entry(f, final, recorded)
        except ValueError as exc:
            log.warning("%s: stored copy is invalid, fetching again: %s", f.name, exc)
            final.unlink()
    part = out_dir / (f.name + ".part")
    failures = []
    for source in sources:
        try:
            raw = _http_get(source, part, f.name, **http_opts) if _is_url(source) else _read_local(source)
            decoded_sha256 = _verify(f, raw, source)
        except (_SourceError, ValueError) as exc:
            part.unlink(missing_ok=True)
            failures.append(str(exc))
            log.warning("%s: source failed: %s", f.name, exc)
            continue
        if _is_url(source):
            os.replace(part, final)
        else:
            with atomic_path(final) as tmp:
                tmp.write_bytes(raw)
        log.info("%s: using %s", f.name, source)
        return _entry(source, raw, decoded_sha256, f)
    tried = "\n".join(f"  - {line}" for line in failures) or "  (no sources configured)"
    raise DownloadError(f"could not obtain {f.name}; sources tried:\n{tried}\nhint: {HINT}")


def _stored_entry(f: IdxFile | TarArchive, path: Path, recorded: dict) -> dict:
    """The entry of the already stored ``path``, verified against ``f``; ValueError if it fails.

    When ``recorded`` (its entry in the last manifest) matches these very bytes (size, sha256, shape), they were
    decoded and checked when that manifest was written: only the recorded digest is checked against the catalog,
    without decompressing again. A changed byte changes the sha256 and gets the full check.
    """
    raw = path.read_bytes()
    entry = _entry("cached", raw, recorded.get("decoded_sha256"), f)
    if {**recorded, "source": "cached"} == entry:
        _check_digest(f, raw, entry["decoded_sha256"], str(path))
        return entry
    return _entry("cached", raw, _verify(f, raw, str(path)), f)


def _entry(source: str, raw: bytes, decoded_sha256: str, f: IdxFile | TarArchive) -> dict:
    return {
        "source": source,
        "bytes": len(raw),
        "sha256": hashlib.sha256(raw).hexdigest(),
        "decoded_sha256": decoded_sha256,
        "shape": list(f.shape),
    }


def _verify(f: IdxFile | TarArchive, raw: bytes, source: str) -> str:
    """Check ``raw`` against ``f``; return the decoded payload's sha256."""
    decoded = decompress(raw, source)
    if isinstance(f, TarArchive):
        _check_tar(f, decoded, source)
    elif (shape := parse_idx(decoded, source).shape) != tuple(f.shape):
        raise IdxFormatError(f"{source}: IDX shape {shape} does not match expected {tuple(f.shape)}")
    return _check_digest(f, raw, hashlib.sha256(decoded).hexdigest(), source)


def _check_digest(f: IdxFile | TarArchive, raw: bytes, decoded_sha256: str, source: str) -> str:
    """Check the catalog's digest of ``f`` (decoded sha256, else archive md5 of ``raw``); return ``decoded_sha256``."""
    if f.decoded_sha256:
        kind, expected, actual = "decoded sha256", f.decoded_sha256, decoded_sha256
    elif f.archive_md5:
        kind, expected, actual = "archive md5", f.archive_md5, hashlib.md5(raw).hexdigest()
    else:
        return decoded_sha256
    if actual != expected:
        raise ChecksumError(f"{source}: checksum mismatch for {f.name}: expected {kind} {expected}, got {actual}")
    return decoded_sha256


def _check_tar(f: TarArchive, data: bytes, source: str) -> None:
    """``data`` must be a tar stream holding every member ``f`` lists."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            names = set(tar.getnames())
    except tarfile.TarError as exc:
        raise ArchiveFormatError(f"{source}: not a tar archive ({exc})") from exc
    if missing := [m for m in f.members if m not in names]:
        raise ArchiveFormatError(f"{source}: tar archive lacks {', '.join(missing)}")


def _read_local(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise _SourceError(f"{path}: not found") from None
    except OSError as exc:
        raise _SourceError(f"{path}: {exc.strerror or exc}") from exc


def _http_get(
    url: str, part: Path, name: str, *, retries: int, backoff: float, timeout: float, progress: bool
) -> bytes:
    """Fetch ``url`` into ``part`` (resuming with Range on retries) and return its bytes."""
    part.unlink(missing_ok=True)
    attempt = 0
    while True:
        try:
            _http_attempt(url, part, name, timeout, progress)
            return part.read_bytes()
        except (OSError, http.client.HTTPException) as exc:
            reason = _describe(exc)
            if not _is_transient(exc):
                raise _SourceError(f"{url}: {reason}") from exc
            if attempt >= retries:
                raise _SourceError(f"{url}: {reason} (gave up after {attempt + 1} attempts)") from exc
            delay = backoff * 2**attempt
            log.warning("%s: attempt %d failed (%s); retrying in %.2fs", url, attempt + 1, reason, delay)
            time.sleep(delay)
            attempt += 1


def _http_attempt(url: str, part: Path, name: str, timeout: float, progress: bool) -> None:
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "aelab-downloader"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
        if resp.status == 206:
            if not resp.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
                part.unlink()
                raise ConnectionError(f"server answered Range {offset}- with {resp.headers.get('Content-Range')!r}")
        else:
            offset = 0  # full body: restart from scratch
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        with open(part, "ab" if offset else "wb") as fh, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=name, disable=not progress
        ) as bar:
            while chunk := resp.read(_CHUNK):
                fh.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size < total:
        raise ConnectionError(f"connection closed after {size} of {total} bytes")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        if isinstance(exc.reason, socket.gaierror):
            return f"DNS resolution failed ({exc.reason})"
        return str(exc.reason)
    return str(exc) or type(exc).__name__


def _is_transient(exc: BaseException) -> bool:
    """5xx, resets, refusals, timeouts and short bodies are retried; 4xx and DNS failures are not."""
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500
    if isinstance(exc, urllib.error.URLError):
        exc = exc.reason
    return isinstance(exc, (OSError, http.client.HTTPException)) and not isinstance(exc, socket.gaierror)

