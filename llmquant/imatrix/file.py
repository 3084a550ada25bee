"""Importance-matrix files as llama.cpp reads them: its GGUF format and the legacy ``.dat``.

Facts carried over from the pinned llama.cpp (``tools/imatrix/imatrix.cpp``
``save_imatrix`` / ``save_imatrix_legacy``, ``common/imatrix-loader.cpp``
``common_imatrix_load``, ``tools/quantize/quantize.cpp`` ``load_imatrix``):

- GGUF: ``general.type = "imatrix"``; ``imatrix.datasets`` (array of strings),
  ``imatrix.chunk_count`` and ``imatrix.chunk_size`` (u32). llama-quantize
  refuses a GGUF imatrix without all three keys. Per weight ``W`` (its GGUF
  name, e.g. ``blk.0.attn_q.weight``) two F32 tensors, names sorted:
  ``W.in_sum2`` with ggml shape [ci, n_mat] (the raw sum of x² over every
  token, per input column) and ``W.counts`` [1, n_mat] (the token count, a
  float the loader rounds). n_mat is 1 for a 2-D weight, the expert count for
  a 3-D one.
- llama-quantize's importance of a column is ``in_sum2 / count`` (the mean
  x²); a matrix whose count is 0 gets importance 1 everywhere.
- Legacy .dat: int32 n_entries; per entry int32 name length, the name, int32
  ncall, int32 nval, float32[nval] holding ``mean x² * ncall`` where ncall is
  the token count in chunks (rounded up); then int32 chunk count, int32
  length and the dataset name. Its importance is ``values / ncall``.

``read_imatrix`` accepts either (as llama.cpp does: a file that is not a
GGUF is tried as .dat) and checks it against the model it is meant for.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LlmquantError

SUM2, COUNTS = ".in_sum2", ".counts"
KEY_TYPE, KEY_DATASETS = "general.type", "imatrix.datasets"
KEY_CHUNK_COUNT, KEY_CHUNK_SIZE = "imatrix.chunk_count", "imatrix.chunk_size"


@dataclass(frozen=True)
class ImatrixEntry:
    """One weight's statistics: sum2 float32 [ci] (sum of x² per input column) over ``count`` tokens."""

    sum2: np.ndarray
    count: int


def write_imatrix(path: Path, entries: dict[str, ImatrixEntry], *, chunk_count: int, chunk_size: int,
                  datasets: list[str], arch: str, legacy: bool = False) -> Path:
    """Write ``entries`` (GGUF tensor name -> statistics) to ``path``, whole or not at all.

    The file appears under its name only once complete: written beside it, synced, renamed.
    arch: gguf-py's writer always records ``general.architecture``; llama.cpp ignores it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        if legacy:
            tmp.write_bytes(_legacy_bytes(entries, chunk_count, chunk_size, datasets[-1] if datasets else ""))
        else:
            _write_gguf(tmp, entries, chunk_count, chunk_size, datasets, arch)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise LlmquantError(f"cannot write the imatrix {path}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _write_gguf(path: Path, entries: dict[str, ImatrixEntry], chunk_count: int, chunk_size: int,
                datasets: list[str], arch: str) -> None:
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    writer.add_string(KEY_TYPE, "imatrix")
    writer.add_array(KEY_DATASETS, list(datasets))
    writer.add_uint32(KEY_CHUNK_COUNT, chunk_count)
    writer.add_uint32(KEY_CHUNK_SIZE, chunk_size)
    for name in sorted(entries):  # llama-imatrix sorts too: the same input gives the same bytes
        e = entries[name]
        # ggml's [ci, 1] and [1, 1]: llama-imatrix's files record them with their trailing 1s dropped
        writer.add_tensor(name + SUM2, np.asarray(e.sum2, dtype=np.float32).reshape(-1))
        writer.add_tensor(name + COUNTS, np.full(1, e.count, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _legacy_bytes(entries: dict[str, ImatrixEntry], chunk_count: int, chunk_size: int, dataset: str) -> bytes:
    parts = [struct.pack("<i", len(entries))]
    for name in sorted(entries):
        e = entries[name]
        # ncall: the token count in chunks, rounded up (as llama-imatrix does, so no entry gets 0);
        # an entry without tokens stores 1s, llama-imatrix's "partial data" rule
        ncall = max(1, -(-e.count // chunk_size))
        sum2 = np.asarray(e.sum2, dtype=np.float32)
        mean = sum2 / np.float32(e.count) if e.count else np.ones_like(sum2)
        raw = name.encode()
        parts += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, sum2.size),
                  (mean * np.float32(ncall)).astype("<f4").tobytes()]
    ds = dataset.encode()
    parts += [struct.pack("<ii", chunk_count, len(ds)), ds]
    return b"".join(parts)


@dataclass(frozen=True)
class ImatrixSource:
    """Where an imatrix came from, as llama-quantize records it in the quantized file's metadata."""

    datasets: list[str]
    chunk_count: int  # 0 where the file does not say


class Imatrix(dict):
    """GGUF weight name -> (importance float32 [ci], token count), and where the file came from.

    A dict, so callers index it by weight; ``source`` is read in the same pass
    (what ``quantize.imatrix.*`` records), not by opening the file again.
    """

    def __init__(self, entries: dict[str, tuple[np.ndarray, int]], source: ImatrixSource) -> None:
        super().__init__(entries)
        self.source = source


