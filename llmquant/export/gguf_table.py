"""A GGUF file's tensor table, read without decoding its metadata.

``gguf.GGUFReader`` decodes every metadata value into numpy views (a
tokenizer's 50k tokens and merges become hundreds of thousands of small
arrays), which costs seconds per file. Checking a file we just wrote needs
only the tensor table, the alignment and where the data starts, so this
reader steps over the metadata by its lengths. It follows the GGUF v2/v3
layout (gguf-py's constants give the value types); tests hold it equal to
``gguf.GGUFReader`` on written files.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

_VT = gguf.GGUFValueType
# struct format of each fixed-size value type
_FIXED = {_VT.UINT8: "<B", _VT.INT8: "<b", _VT.BOOL: "<?", _VT.UINT16: "<H", _VT.INT16: "<h", _VT.UINT32: "<I",
          _VT.INT32: "<i", _VT.FLOAT32: "<f", _VT.UINT64: "<Q", _VT.INT64: "<q", _VT.FLOAT64: "<d"}
_SIZE = {vt: struct.calcsize(fmt) for vt, fmt in _FIXED.items()}
ALIGNMENT_KEY = "general.alignment"


class GGUFTableError(ValueError):
    """The bytes are not a well-formed GGUF header and tensor table."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]  # numpy order (rows last), as gguf.GGUFReader reports ``shape`` reversed
    type: gguf.GGMLQuantizationType
    offset: int  # from the start of the data section
    n_bytes: int


@dataclass(frozen=True)
class TensorTable:
    version: int
    alignment: int
    data_offset: int  # absolute byte offset of the data section
    tensors: list[TensorEntry]


class _Cursor:
    """Bounds-checked little-endian reads over a byte buffer."""

    def __init__(self, buf) -> None:
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise GGUFTableError(f"truncated at byte {self.pos} (wanted {n} more)")
        view = memoryview(self.buf)[self.pos:end]
        self.pos = end
        return view

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        return struct.unpack_from(fmt, self.take(size))

    def u32(self) -> int:
        return self.unpack("<I")[0]

    def u64(self) -> int:
        return self.unpack("<Q")[0]

    def string(self) -> str:
        return bytes(self.take(self.u64())).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        self.take(self.u64())

    def skip_strings(self, count: int) -> None:
        buf, pos, end = self.buf, self.pos, len(self.buf)
        for _ in range(count):
            if pos + 8 > end:
                break
            pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
        else:
            if pos <= end:
                self.pos = pos
                return
        raise GGUFTableError(f"truncated inside a string array starting at byte {self.pos}")

    def value(self, vtype: int, keep: bool):
        """Read (keep) or step over one metadata value of ``vtype``."""
        if vtype in _FIXED:
            raw = self.take(_SIZE[vtype])
            return struct.unpack(_FIXED[vtype], raw)[0] if keep else None
        if vtype == _VT.STRING:
            return self.string() if keep else self.skip_string()
        if vtype == _VT.ARRAY:
            item, count = self.u32(), self.u64()
            if item in _FIXED:
                self.take(_SIZE[item] * count)
            elif item == _VT.STRING:  # a tokenizer's vocabulary: the one long loop, kept tight
                self.skip_strings(count)
            else:
                for _ in range(count):
                    self.value(item, keep=False)
            return None
        raise GGUFTableError(f"unknown metadata value type {vtype} at byte {self.pos}")


def read_tensor_table(path: Path | str) -> TensorTable:
    """Header, alignment and tensor table of a GGUF file; raises GGUFTableError if malformed."""
    with open(path, "rb") as fh:
        try:
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            raise GGUFTableError("empty file") from None
    try:
        return _parse(buf)
    finally:
        buf.close()


def _parse(buf) -> TensorTable:
    cur = _Cursor(buf)
    if bytes(cur.take(4)) != b"GGUF":
        raise GGUFTableError("not a GGUF file (bad magic)")
    version = cur.u32()
    if version not in (2, 3):
        raise GGUFTableError(f"GGUF version {version} is not 2 or 3")
    n_tensors, n_kv = cur.u64(), cur.u64()
    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key = cur.string()
        vtype = cur.u32()
        got = cur.value(vtype, keep=key == ALIGNMENT_KEY)
        if key == ALIGNMENT_KEY:
            if not isinstance(got, int) or got <= 0:
                raise GGUFTableError(f"{ALIGNMENT_KEY} is {got!r}")
            alignment = got
    tensors = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.u32()
        dims = cur.unpack(f"<{n_dims}Q") if n_dims else ()
        ttype = cur.u32()
        offset = cur.u64()
        try:
            qt = gguf.GGMLQuantizationType(ttype)
        except ValueError:
            raise GGUFTableError(f"tensor {name}: unknown ggml type {ttype}") from None
        block, type_size = gguf.GGML_QUANT_SIZES[qt]
        n = int(np.prod(dims, dtype=np.int64))
        if n % block:
            raise GGUFTableError(f"tensor {name}: {n} elements is not a multiple of its block {block}")
        tensors.append(TensorEntry(name, tuple(int(d) for d in reversed(dims)), qt, offset, n // block * type_size))
    data_offset = cur.pos + (-cur.pos % alignment)
    return TensorTable(version, alignment, data_offset, tensors)
