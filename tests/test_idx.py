import gzip
import struct

import numpy as np
import pytest

from aelab.data.idx import IdxFormatError, decompress, encode_idx, parse_idx, read_idx, write_idx


def _header(dtype: int, *dims: int) -> bytes:
    return bytes([0, 0, dtype, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


@pytest.mark.parametrize("gz", [True, False])
def test_write_read_roundtrip(tmp_path, gz):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "a.idx"
    write_idx(path, array, gzip=gz)
    raw = path.read_bytes()
    assert raw.startswith(b"\x1f\x8b") == gz
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, array)
    out[0, 0, 0] = 7  # returned arrays are writable copies


def test_encode_layout_is_big_endian_header_then_row_major_bytes():
    array = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.uint8)
    assert encode_idx(array) == b"\x00\x00\x08\x02" + b"\x00\x00\x00\x02\x00\x00\x00\x03" + bytes([1, 2, 3, 4, 5, 6])


def test_gzip_write_is_deterministic(tmp_path):
    array = np.ones((5,), dtype=np.uint8)
    write_idx(tmp_path / "a.gz", array)
    write_idx(tmp_path / "b.gz", array)
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()


def test_write_rejects_non_uint8(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.int32))


def test_decompress_passes_raw_through_and_gunzips():
    payload = _header(0x08, 2) + b"\x01\x02"
    assert decompress(payload) == payload
    assert decompress(gzip.compress(payload)) == payload


def test_decompress_corrupt_gzip_names_source():
    broken = gzip.compress(b"x" * 1000)[:-20]
    with pytest.raises(IdxFormatError, match=r"mirror/x\.gz: corrupt gzip"):
        decompress(broken, "mirror/x.gz")


def test_bad_magic():
    with pytest.raises(IdxFormatError, match=r"src: bad IDX magic 0x01000801"):
        parse_idx(b"\x01\x00\x08\x01" + b"\x00" * 8, "src")


def test_unsupported_dtype():
    with pytest.raises(IdxFormatError, match=r"unsupported IDX data type 0x0d"):
        parse_idx(_header(0x0D, 1) + b"\x00" * 4, "src")


def test_truncated_payload_reports_expected_and_actual():
    data = _header(0x08, 3, 4) + b"\x00" * 7
    with pytest.raises(IdxFormatError, match=r"f\.idx: truncated payload for dims \(3, 4\): expected 12 bytes, got 7"):
        parse_idx(data, "f.idx")


def test_trailing_bytes_rejected():
    with pytest.raises(IdxFormatError, match=r"2 trailing bytes"):
        parse_idx(_header(0x08, 2, 2) + b"\x00" * 6, "src")


def test_truncated_header_and_too_short():
    with pytest.raises(IdxFormatError, match=r"truncated IDX header: expected 16 bytes for 3 dims, got 10"):
        parse_idx(_header(0x08, 1, 1, 1)[:10], "src")
    with pytest.raises(IdxFormatError, match=r"too short"):
        parse_idx(b"\x00\x00", "src")
    with pytest.raises(IdxFormatError, match=r"0 dimensions"):
        parse_idx(b"\x00\x00\x08\x00", "src")


def test_parse_error_is_a_value_error_and_read_idx_names_path(tmp_path):
    path = tmp_path / "bad-images.gz"
    path.write_bytes(gzip.compress(_header(0x08, 10, 28, 28) + b"\x00" * 100))
    with pytest.raises(ValueError, match=str(path).replace(".", r"\.") + ": truncated payload"):
        read_idx(path)
