"""Read a GGUF file's metadata and tensor table (for ``llmquant inspect``)."""

from __future__ import annotations

import mmap
import struct
from collections import Counter
from pathlib import Path

import gguf
import numpy as np

from .errors import LlmquantError

_V = gguf.GGUFValueType
_SCALAR_BYTES = {_V.UINT8: 1, _V.INT8: 1, _V.BOOL: 1, _V.UINT16: 2, _V.INT16: 2, _V.UINT32: 4, _V.INT32: 4,
                 _V.FLOAT32: 4, _V.UINT64: 8, _V.INT64: 8, _V.FLOAT64: 8}
GGML_MAX_DIMS = 4


class _Damaged(Exception):
    """A count, length or offset in the header that the file cannot hold."""


def _quoted(raw: bytes) -> str:
    """A key or tensor name for a one-line message: quoted, escaped and at most 40 bytes."""
    return repr(raw[:40].decode("utf-8", "replace"))


class _HeaderWalk:
    """Steps over a GGUF header, checking every count, length and offset against the file size.

    gguf's reader trusts them: past the end of the file its reads come back empty instead of failing, so
    an array count of 2**63 numbers makes it loop, and grow a list, practically forever; a tensor offset
    near 2**64 wraps around to a valid-looking one. This walk only skips bytes, so it costs one step per key,
    string array item and tensor, and it stops where a count no longer fits in what is left of the file.
    """

    def __init__(self, data: mmap.mmap) -> None:
        # as the reader decides: a version with a zero low half was written in the other byte order
        self.order = "<" if struct.unpack_from("<I", data, 4)[0] & 0xFFFF else ">"
        self.data, self.offs = data, 8

    def take(self, fmt: str) -> int:
        value = struct.unpack_from(self.order + fmt, self.data, self.offs)[0]
        self.offs += struct.calcsize(fmt)
        return value

    def skip(self, n: int, what: str) -> None:
        if n > len(self.data) - self.offs:
            raise _Damaged(f"{what} at byte {self.offs} runs past the end of the file")
        self.offs += n

    def string(self, what: str) -> bytes:
        start = self.offs + 8
        self.skip(self.take("Q"), what)
        return self.data[start:self.offs]

    def value(self, vtype: int, what: str) -> None:
        if vtype in _SCALAR_BYTES:
            self.skip(_SCALAR_BYTES[vtype], what)
        elif vtype == _V.STRING:
            self.skip(self.take("Q"), what)
        elif vtype == _V.ARRAY:
            itype, count, start = self.take("I"), self.take("Q"), self.offs
            # a string or an array takes at least 8 bytes, so this bounds the loop below by the file size
            self.skip(count * _SCALAR_BYTES.get(itype, 8), f"{what}, an array of {count} items,")
            if itype not in _SCALAR_BYTES:
                self.offs, item = start, f"an item of {what}"
                for _ in range(count):
                    self.value(itype, item)
        else:
            raise _Damaged(f"{what} has an unknown value type {vtype}")

    def header(self) -> None:
        n_tensors, n_kv = self.take("Q"), self.take("Q")
        keys: set[bytes] = set()
        for _ in range(n_kv):  # a key takes at least 13 bytes: a huge count runs off the end quickly
            raw = self.string("a metadata key")
            if raw in keys:  # the reader stops here too; a run of zero bytes would look like empty keys
                raise _Damaged(f"metadata key {_quoted(raw)} appears twice")
            keys.add(raw)
            self.value(self.take("I"), f"the value of {_quoted(raw)}")
        names: set[bytes] = set()
        for _ in range(n_tensors):
            raw = self.string("a tensor name")
            name = _quoted(raw)
            if raw in names:
                raise _Damaged(f"tensor {name} appears twice")
            names.add(raw)
            if (n_dims := self.take("I")) > GGML_MAX_DIMS:
                raise _Damaged(f"tensor {name} has {n_dims} dimensions")
            self.skip(8 * n_dims + 4, f"the shape of tensor {name}")
            if self.take("Q") > len(self.data):
                raise _Damaged(f"the data of tensor {name} starts past the end of the file")


