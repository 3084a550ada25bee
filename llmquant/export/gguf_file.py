"""Streaming GGUF output with an all-or-nothing rename.

Every tensor is declared from the plan before any weight is read (GGUF puts
the tensor table in front of the data), then the data is appended tensor by
tensor as layers finish. The file is written beside the target under a
temporary name and renamed only when complete and re-read successfully, so
an error, a full disk or Ctrl-C never leaves a partial file at the target.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from ..errors import LlmquantError
from ..policy import ggml_type


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


class GGUFOutput:
    """Context manager: declare, stream tensors in plan order, then commit."""

    def __init__(self, out: Path, arch_name: str):
        self.out = Path(out)
        self.tmp = self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}")
        self.writer = gguf.GGUFWriter(None, arch_name)
        self._pending: list[PlannedTensor] = []
        self._committed = False

    def __enter__(self) -> GGUFOutput:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed:
            self.abort()

    def declare(self, plan: list[PlannedTensor]) -> None:
        """Write header, metadata and the tensor table (metadata added on self.writer first)."""
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
        self._guard(self._write_head)

    def _write_head(self) -> None:
        self.writer.write_header_to_file(self.tmp)
        self.writer.write_kv_data_to_file()
        self.writer.write_ti_data_to_file()

    def write(self, name: str, data: np.ndarray) -> None:
        """Append the next tensor's bytes; name must be the next one in the plan."""
        if not self._pending or self._pending[0].name != name:
            expected = self._pending[0].name if self._pending else "nothing"
            raise RuntimeError(f"tensor {name} written out of order (expected {expected})")
        t = self._pending.pop(0)
        if data.nbytes != t.nbytes:
            raise RuntimeError(f"tensor {name}: {data.nbytes} bytes, planned {t.nbytes}")
        self._guard(lambda: self.writer.write_tensor_data(np.ascontiguousarray(data)))

    def commit(self) -> None:
        """Flush, check the file reads back as planned, then rename it into place."""
        if self._pending:
            raise RuntimeError(f"{len(self._pending)} tensors never written, first {self._pending[0].name}")

        def finish() -> None:
            for f in self.writer.fout or []:
                f.flush()
                os.fsync(f.fileno())
            self.writer.close()

        self._guard(finish)
        verify_gguf(self.tmp)
        os.replace(self.tmp, self.out)
        self._committed = True

    def abort(self) -> None:
        try:
            self.writer.close()
        except Exception:  # closing a half-written file must not hide the real error
            pass
        self.tmp.unlink(missing_ok=True)

    def _guard(self, fn) -> None:
        try:
            fn()
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise LlmquantError(f"no space left on the device while writing {self.out}") from None
            raise LlmquantError(f"cannot write {self.out}: {exc.strerror or exc}") from None


def verify_gguf(path: Path) -> int:
    """Re-read a written file's header and tensor table; return its tensor count."""
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:
        raise LlmquantError(f"the written file {path} does not read back: {exc}") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise LlmquantError(f"the written file {path} is truncated at tensor {t.name}")
    return len(reader.tensors)


def check_output_path(out: Path, model_dir: Path) -> None:
    """Fail before any work when the output cannot be written where asked."""
    out = Path(out)
    parent = out.resolve().parent
    if not parent.is_dir():
        raise LlmquantError(f"output folder {parent} does not exist")
    if out.is_dir():
        raise LlmquantError(f"output {out} is a folder; give a file name such as model-q4_0.gguf")
    if out.resolve().is_relative_to(model_dir.resolve()) and out.suffix != ".gguf":
        raise LlmquantError(f"output {out} would overwrite a file of the input model")
    # create a file for real: mode bits say nothing for root, ACLs or read-only mounts
    probe = parent / f".{out.name}.probe-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as exc:
        raise LlmquantError(f"output folder {parent} is not writable: {exc.strerror or exc}") from None
    probe.unlink()
