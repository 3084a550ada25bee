"""Read a GGUF file's metadata and tensor table (for ``llmquant inspect``)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import gguf
import numpy as np

from .errors import LlmquantError


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """A reader for ``path``, or a one-line error when it is not a readable GGUF file."""
    path = Path(path)
    if not path.is_file():
        raise LlmquantError(f"no such file: {path}")
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise LlmquantError(f"{path} is not a GGUF file (bad magic)")
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
    return "\n".join(lines)
