"""Reading and writing IDX files (the MNIST family's format), gzipped or raw."""

from __future__ import annotations

import gzip as _gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

GZIP_MAGIC = b"\x1f\x8b"
UBYTE = 0x08


class IdxFormatError(ValueError):
    """An IDX payload (or its gzip wrapper) is malformed."""


def decompress(raw: bytes, source: str = "<bytes>") -> bytes:
    """Gunzip ``raw`` if it starts with the gzip magic, else return it unchanged."""
    if not raw.startswith(GZIP_MAGIC):
        return raw
    try:
        return _gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise IdxFormatError(f"{source}: corrupt gzip data ({exc})") from exc


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode an uncompressed unsigned-byte IDX payload into a (writable) uint8 array."""
    if len(data) < 4:
        raise IdxFormatError(f"{source}: too short for an IDX header ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0:
        magic = struct.unpack(">I", data[:4])[0]
        raise IdxFormatError(f"{source}: bad IDX magic 0x{magic:08x} (is it an IDX file?)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != UBYTE:
        raise IdxFormatError(
            f"{source}: unsupported IDX data type 0x{dtype_code:02x} (only 0x08 unsigned byte is supported)"
        )
    if ndim == 0:
        raise IdxFormatError(f"{source}: IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise IdxFormatError(
            f"{source}: truncated IDX header: expected {header_len} bytes for {ndim} dims, got {len(data)}"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    expected, got = math.prod(dims), len(data) - header_len
    if got < expected:
        raise IdxFormatError(f"{source}: truncated payload for dims {dims}: expected {expected} bytes, got {got}")
    if got > expected:
        raise IdxFormatError(f"{source}: {got - expected} trailing bytes after payload for dims {dims}")
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims).copy()


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or raw); errors name the path."""
    raw = Path(path).read_bytes()
    return parse_idx(decompress(raw, str(path)), str(path))


def encode_idx(array: np.ndarray) -> bytes:
    """Encode a uint8 array as an uncompressed IDX payload."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"IDX writer supports uint8 arrays only, got {array.dtype}")
    if array.ndim == 0:
        raise ValueError("IDX needs at least one dimension")
    header = bytes([0, 0, UBYTE, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array).tobytes()


def write_idx(path: str | os.PathLike, array: np.ndarray, gzip: bool = True) -> None:
    """Write a uint8 array as IDX, gzipped (deterministically, mtime=0) by default."""
    payload = encode_idx(array)
    Path(path).write_bytes(_gzip.compress(payload, mtime=0) if gzip else payload)
