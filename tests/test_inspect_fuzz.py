"""Fuzz ``llmquant inspect`` with mutated GGUF files: our one-line error or a description, nothing else.

A damaged file is ordinary user input, so reading one must end in :class:`LlmquantError` (a one-line
``error:`` and exit code 2 in the CLI) or a description. A traceback, a hang or a runaway allocation
is a bug. The mutations start from one small but real GGUF file (every kind of metadata value the
reader walks, and F32, F16, Q8_0 and Q4_0 tensors) and favour its header, where the counts, lengths,
type ids, dimensions and offsets that drive the reader live.
"""

from __future__ import annotations

import re
import signal
import struct
import subprocess
import sys
import tracemalloc
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from llmquant.errors import LlmquantError
from llmquant.inspect_gguf import describe

SECONDS_PER_FILE = 2.0  # a good read of the base file takes milliseconds
MAX_PEAK_BYTES = 64 * 2**20  # the base file is a few KB; the reader should allocate little more


def _write_base(path: Path) -> None:
    """A few KB of real GGUF: one metadata value of each kind and four small tensors."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, arch="llama")
    w.add_string("general.name", "fuzz base")
    w.add_uint32("llama.block_count", 2)
    w.add_int64("fuzz.offset", -5)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_bool("fuzz.flag", True)
    w.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "hello", "world"])
    w.add_array("tokenizer.ggml.token_type", [1, 3, 1, 1])
    w.add_key_value("fuzz.bytes", [7, 0, 255], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT8)
    w.add_tensor("token_embd.weight", rng.standard_normal((4, 8)).astype(np.float32))
    w.add_tensor("output_norm.weight", rng.standard_normal(8).astype(np.float16))
    for name, qtype in (("blk.0.attn_q.weight", gguf.GGMLQuantizationType.Q8_0),
                        ("blk.0.ffn_down.weight", gguf.GGMLQuantizationType.Q4_0)):
        data = rng.standard_normal((2, 64)).astype(np.float32)
        w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _header_numbers(path: Path) -> list[tuple[int, int]]:
    """(offset, size) of every count, length, type id, dimension and offset in the header."""
    reader = gguf.GGUFReader(path)
    spots = [(8, 8), (16, 8)]  # tensor count, kv count
    fields = [f for name, f in reader.fields.items() if not name.startswith("GGUF.")]
    for field in fields + [t.field for t in reader.tensors]:
        offs = field.offset
        for part in field.parts:  # uint8 parts are the bytes of strings; the rest are numbers
            if part.dtype.kind in "ui" and part.dtype.itemsize in (4, 8):
                spots += [(offs + i * part.dtype.itemsize, part.dtype.itemsize) for i in range(part.size)]
            offs += part.nbytes
    return spots


@dataclass(repr=False)
class Base:
    """The base file's bytes, the (offset, size) of its header numbers, and a folder for the mutants."""

    raw: bytes
    spots: list[tuple[int, int]]
    folder: Path

    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing case: keep it short
        return f"Base({len(self.raw)} bytes)"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    folder = tmp_path_factory.mktemp("inspect-fuzz")
    path = folder / "base.gguf"
    _write_base(path)
    return Base(path.read_bytes(), _header_numbers(path), folder)


INTERESTING = [0, 1, 2, 3, 7, 8, 31, 32, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40,
               2**62, 2**63 - 1, 2**63, 2**64 - 1]
Edit = tuple  # ("number", offset, size, value), ("overwrite", pos, bytes), ("flip", pos, bit), ...


@st.composite
def edits(draw, size: int, spots: list[tuple[int, int]]) -> list[Edit]:
    """One to three edits, mostly in the header; a list of tuples so a failing case prints readably."""
    out = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["number"] * 3 + ["overwrite", "flip", "insert", "delete", "truncate"]))
        if kind == "number":  # a count, length, type id, dimension or offset set to an edge value
            offs, width = draw(st.sampled_from(spots))
            value = draw(st.sampled_from(INTERESTING + [size, size - offs]) | st.integers(0, 2 ** (8 * width) - 1))
            out.append((kind, offs, width, value % 2 ** (8 * width)))
            continue
        pos = draw(st.integers(4, draw(st.sampled_from([64, 256, 512, size])) - 1))  # bad magic is tested elsewhere
        if kind in ("overwrite", "insert"):
            out.append((kind, pos, draw(st.binary(min_size=1, max_size=16))))
        elif kind == "flip":
            out.append((kind, pos, draw(st.integers(0, 7))))
        elif kind == "delete":
            out.append((kind, pos, draw(st.integers(1, 16))))
        else:
            out.append((kind, pos))
    return out


