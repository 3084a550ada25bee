"""Streaming GGUF output with an all-or-nothing rename.

Every tensor is declared from the plan before any weight is read (GGUF puts
the tensor table in front of the data), then the data is appended tensor by
tensor as layers finish. The file is written as a partial file in the run's
work folder beside the target and renamed only when complete and re-read
successfully, so an error, a full disk or Ctrl-C never leaves a partial file
at the target (the work folder keeps or removes it).
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from ..errors import LlmquantError
from ..policy import ggml_type
from .gguf_table import GGUFTableError, read_tensor_table


class ResumableError(LlmquantError):
    """A failure of the machine, not of the input: the finished layers can be resumed."""


class WriteError(ResumableError):
    """Writing the output failed (disk full, I/O error)."""


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the output file. shape is numpy order (rows last)."""

    name: str
    shape: tuple[int, ...]
    type: str
    note: str = ""

    @property
    def nbytes(self) -> int:
        block, type_size = gguf.GGML_QUANT_SIZES[ggml_type(self.type)]
        n = int(np.prod(self.shape, dtype=np.int64))
        return n // block * type_size

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


# metadata array item types packed as one numpy array: (dtype, the Python type every item must be)
_NUMERIC_ARRAYS = {gguf.GGUFValueType.INT32: ("<i4", int), gguf.GGUFValueType.FLOAT32: ("<f4", float)}


class ArrayWriter(gguf.GGUFWriter):
    """gguf's writer, with long metadata arrays packed whole.

    gguf packs an array one ``struct.pack`` per item, and a 262k-token vocabulary
    (its texts, scores and types) or half a million merges then take most of a
    second. Arrays of strings or of int32/float32 numbers are packed here in one
    pass each, into the bytes gguf writes (same layout, same type rule: the first
    item's type, every item of that type; tests compare the two byte for byte);
    anything else goes to gguf.
    """

    def _pack_val(self, val, vtype, add_vtype, sub_type=None) -> bytes:
        if (vtype != gguf.GGUFValueType.ARRAY or not isinstance(val, (list, tuple)) or len(val) < 2
                or self.endianess != gguf.GGUFEndian.LITTLE):
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        ltype = sub_type if sub_type is not None else gguf.GGUFValueType.get_type(val[0])
        kinds = set(map(type, val))
        if ltype == gguf.GGUFValueType.STRING and all(issubclass(k, (str, bytes)) for k in kinds):
            items = [v.encode("utf-8") if isinstance(v, str) else v for v in val]
            lengths = np.fromiter(map(len, items), dtype="<u8", count=len(items)).tobytes()
            parts = [b""] * (2 * len(items))
            parts[0::2] = [lengths[i : i + 8] for i in range(0, len(lengths), 8)]
            parts[1::2] = items
            body = b"".join(parts)
        elif ltype in _NUMERIC_ARRAYS and all(issubclass(k, _NUMERIC_ARRAYS[ltype][1]) and not issubclass(k, bool)
                                               for k in kinds):
            body = np.asarray(val, dtype=_NUMERIC_ARRAYS[ltype][0]).tobytes()
        else:
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        head = np.array([vtype] if add_vtype else [], dtype="<u4").tobytes()
        return head + np.array([ltype], dtype="<u4").tobytes() + np.array([len(val)], dtype="<u8").tobytes() + body


