"""Byte-identity of two written files, with a failure that says where they part.

A plain ``assert a.read_bytes() == b.read_bytes()`` prints both files in full when it
fails (megabytes on CI, and the test's name scrolls away); this names the first
tensor whose bytes differ, or the header, in one line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def first_difference(a: Path, b: Path) -> str | None:
    """None where the two files are byte-identical, else where they first differ."""
    da, db = Path(a).read_bytes(), Path(b).read_bytes()
    if da == db:
        return None
    n = min(len(da), len(db))
    diff = np.flatnonzero(np.frombuffer(da[:n], np.uint8) != np.frombuffer(db[:n], np.uint8))
    at = int(diff[0]) if diff.size else n
    where = f"{len(da)} vs {len(db)} bytes, first difference at byte {at}"
    try:
        import gguf

        ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    except Exception:  # not a GGUF file (or a cut one): the offset is all there is
        return where
    if at < int(ra.data_offset):
        return f"{where}, in the header (metadata or tensor table)"
    def data(reader) -> dict[str, np.ndarray]:
        return {t.name: np.asarray(t.data).view(np.uint8).ravel() for t in reader.tensors}

    ta, tb = data(ra), data(rb)
    if ta.keys() != tb.keys():
        return f"{where}; tensors only in one file: {sorted(ta.keys() ^ tb.keys())[:3]}"
    parted = [(name, int((x != tb[name]).sum()) if x.shape == tb[name].shape else x.size)
              for name, x in ta.items() if not np.array_equal(x, tb[name])]
    names = ", ".join(f"{name} ({k} bytes)" for name, k in parted[:3])
    return f"{where}; {len(parted)} tensors differ, first {names}"


def assert_same_file(a: Path, b: Path) -> None:
    where = first_difference(a, b)
    assert where is None, f"{a} and {b} differ: {where}"
