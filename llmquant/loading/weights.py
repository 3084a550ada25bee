"""Lazy access to the weights of a (sharded) safetensors checkpoint.

Only the headers are read up front (names, shapes, dtypes, byte ranges), and
checked against the file sizes so a truncated or corrupt shard fails before
any output is written. Each tensor is then read on demand (its byte range, or
a range of its rows), one decoder layer at a time, so memory never grows with
the number of layers.
"""

from __future__ import annotations

import json
import math
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import LlmquantError

# safetensors dtype -> bytes per element; these are the ones a float model uses
_FLOAT_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}
_NUMPY_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<i2", "F64": "<f8"}
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorEntry:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0  # of the first data byte in the file


class WeightStore:
    """Index of every tensor in a checkpoint folder; reads tensors lazily as float32."""

    def __init__(self, model_dir: Path, renames: tuple[tuple[str, str], ...] = ()):
        """renames: (regex, replacement) pairs, the first that matches a tensor's name giving the name
        it is known by here (a spec's ``checkpoint_renames``); ``entry.name`` stays the file's."""
        self.model_dir = model_dir
        self.files = files = self._shard_files(model_dir)
        self.entries: dict[str, TensorEntry] = {}
        for f in files:
            for entry in _read_header(f):
                name = _renamed(entry.name, renames)
                other = self.entries.get(name)
                if other is not None and other.name == entry.name:
                    raise LlmquantError(f"tensor {entry.name} is in both {other.file.name} and {f.name}; "
                                        "which one the model means is ambiguous")
                if other is not None:  # two layouts at once
                    raise LlmquantError(f"tensors {other.name} and {entry.name} are both the model's {name}; "
                                        "which one the model means is ambiguous")
                self.entries[name] = entry

    @staticmethod
    def _shard_files(model_dir: Path) -> list[Path]:
        """The files transformers would load: model.safetensors, else the shards its index names."""
        single, index = model_dir / SINGLE_FILE, model_dir / INDEX_FILE
        if single.is_file():
            others = sorted(p.name for p in model_dir.glob("*.safetensors") if p.name != SINGLE_FILE)
            if others and not index.is_file():
                warnings.warn(f"ignoring {', '.join(others[:3])}{' ...' if len(others) > 3 else ''} in {model_dir}: "
                              f"without {INDEX_FILE}, transformers reads only {SINGLE_FILE}", stacklevel=3)
            return [single]
        if index.is_file():
            files = sorted({model_dir / f for f in read_weight_map(index).values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise LlmquantError(f"{index.name} names missing shard(s): {', '.join(missing[:3])}")
            return files
        found = sorted(p.name for p in model_dir.glob("*.safetensors"))
        if found:
            raise LlmquantError(f"{model_dir} has {', '.join(found[:3])} but neither {SINGLE_FILE} nor {INDEX_FILE}: "
                                "transformers would not load it either")
        other = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt*")]
        hint = f" (found {other[0]}: convert it to safetensors first)" if other else ""
        raise LlmquantError(f"no safetensors weights in {model_dir}{hint}")

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def same_values(self, a: str, b: str, rows: int = 4096) -> bool:
        """Whether two tensors hold the same values (read by row chunks, never whole)."""
        if a not in self.entries or b not in self.entries or self.shape(a) != self.shape(b):
            return False
        n = self.shape(a)[0] if self.shape(a) else 1
        return all(torch.equal(self.get_rows(a, i, min(i + rows, n)), self.get_rows(b, i, min(i + rows, n)))
                   for i in range(0, n, rows))

    def get(self, name: str) -> torch.Tensor:
        """The tensor as float32 (a fresh copy, safe to modify)."""
        return self._read(name, None)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor as float32: large embeddings and heads stream by rows."""
        return self._read(name, (start, stop))

    def _read(self, name: str, rows: tuple[int, int] | None) -> torch.Tensor:
        try:
            entry = self.entries[name]
        except KeyError:
            raise LlmquantError(f"tensor {name} is missing from the checkpoint in {self.model_dir}") from None
        shape = entry.shape
        itemsize = _FLOAT_DTYPES[entry.dtype]
        row_elems = int(np.prod(shape[1:], dtype=np.int64))
        first, last = rows if rows is not None else (0, shape[0] if shape else 1)
        if rows is not None:
            shape = (last - first, *shape[1:])
        # A plain read of the byte range, not safetensors' mmap: the mmap maps the
        # whole shard (GBs of address space, counted against a memory limit) and
        # keeps every page it touched resident while it is open.
        try:
            with open(entry.file, "rb") as fh:
                fh.seek(entry.offset + first * row_elems * itemsize)
                raw = np.fromfile(fh, dtype=_NUMPY_DTYPES[entry.dtype], count=(last - first) * row_elems)
        except OSError as exc:
            raise LlmquantError(f"cannot read tensor {name} from {entry.file.name}: {exc.strerror or exc}") from None
        if raw.size != (last - first) * row_elems:
            raise LlmquantError(f"cannot read tensor {name} from {entry.file.name}: the file is truncated")
        t = torch.from_numpy(raw)
        if entry.dtype == "BF16":
            t = t.view(torch.bfloat16)
        t = t.to(torch.float32).reshape(shape)
        if not _all_finite(t):
            raise LlmquantError(f"tensor {name} holds NaN or Inf values; refusing to quantize it")
        return t


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in ``t``: one min/max pass (NaN propagates through both, an Inf is an extreme),
    far cheaper than materializing ``isfinite``'s mask over every weight."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite(lo.item()) and math.isfinite(hi.item())


def _renamed(name: str, renames: tuple[tuple[str, str], ...]) -> str:
    for pattern, replacement in renames:
        new, n = re.subn(pattern, replacement, name, count=1)
        if n:
            return new
    return name


def read_weight_map(index: Path) -> dict[str, str]:
    """The index's tensor name -> shard file map, or a one-line error."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise LlmquantError(f"cannot read {index}: {exc}") from None
    if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) and v.endswith(".safetensors") and not Path(v).is_absolute() and ".." not in Path(v).parts
            for v in weight_map.values()):
        raise LlmquantError(f"{index}: weight_map must map tensor names to .safetensors files inside the folder")
    return weight_map


def _read_header(path: Path) -> list[TensorEntry]:
    """Parse and validate one safetensors header without touching the data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 * 2**20):
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(fh.read(n))
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise LlmquantError(f"corrupt safetensors file {path.name}: {exc}") from None
    data_size = size - 8 - n
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            if not all(type(v) is int and v >= 0 for v in (*shape, start, end)) or start > end:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise LlmquantError(f"corrupt safetensors header in {path.name} at tensor {name}") from None
        if end > data_size:
            raise LlmquantError(
                f"truncated safetensors file {path.name}: tensor {name} ends at byte {end} "
                f"but the file holds {data_size} data bytes"
            )
        if dtype not in _FLOAT_DTYPES:
            raise LlmquantError(f"tensor {name} in {path.name} has dtype {dtype}; llmquant reads F32, F16, BF16 weights")
        if end - start != _FLOAT_DTYPES[dtype] * int(np.prod(shape, dtype=np.int64)):
            raise LlmquantError(f"corrupt safetensors header in {path.name}: size of {name} does not match its shape")
        entries.append(TensorEntry(name, path, dtype, shape, 8 + n + start))
    return entries