def _apply(raw: bytes, edit_list: list[Edit]) -> bytes:
    buf = bytearray(raw)
    for kind, pos, *arg in edit_list:
        if kind == "number":
            buf[pos:pos + arg[0]] = arg[1].to_bytes(arg[0], "little")
        elif kind == "overwrite":
            buf[pos:pos + len(arg[0])] = arg[0]
        elif kind == "flip" and pos < len(buf):
            buf[pos] ^= 1 << arg[0]
        elif kind == "insert":
            buf[pos:pos] = arg[0]
        elif kind == "delete":
            del buf[pos:pos + arg[0]]
        elif kind == "truncate":
            del buf[pos:]
    return bytes(buf)


class _TooSlow(Exception):
    """A read that took too long."""


@contextmanager
def _bounded(seconds: float) -> Iterator[list[bool]]:
    """Interrupt the body after ``seconds``; the yielded flag says so even if the body hid the exception."""
    fired = [False]

    def on_alarm(signum, frame):
        fired[0] = True
        raise _TooSlow(f"still reading after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _check_one(path: Path, data: bytes) -> str:
    """describe() on data either returns text or raises LlmquantError naming the file, fast and small."""
    path.unlink(missing_ok=True)  # a fresh inode: no earlier memory map sees the new bytes
    path.write_bytes(data)
    tracemalloc.start()
    try:
        with _bounded(SECONDS_PER_FILE) as too_slow, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                text = describe(path)
            except LlmquantError as exc:
                outcome = str(exc)
                assert str(path) in outcome and "\n" not in outcome, outcome
            else:
                assert isinstance(text, str)
                outcome = "described"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not too_slow[0], f"still reading after {SECONDS_PER_FILE} s"
    assert not caught, [str(w.message) for w in caught]  # the CLI would print them as 'warning:' lines
    assert peak < MAX_PEAK_BYTES, f"reading allocated {peak / 2**20:.0f} MiB at peak"
    return outcome


def test_base_file_is_small_and_reads(base):
    assert 1000 < len(base.raw) < 8000 and len(base.spots) > 20
    assert struct.unpack_from("<QQ", base.raw, 8) == (4, 9)  # 4 tensors; our 8 keys and general.architecture
    text = describe(base.folder / "base.gguf")
    assert "blk.0.ffn_down.weight" in text and "Q4_0" in text and "Q8_0" in text


@settings(max_examples=300, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_files_give_our_error_or_a_description(base, data):
    edit_list = data.draw(edits(len(base.raw), base.spots))
    outcome = _check_one(base.folder / "mutant.gguf", _apply(base.raw, edit_list))
    event(re.sub(r"\d+", "N", outcome.replace(str(base.folder), ""))[:60])  # for --hypothesis-show-statistics


@pytest.mark.parametrize("value", [2**32 - 1, 2**63, 2**64 - 1])
def test_every_header_number_set_to_a_huge_value(base, value):
    """The edits most likely to drive a reader into huge loops or allocations, each tried once."""
    for offs, width in base.spots:
        _check_one(base.folder / "huge.gguf", _apply(base.raw, [("number", offs, width, value % 2 ** (8 * width))]))


def test_cli_on_a_mutated_file_prints_one_error_line(base):
    """The real command on an array count far past the end of the file: exit code 2, one 'error:' line."""
    path = base.folder / "cli.gguf"
    count_at = base.raw.index(b"fuzz.bytes") + len("fuzz.bytes") + 4 + 4  # after the value and item types
    path.write_bytes(_apply(base.raw, [("number", count_at, 8, 2**63)]))
    proc = subprocess.run([sys.executable, "-m", "llmquant.cli", "inspect", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "cli.gguf" in lines[0] and "'fuzz.bytes'" in lines[0] and "past the end of the file" in lines[0]
