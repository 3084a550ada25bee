"""The fast tensor-table reader that checks every written file agrees with gguf-py's GGUFReader."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from llmquant.export.gguf_table import GGUFTableError, read_tensor_table


def _reference(path):
    r = gguf.GGUFReader(path)
    tensors = [(t.name, tuple(int(d) for d in reversed(t.shape)), t.tensor_type, int(t.data_offset), int(t.n_bytes))
               for t in r.tensors]
    return int(r.data_offset), int(r.alignment), tensors


def _ours(path):
    t = read_tensor_table(path)
    return t.data_offset, t.alignment, [(e.name, e.shape, e.type, t.data_offset + e.offset, e.n_bytes)
                                        for e in t.tensors]


def _write(path, alignment: int | None = None) -> None:
    """A file with every metadata value type, string and nested arrays, and tensors of several types."""
    w = gguf.GGUFWriter(path, "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 7)
    w.add_int8("t.i8", -7)
    w.add_uint16("t.u16", 700)
    w.add_int16("t.i16", -700)
    w.add_uint32("t.u32", 70000)
    w.add_int32("t.i32", -70000)
    w.add_float32("t.f32", 1.5)
    w.add_uint64("t.u64", 1 << 40)
    w.add_int64("t.i64", -(1 << 40))
    w.add_float64("t.f64", 2.25)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo")
    w.add_array("t.strs", ["a", "", "ünïcode", "x" * 300])
    w.add_array("t.ints", list(range(1000)))
    w.add_array("t.nested", [[1, 2], [3]])
    rng = np.random.default_rng(0)
    w.add_tensor("a.f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("b.f16", rng.standard_normal((2, 64)).astype(np.float16))
    q = gguf.quants.quantize(rng.standard_normal((4, 256)).astype(np.float32), gguf.GGMLQuantizationType.Q4_0)
    w.add_tensor("c.q4_0", q, raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    w.add_tensor("d.vec", rng.standard_normal(7).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("alignment", [None, 64, 8])
def test_table_equals_gguf_reader(tmp_path, alignment):
    path = tmp_path / "m.gguf"
    _write(path, alignment)
    assert _ours(path) == _reference(path)
    assert read_tensor_table(path).alignment == (alignment or gguf.GGUF_DEFAULT_ALIGNMENT)


def test_table_of_a_written_model_equals_gguf_reader(smollm2_dir, tmp_path):
    """A real tokenizer's 49k-token metadata, a k-quant recipe's mixed types."""
    from llmquant import quantize

    out = tmp_path / "m.gguf"
    quantize(smollm2_dir, out, type="Q4_K_M", progress=False)
    assert _ours(out) == _reference(out)


def test_malformed_files_are_refused(tmp_path):
    path = tmp_path / "m.gguf"
    _write(path)
    data = path.read_bytes()
    cases = {"bad magic": b"GGUX" + data[4:], "truncated": data[:200], "empty": b"",
             "version": data[:4] + (9).to_bytes(4, "little") + data[8:]}
    for what, blob in cases.items():
        bad = tmp_path / f"{what}.gguf"
        bad.write_bytes(blob)
        with pytest.raises(GGUFTableError):
            read_tensor_table(bad)