class GGUFOutput:
    """Context manager: declare, stream tensors in plan order, then commit.

    gguf's writer produces the header, metadata and tensor table; the tensor
    data is appended here so that it can arrive in row chunks (a large
    embedding never sits in memory whole) and so that a run can continue an
    interrupted file from the end of its last finished layer (``resume_at``).
    """

    def __init__(self, out: Path, arch_name: str, tmp: Path):
        self.out = Path(out)
        self.tmp = Path(tmp)  # the partial file; its work folder decides whether it outlives a failure
        self.writer = ArrayWriter(None, arch_name)
        self._fh = None
        self._pending: list[PlannedTensor] = []
        self._n_written = 0
        self._committed = False
        self.checksum = ""

    def __enter__(self) -> GGUFOutput:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed:
            self.abort()

    @property
    def n_written(self) -> int:
        return self._n_written

    @property
    def position(self) -> int:
        """Bytes written so far: where a resumed run cuts the partial file."""
        return self._fh.tell()

    def declare(self, plan: list[PlannedTensor], resume_at: tuple[int, int] | None = None) -> None:
        """Write header, metadata and the tensor table (metadata added on self.writer first).

        resume_at (byte offset, tensors written): keep the partial file at
        self.tmp up to that point instead, after checking that its header is
        the one these settings produce.
        """
        for t in plan:
            qt = ggml_type(t.type)
            if qt == gguf.GGMLQuantizationType.F32:
                self.writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes)
            elif qt == gguf.GGMLQuantizationType.F16:
                self.writer.add_tensor_info(t.name, t.shape, np.dtype(np.float16), t.nbytes)
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(t.shape, qt)
                self.writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=qt)
        self._pending = list(plan)
        if resume_at is None:
            self._guard(lambda: self._write_head(self.tmp))
            self._fh = self.writer.fout[0]
            self.writer.fout = None  # the data is ours to write
            self._guard(lambda: self._fh.write(bytes(_pad(self._fh.tell(), self.writer.data_alignment))))
            return
        offset, n_done = resume_at
        head_file = self.tmp.with_name(self.tmp.name + ".head")
        try:
            self._guard(lambda: self._write_head(head_file))
            self.writer.close()
            head = head_file.read_bytes()
        finally:
            head_file.unlink(missing_ok=True)
        with open(self.tmp, "rb") as fh:
            same = fh.read(len(head)) == head
        if not same or offset < len(head) or offset > self.tmp.stat().st_size:
            raise LlmquantError(f"the partial file {self.tmp} does not match this run; remove {self.tmp.parent} and start again")
        self._fh = open(self.tmp, "r+b")  # noqa: SIM115 - closed in commit/abort
        self._fh.truncate(offset)
        self._fh.seek(offset)
        self._pending = self._pending[n_done:]
        self._n_written = n_done

    def _write_head(self, path: Path) -> None:
        self.writer.write_header_to_file(path)
        self.writer.write_kv_data_to_file()
        self.writer.write_ti_data_to_file()

    def write(self, name: str, data: np.ndarray) -> None:
        """Append the next tensor's bytes; name must be the next one in the plan."""
        self.write_chunks(name, [data])

    def write_chunks(self, name: str, chunks: Iterable[np.ndarray]) -> None:
        """Append the next tensor from consecutive pieces of its data (e.g. row ranges)."""
        if not self._pending or self._pending[0].name != name:
            expected = self._pending[0].name if self._pending else "nothing"
            raise RuntimeError(f"tensor {name} written out of order (expected {expected})")
        t = self._pending.pop(0)
        total = 0
        for chunk in chunks:
            total += chunk.nbytes
            if total > t.nbytes:
                raise RuntimeError(f"tensor {name}: more than the {t.nbytes} bytes planned")
            # file.write, not ndarray.tofile: a short write must raise with its errno (ENOSPC)
            self._guard(lambda chunk=chunk: self._fh.write(np.ascontiguousarray(chunk).data))
        if total != t.nbytes:
            raise RuntimeError(f"tensor {name}: {total} bytes, planned {t.nbytes}")
        self._guard(lambda: self._fh.write(bytes(_pad(total, self.writer.data_alignment))))
        self._n_written += 1

    def sync(self) -> None:
        """Make everything written so far durable (a layer boundary a run can resume from)."""
        self.flush()
        self.fsync()

    def flush(self) -> None:
        """Hand what is buffered here to the OS (what ``fsync`` then makes durable)."""
        self._guard(self._fh.flush)

    def fsync(self) -> None:
        """Make what was flushed durable; safe from another thread while this one writes on."""
        self._guard(lambda: os.fsync(self._fh.fileno()))

    def commit(self) -> None:
        """Flush, check the file reads back as planned, then rename it into place."""
        if self._pending:
            raise RuntimeError(f"{len(self._pending)} tensors never written, first {self._pending[0].name}")
        self.sync()
        self._guard(self._fh.close)
        self.checksum = verify_gguf(self.tmp, self._planned_infos())
        self._guard(lambda: os.replace(self.tmp, self.out))
        self._committed = True

    def _planned_infos(self) -> list[tuple[str, int]]:
        return [(name, ti.nbytes) for name, ti in self.writer.tensors[0].items()]

    def abort(self) -> None:
        for close in (self.writer.close, getattr(self._fh, "close", None)):
            try:
                if close:
                    close()
            except Exception:  # closing a half-written file must not hide the real error
                pass

    def _guard(self, fn) -> None:
        try:
            fn()
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise WriteError(f"no space left on the device while writing {self.out}") from None
            raise WriteError(f"cannot write {self.out}: {exc.strerror or exc}") from None


def _pad(n: int, align: int) -> int:
    return -n % align


def verify_gguf(path: Path, planned: list[tuple[str, int]] | None = None) -> str:
    """Re-read a written file: header, tensor table against the plan, exact size; sha256 of the data.

    The checksum covers the tensor data section, so two runs that claim to be
    identical can be compared from their reports alone.
    """
    try:
        table = read_tensor_table(path)
    except (GGUFTableError, OSError) as exc:
        raise LlmquantError(f"the written file {path} does not read back: {exc}") from None
    size = path.stat().st_size
    if planned is not None:
        got = [(t.name, t.n_bytes) for t in table.tensors]
        if got != planned:
            raise LlmquantError(f"the written file {path} does not hold the planned tensors")
    end = table.data_offset
    for t in table.tensors:
        t_end = table.data_offset + t.offset + t.n_bytes
        if t_end > size:
            raise LlmquantError(f"the written file {path} does not read back: it is truncated at tensor {t.name}")
        end = max(end, t_end)
    if planned is not None and size != end + _pad(end, table.alignment):
        raise LlmquantError(f"the written file {path} is {size} bytes, expected {end + _pad(end, table.alignment)}")
    digest = hashlib.sha256()
    block = memoryview(bytearray(1 << 22))  # one buffer read into again and again: no fresh pages per block
    with open(path, "rb", buffering=0) as fh:
        fh.seek(table.data_offset)
        while n := fh.readinto(block):
            digest.update(block[:n])
    return "sha256:" + digest.hexdigest()