def _check_header(path: Path) -> None:
    """A one-line error unless the header's counts, lengths and offsets fit the file (see _HeaderWalk)."""
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        try:
            _HeaderWalk(data).header()
        except _Damaged as exc:
            raise LlmquantError(f"{path} is a damaged or truncated GGUF file ({exc})") from None
        except struct.error:
            raise LlmquantError(f"{path} is a damaged or truncated GGUF file (its header ends early)") from None
        except RecursionError:
            raise LlmquantError(f"{path} is a damaged GGUF file (arrays nested too deeply)") from None


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """A reader for ``path``, or a one-line error when it is not a readable GGUF file."""
    path = Path(path)
    if not path.is_file():
        raise LlmquantError(f"no such file: {path}")
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise LlmquantError(f"{path} is not a GGUF file (bad magic)")
    _check_header(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises many kinds on a damaged file
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise LlmquantError(f"{path} is a damaged or truncated GGUF file ({reason})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if int(t.data_offset) + int(t.n_bytes) > size:
            raise LlmquantError(f"{path} is truncated: tensor {t.name} ends past the end of the file ({size} bytes)")
    return reader


def _value(field: gguf.ReaderField) -> str:
    if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
        return f"[{len(field.data)} items]"
    try:
        text = str(field.contents())
    except Exception:
        return "?"
    return text if len(text) < 80 else text[:77] + "..."


def describe(path: str | Path) -> str:
    """Metadata, a tensor table and bits per weight, as text."""
    reader = open_gguf(path)
    lines = [f"{path}: {Path(path).stat().st_size / 2**20:.1f} MiB"]
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        lines.append(f"  {name} = {_value(field)}")
    lines.append("")
    lines.append(f"  {'tensor':<32} {'type':<6} {'shape':<18} {'bytes':>12}")
    count, elems, nbytes = Counter(), 0, 0
    for t in reader.tensors:
        shape = "x".join(str(int(s)) for s in t.shape)
        lines.append(f"  {t.name:<32} {t.tensor_type.name:<6} {shape:<18} {int(t.n_bytes):>12}")
        count[t.tensor_type.name] += 1
        elems += int(np.prod(t.shape))
        nbytes += int(t.n_bytes)
    lines.append("")
    lines.append(
        f"  {len(reader.tensors)} tensors ("
        + ", ".join(f"{k} x{v}" for k, v in sorted(count.items()))
        + f"), {elems / 1e6:.1f}M weights, {8 * nbytes / max(elems, 1):.3f} bits per weight"
    )
    lines += _fallbacks(reader)
    return "\n".join(lines)


def _field_int(reader: gguf.GGUFReader, key: str) -> int | None:
    f = reader.fields.get(key)
    try:
        return int(f.parts[f.data[0]][0]) if f is not None and f.data else None
    except (IndexError, TypeError, ValueError):
        return None


def _fallbacks(reader: gguf.GGUFReader) -> list[str]:
    """Which tensors took a fallback type of the file's llama.cpp recipe (llama.cpp says nothing)."""
    from .policy import RECIPES, ModelFacts, choose_type

    arch = next((str(bytes(f.parts[-1]), "utf-8") for k, f in reader.fields.items() if k == "general.architecture"), "")
    ftype = _field_int(reader, "general.file_type")
    recipe = next((r for r in RECIPES.values() if int(r.file_type) == ftype), None)
    n_layers = _field_int(reader, f"{arch}.block_count")
    if recipe is None or not n_layers:
        return []
    heads, kv = _field_int(reader, f"{arch}.attention.head_count"), _field_int(reader, f"{arch}.attention.head_count_kv")
    gqa = heads // kv if heads and kv and heads % kv == 0 else 1
    facts = ModelFacts(n_layers=n_layers, n_gqa=gqa)
    names = {t.name for t in reader.tensors}
    fell = Counter()
    for t in reader.tensors:
        is_head = t.name == "output.weight" or (t.name == "token_embd.weight" and "output.weight" not in names)
        choice = choose_type(t.name, tuple(int(x) for x in reversed(t.shape)), recipe, facts, pure=False,
                             is_head=is_head)
        if choice.note and choice.ggml_type == t.tensor_type.name.lower():
            fell[choice.note.split(":")[0]] += 1
    if not fell:
        return [f"  no tensor fell back from the {recipe.name.upper()} recipe's types"]
    return ["  fell back (row not a multiple of the type's block): "
            + ", ".join(f"{k} x{v}" for k, v in sorted(fell.items()))]
