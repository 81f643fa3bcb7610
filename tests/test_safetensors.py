"""trm/safetensors.py: what it writes is the format (bytes checked by hand and by the reference reader), what it reads
comes back bit for bit, and every malformed header is one CheckpointError line, never a crash or a pickle."""
import json
import struct

import pytest
import torch

from trm.checkpoint import CheckpointError
from trm.safetensors import DTYPES, load_file, save_file


def assorted():
    """Every dtype we name, odd shapes (a scalar, an empty tensor, a transposed view), values that are not zero."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, dtype in DTYPES.items():
        if dtype.is_floating_point:
            t = torch.randn(3, 5, generator=g).to(dtype)
        elif dtype == torch.bool:
            t = torch.rand(3, 5, generator=g) > 0.5
        else:
            t = torch.randint(0, 100, (3, 5), generator=g).to(dtype)
        out[f"t.{name}"] = t
    out["scalar"] = torch.tensor(2.5)
    out["empty"] = torch.zeros(0, 4)
    out["transposed"] = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    return out


def same(a, b):
    """Equal names, dtypes, shapes and bytes (bytes: -0.0 and NaN payloads included)."""
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        if a[k].numel():
            assert torch.equal(a[k].contiguous().reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k


def test_round_trip_every_dtype_and_shape(tmp_path):
    tensors = assorted()
    save_file(tensors, tmp_path / "m.safetensors", {"format": "pt", "note": "日本語"})
    loaded, metadata = load_file(tmp_path / "m.safetensors")
    same(tensors, loaded)
    assert metadata == {"format": "pt", "note": "日本語"}
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary file left


def test_the_bytes_are_the_format(tmp_path):
    """Read back by hand: u64 length, a space-padded JSON header, then the tensors' little-endian bytes, each at an
    offset that is a multiple of its element size."""
    a = torch.tensor([1.0, -2.0], dtype=torch.float32)
    b = torch.tensor([[7, 8, 9]], dtype=torch.int64)
    c = torch.tensor([1, 2, 3], dtype=torch.uint8)
    save_file({"a": a, "b": b, "c": c}, tmp_path / "m.safetensors")
    raw = (tmp_path / "m.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0 and raw[8:8 + n].decode().rstrip(" ").endswith("}")  # padded with spaces only
    header = json.loads(raw[8:8 + n])
    assert header["a"] == {"dtype": "F32", "shape": [2], "data_offsets": [header["a"]["data_offsets"][0],
                                                                           header["a"]["data_offsets"][0] + 8]}
    assert header["b"]["dtype"] == "I64" and header["b"]["shape"] == [1, 3] and header["c"]["dtype"] == "U8"
    data = raw[8 + n:]
    for name, t, fmt in (("a", a, "<2f"), ("b", b, "<3q"), ("c", c, "<3B")):
        begin, end = header[name]["data_offsets"]
        assert begin % t.element_size() == 0
        assert struct.unpack(fmt, data[begin:end]) == tuple(t.reshape(-1).tolist())
    assert max(e for _, e in (h["data_offsets"] for h in header.values())) == len(data)


def write_raw(path, header, data=b"", length=None):
    text = json.dumps(header).encode() if isinstance(header, dict) else header
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


def f32(name, begin, end, shape=None):
    return {name: {"dtype": "F32", "shape": shape or [(end - begin) // 4], "data_offsets": [begin, end]}}


@pytest.mark.parametrize("make, words", [
    (lambda p: p.write_bytes(b"\x01\x02"), ["shorter than the 8-byte header length"]),
    (lambda p: write_raw(p, b"{}", length=1 << 40), ["at most 100,000,000 allowed"]),
    (lambda p: write_raw(p, b"{}", length=50), ["more than the 2 that follow"]),
    (lambda p: write_raw(p, b"\x80\x03}q\x00."), ["not JSON"]),  # a pickle's first bytes
    (lambda p: write_raw(p, b"[1, 2]"), ["not a JSON object"]),
    (lambda p: write_raw(p, {**f32("a", 0, 8), "__metadata__": {"k": 1}}, bytes(8)), ["__metadata__"]),
    (lambda p: write_raw(p, {"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
     ["unknown dtype 'F33'"]),
    # a dtype that is no string was looked up in the table as it was: a bare TypeError (unhashable type: 'list')
    (lambda p: write_raw(p, {"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
     ["unknown dtype ['F32']"]),
    (lambda p: write_raw(p, {**f32("a", 0, 8), "__metadata__": []}, bytes(8)), ["__metadata__"]),  # (was {})
    (lambda p: write_raw(p, {"a": {"dtype": "F32", "shape": [2]}}, bytes(8)), ["exactly dtype, shape"]),
    (lambda p: write_raw(p, {"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8)),
     ["whole numbers"]),
    (lambda p: write_raw(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8.0]}}, bytes(8)),
     ["whole numbers"]),
    (lambda p: write_raw(p, f32("a", 0, 16), bytes(8)), ["outside the 8 data bytes"]),
    (lambda p: write_raw(p, f32("a", 0, 8, shape=[3]), bytes(8)), ["12 expected"]),
    # no bytes (one dimension is 0), but a shape no tensor can have: torch.empty overflowed with a bare RuntimeError
    (lambda p: write_raw(p, f32("a", 0, 0, shape=[2 ** 62, 2 ** 62, 0])), ["too large for any tensor"]),
    (lambda p: write_raw(p, {**f32("a", 0, 8), **f32("b", 4, 12)}, bytes(12)), ["overlaps"]),
    (lambda p: write_raw(p, {**f32("a", 0, 4), **f32("b", 8, 12)}, bytes(12)), ["bytes 4-8 belong to no tensor"]),
    (lambda p: write_raw(p, f32("a", 0, 8), bytes(12)), ["bytes 8-12 at the end"]),
    (lambda p: write_raw(p, b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                            b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', bytes(8)),
     ["'a' appears twice"]),
])
def test_malformed_files_are_one_line_errors(tmp_path, make, words):
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(CheckpointError) as e:
        load_file(path)
    message = str(e.value)
    assert "\n" not in message and str(path) in message and "not a valid safetensors file" in message
    for w in words:
        assert w in message, message


def test_a_valid_hand_written_file_loads(tmp_path):
    """The rules above are not so strict that a file written by another writer (offsets in any header order, no
    padding) is refused: the malformed cases fail for their own reason."""
    data = struct.pack("<2f", 1.5, -3.0) + struct.pack("<h", 7)
    header = {"b": {"dtype": "I16", "shape": [], "data_offsets": [8, 10]}, **f32("a", 0, 8)}
    tensors, metadata = load_file(write_raw(tmp_path / "ok.safetensors", header, data))
    assert tensors["a"].tolist() == [1.5, -3.0] and tensors["b"].item() == 7 and tensors["b"].shape == ()
    assert metadata == {}


# ---- the reference implementation agrees (when it is installed: requirements-test.txt) ---------------------------

def test_the_safetensors_package_reads_our_file_and_we_read_its(tmp_path):
    reference = pytest.importorskip("safetensors.torch", reason="the safetensors package is not installed "
                                                                "(pip install -r requirements-test.txt)")
    from safetensors import safe_open

    tensors = {k: v for k, v in assorted().items()}
    save_file(tensors, tmp_path / "ours.safetensors", {"format": "pt", "weights": "ema"})
    same(tensors, reference.load_file(tmp_path / "ours.safetensors"))
    with safe_open(tmp_path / "ours.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt", "weights": "ema"}

    reference.save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "theirs.safetensors",
                        {"format": "pt"})
    loaded, metadata = load_file(tmp_path / "theirs.safetensors")
    same(tensors, loaded)
    assert metadata == {"format": "pt"}
