"""Test helpers: tiny IDX datasets and a scriptable loopback HTTP server (127.0.0.1 only)."""

from __future__ import annotations

import gzip
import hashlib
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from aelab.data.catalog import DatasetSpec, IdxFile
from aelab.data.idx import encode_idx

TINY_SHAPES = {
    "train-images-idx3-ubyte.gz": (20, 28, 28),
    "train-labels-idx1-ubyte.gz": (20,),
    "t10k-images-idx3-ubyte.gz": (10, 28, 28),
    "t10k-labels-idx1-ubyte.gz": (10,),
}


def tiny_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic uint8 arrays keyed by file name (labels in 0..9)."""
    rng = np.random.default_rng(seed)
    return {
        name: rng.integers(0, 10 if len(shape) == 1 else 256, size=shape, dtype=np.uint8)
        for name, shape in TINY_SHAPES.items()
    }


def tiny_payloads(seed: int = 0) -> dict[str, bytes]:
    """Uncompressed IDX payloads keyed by file name."""
    return {name: encode_idx(array) for name, array in tiny_arrays(seed).items()}


def tiny_archives(seed: int = 0, mtime: int = 0) -> dict[str, bytes]:
    """Gzipped IDX archives keyed by file name (``mtime`` changes the archive bytes, not the payload)."""
    return {name: gzip.compress(payload, mtime=mtime) for name, payload in tiny_payloads(seed).items()}


def tiny_spec(mirrors=(), system_dir=None, *, use_md5: bool = False, name: str = "tiny") -> DatasetSpec:
    """A DatasetSpec for the seed-0 tiny dataset, verified by decoded sha256 (or archive md5 if ``use_md5``)."""
    payloads, archives = tiny_payloads(), tiny_archives()
    files = tuple(
        IdxFile(
            fname,
            shape,
            decoded_sha256=None if use_md5 else hashlib.sha256(payloads[fname]).hexdigest(),
            archive_md5=hashlib.md5(archives[fname]).hexdigest() if use_md5 else None,
        )
        for fname, shape in TINY_SHAPES.items()
    )
    return DatasetSpec(name, tuple(mirrors), system_dir, files, tuple(str(i) for i in range(10)))


class ScriptedServer(ThreadingHTTPServer):
    """HTTP server on 127.0.0.1:<free port> whose behaviour per path is scripted.

    ``route(path, body, *modes)``: each request to ``path`` consumes the next mode; the last mode repeats.
    Modes: "ok" (Range -> 206), "no-range" (ignores Range, always 200), "404", "500",
    "truncate" (advertises the full Content-Length, sends half of the requested bytes, closes),
    "stall" (sleeps 1 s before answering; for client timeouts).
    Every request is recorded in ``requests`` as (path, headers dict, status sent).
    """

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes: dict[str, tuple[bytes, list[str]]] = {}
        self.requests: list[tuple[str, dict[str, str], int]] = []
        self.lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def route(self, path: str, body: bytes, *modes: str) -> None:
        self.routes[path] = (body, list(modes or ("ok",)))

    def requests_for(self, path: str) -> list[tuple[str, dict[str, str], int]]:
        return [r for r in self.requests if r[0] == path]

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: ScriptedServer

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        with self.server.lock:
            body, modes = self.server.routes.get(self.path, (b"", ["404"]))
            mode = modes.pop(0) if len(modes) > 1 else modes[0]
        start = 0
        rng = self.headers.get("Range")
        if mode in ("ok", "truncate") and rng and rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[len("bytes=") : -1])
        status = {"404": 404, "500": 500}.get(mode, 206 if start else 200)
        with self.server.lock:
            self.server.requests.append((self.path, dict(self.headers), status))
        try:
            if mode == "stall":
                time.sleep(1.0)
            if status >= 400:
                self.send_error(status)
                return
            chunk = body[start:]
            self.send_response(status)
            self.send_header("Content-Length", str(len(chunk)))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.end_headers()
            self.wfile.write(chunk[: len(chunk) // 2] if mode == "truncate" else chunk)
            self.wfile.flush()
            self.close_connection = True
        except OSError:  # client gave up (e.g. timed out) while we were answering
            pass
