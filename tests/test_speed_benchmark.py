"""scripts/speed_benchmark.py on a tiny model: the rows, the ratio and the like-for-like check.

No time is asserted (timings live in docs/benchmarks.md); what is checked is what
the benchmark claims besides them: both quantizers wrote the same tensor data, the
ratio is the ratio of the medians, and every run is in the JSON.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest
from tiny import build_tiny_model

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "speed_benchmark.py"


@pytest.fixture(scope="module")
def speed():
    sys.path.insert(0, str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("speed_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_speed_rows_and_like_for_like(speed, smollm2_dir, tmp_path):
    model = build_tiny_model(tmp_path / "tiny", "llama", smollm2_dir, hidden=256, intermediate=512, layers=2)
    out_dir = tmp_path / "speed"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = speed.main(["--model", str(model), "--types", "Q4_K_M", "--repeats", "2", "--threads", "1",
                         "--out-dir", str(out_dir)])
    assert rc == 0
    got = json.loads((out_dir / "speed.json").read_text())
    rows = {(r["type"], r["quantizer"]): r for r in got["rows"]}
    assert set(rows) == {("Q4_K_M", q) for q in (speed.LLMQUANT, speed.LLAMA_CPP)}
    for t in ("Q4_K_M",):  # a recipe: llama.cpp's per-tensor types and its k-quant bytes
        ours, theirs = rows[t, speed.LLMQUANT], rows[t, speed.LLAMA_CPP]
        assert ours["same_tensor_data"] is True  # rtn writes llama.cpp's bytes, so the times compare like for like
        assert len(ours["seconds"]) == len(theirs["seconds"]) == 2
        assert ours["ratio"] == pytest.approx(ours["median_s"] / theirs["median_s"])
    assert (out_dir / "speed.png").stat().st_size > 0
    assert "| Q4_K_M | llmquant rtn |" in buf.getvalue()


def test_same_tensor_data_sees_one_changed_byte(speed, smollm2_dir, tmp_path):
    from llmquant import quantize
    from llmquant.export.gguf_table import read_tensor_table

    model = build_tiny_model(tmp_path / "tiny", "llama", smollm2_dir)
    a = tmp_path / "a.gguf"
    quantize(model, a, type="q8_0", progress=False)
    t = read_tensor_table(a)
    data = bytearray(a.read_bytes())
    last = t.tensors[-1]
    data[t.data_offset + last.offset + last.n_bytes - 1] ^= 1
    b = tmp_path / "b.gguf"
    b.write_bytes(bytes(data))
    assert speed.same_tensor_data(a, a)
    assert not speed.same_tensor_data(a, b)
