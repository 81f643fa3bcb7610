"""The safetensors file format, read and written with torch alone: weights that any framework can load and that
cannot run code.

    8 bytes    N, the header's length (unsigned, little-endian)
    N bytes    a JSON object: {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...} and an
               optional "__metadata__": {str: str}; padded with spaces
    the rest   the tensors' bytes, little-endian, row-major; offsets count from the first byte after the header

torch writes no safetensors and the `safetensors` package would be a dependency for ~100 lines, so this is our own.
Reading is strict, as the reference reader is: every byte after the header belongs to exactly one tensor (no
overlaps, no holes, nothing past the end), each tensor's byte count is its shape times its dtype's size, and the dtype
is one we know. A file that breaks a rule is a CheckpointError with one line; nothing in it is ever executed.
"""
import json
import math
import os
import struct
import sys

import torch

from trm.atomic import AtomicFile
from trm.checkpoint import CheckpointError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER = 100_000_000  # the reference reader's limit too: a length beyond it is damage, not a model

if sys.byteorder != "little":  # the bytes are copied as they are in memory
    raise ImportError("trm.safetensors reads and writes little-endian machines' tensors only")


def save_file(tensors, path, metadata=None):
    """Write {name: tensor} (and {str: str} metadata) to `path`, whole or not at all (trm/atomic.py).

    Tensors go largest element first, so every tensor's bytes start at a multiple of its element size (the header is
    padded to 8): readers that map the file can view them in place. Tensors that share memory (tied weights) are
    written once per name."""
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header, offset = {}, 0
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
    for name in order:
        t = tensors[name]
        if t.dtype not in NAMES:
            raise ValueError(f"{name}: dtype {t.dtype} has no safetensors name")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    with AtomicFile(path) as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in order:
            t = tensors[name].detach().cpu().contiguous()
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def read_header(path):
    """(tensor entries {name: (dtype, shape, begin, end)}, metadata, where the tensors' bytes start) after checking
    every rule of the format; CheckpointError on the first one broken."""
    def bad(reason):
        return CheckpointError(f"{path} is not a valid safetensors file: {reason}")

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                raise bad(f"its header claims {n:,} bytes (at most {MAX_HEADER:,} allowed)")
            if n > size - 8:
                raise bad(f"its header claims {n:,} bytes, more than the {size - 8:,} that follow its length")
            text = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({e.strerror or e})") from None

    def unique(pairs):
        names = [k for k, _ in pairs]
        if len(set(names)) != len(names):
            raise bad(f"the name {next(k for k in names if names.count(k) > 1)!r} appears twice in the header")
        return dict(pairs)

    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=unique)
    except (ValueError, RecursionError) as e:  # (UnicodeDecodeError is a ValueError)
        raise bad(f"its header is not JSON ({str(e)[:80]})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    metadata = header.pop("__metadata__", None)  # null or a map; not `or {}`, which took [], 0 and "" for none
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ must map strings to strings")

    data_bytes, entries = size - 8 - n, {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name!r} needs exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:  # (a list or dict is no key: `in` raised TypeError)
            raise bad(f"tensor {name!r} has the unknown dtype {dtype!r}")
        if not whole_numbers(shape) or not whole_numbers(offsets) or len(offsets) != 2:
            raise bad(f"tensor {name!r}: shape and data_offsets must be lists of whole numbers >= 0")
        begin, end = offsets
        if not begin <= end <= data_bytes:
            raise bad(f"tensor {name!r}: data_offsets [{begin}, {end}] are outside the {data_bytes:,} data bytes")
        if math.prod(max(d, 1) for d in shape) * DTYPES[dtype].itemsize > 2 ** 62:  # more than any memory holds
            raise bad(f"tensor {name!r}: the shape {shape} is too large for any tensor")
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != expected:
            raise bad(f"tensor {name!r}: {end - begin:,} bytes for shape {shape} of {dtype} ({expected:,} expected)")
        entries[name] = (DTYPES[dtype], shape, begin, end)

    at = 0  # the tensors, in file order, must tile the data bytes exactly
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: (item[1][2], item[1][3])):
        if begin < at:
            raise bad(f"tensor {name!r} overlaps the bytes of another tensor (offset {begin:,})")
        if begin > at:
            raise bad(f"bytes {at:,}-{begin:,} belong to no tensor")
        at = end
    if at != data_bytes:
        raise bad(f"bytes {at:,}-{data_bytes:,} at the end belong to no tensor")
    return entries, metadata, 8 + n


def whole_numbers(x):
    return isinstance(x, list) and all(type(v) is int and v >= 0 for v in x)  # type(): True is an int, not a size


def load_file(path):
    """({name: tensor} on the CPU, metadata {str: str}) from a safetensors file; CheckpointError if it is malformed."""
    entries, metadata, start = read_header(path)
    tensors = {}
    with open(path, "rb") as f:
        for name, (dtype, shape, begin, end) in entries.items():
            if begin == end:
                tensors[name] = torch.empty(shape, dtype=dtype)
                continue
            buffer = bytearray(end - begin)  # its own buffer: writable, and aligned whatever the offset
            f.seek(start + begin)
            if f.readinto(buffer) != len(buffer):
                raise CheckpointError(f"{path} changed while it was read")
            tensors[name] = torch.frombuffer(buffer, dtype=dtype).reshape(shape)
    return tensors, metadata