def read_imatrix(path: Path | str, expected: dict[str, int]) -> Imatrix:
    """The importance llama-quantize would use, checked against the model it is meant for.

    expected: GGUF weight name -> its input width ci, for every weight of the model the
    imatrix may cover. Returns name -> (importance float32 [ci], token count; for a legacy
    .dat, which keeps no token count, its ncall: the count in chunks) for the entries of the file (a weight it does not cover, such as ``output.weight`` by
    default, is simply absent). A file that is not an imatrix, is cut short, or names
    a weight the model lacks or of another width is refused in one line.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise LlmquantError(f"cannot read the imatrix {path}: {exc.strerror or exc}") from None
    raw, source = _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)
    if not raw:
        raise LlmquantError(f"imatrix {path} holds no entries")
    out = {}
    for name, (values, count, legacy) in sorted(raw.items()):
        if name not in expected:
            raise LlmquantError(f"imatrix {path} has an entry for {name}, which this model does not have: "
                                "it was computed for another model")
        if values.size != expected[name]:
            raise LlmquantError(f"imatrix {path} has {values.size} columns for {name}, the model's tensor has "
                                f"{expected[name]}: it was computed for another model")
        if not np.all(np.isfinite(values)) or np.any(values < 0):
            raise LlmquantError(f"imatrix {path} has non-finite or negative values for {name}")
        if legacy:
            importance = values / np.float32(count) if count > 0 else values
        else:
            importance = values / np.float32(count) if count > 0 else np.ones_like(values)
        out[name] = (importance.astype(np.float32), count)
    return Imatrix(out, source)


def _read_gguf(path: Path) -> tuple[dict[str, tuple[np.ndarray, int, bool]], ImatrixSource]:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - gguf-py raises ValueError, IndexError, struct.error... on a cut file
        raise LlmquantError(f"imatrix {path} is not a readable GGUF (truncated or corrupt: {exc})") from None
    kind = reader.get_field(KEY_TYPE)
    kind = kind.contents() if kind is not None else None
    if kind != "imatrix":
        raise LlmquantError(f"{path} is a GGUF with general.type={kind!r}, not an importance matrix "
                            "(llama-imatrix writes general.type='imatrix')")
    missing = [k for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE) if reader.get_field(k) is None]
    if missing:
        raise LlmquantError(f"imatrix {path} lacks {', '.join(missing)}; llama-quantize refuses it too")
    tensors = {t.name: t for t in reader.tensors}
    out = {}
    for tname, t in tensors.items():
        if not tname.endswith(SUM2):
            if not tname.endswith(COUNTS):
                raise LlmquantError(f"imatrix {path} has a tensor {tname} that is neither {SUM2} nor {COUNTS}")
            if tname[:-len(COUNTS)] + SUM2 not in tensors:
                raise LlmquantError(f"imatrix {path} has {tname} without its {SUM2}")
            continue
        name = tname[:-len(SUM2)]
        c = tensors.get(name + COUNTS)
        if c is None:
            raise LlmquantError(f"imatrix {path} has {tname} without its {COUNTS}")
        if t.tensor_type != gguf.GGMLQuantizationType.F32 or c.tensor_type != gguf.GGMLQuantizationType.F32:
            raise LlmquantError(f"imatrix {path}: {name}'s sums and counts must be F32")
        n_mat = int(c.n_elements)
        if n_mat != 1:
            raise LlmquantError(f"imatrix {path} has {n_mat} matrices (experts) for {name}; "
                                "llmquant's architectures have one per weight: it was computed for another model")
        out[name] = (np.array(t.data, dtype=np.float32).reshape(-1), int(np.rint(np.asarray(c.data).reshape(-1)[0])),
                     False)
    source = ImatrixSource(list(reader.get_field(KEY_DATASETS).contents()),
                           int(reader.get_field(KEY_CHUNK_COUNT).contents()))
    return out, source


def _read_legacy(path: Path) -> tuple[dict[str, tuple[np.ndarray, int, bool]], ImatrixSource]:
    data = path.read_bytes()
    entries, pos = _legacy_entries(path, data)
    if pos + 8 > len(data):  # llama.cpp's older files may end after the entries
        return entries, ImatrixSource([], 0)
    chunks, length = struct.unpack_from("<ii", data, pos)
    name = data[pos + 8:pos + 8 + max(length, 0)].decode(errors="replace")
    return entries, ImatrixSource([name] if name else [], max(chunks, 0))


def _legacy_entries(path: Path, data: bytes) -> tuple[dict[str, tuple[np.ndarray, int, bool]], int]:
    bad = LlmquantError(f"{path} is neither a GGUF imatrix nor a legacy .dat imatrix (or it is cut short)")
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise bad
        pos += n
        return data[pos - n:pos]

    (n_entries,) = struct.unpack("<i", take(4))
    if n_entries < 1 or n_entries > len(data) // 16:
        raise bad
    out = {}
    for _ in range(n_entries):
        (length,) = struct.unpack("<i", take(4))
        if length < 1:
            raise bad
        try:
            name = take(length).decode()
        except UnicodeDecodeError:
            raise bad from None
        ncall, nval = struct.unpack("<ii", take(8))
        if nval < 1:
            raise bad
        out[name] = (np.frombuffer(take(4 * nval), dtype="<f4").astype(np.float32), ncall, True)
    return out, pos
