"""scripts/benchmark.py end to end in its --subset mode (default model, rtn only)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
# One thread: on a shared 2-core machine llama.cpp's spinning worker threads are
# several times slower than one thread when the cores are oversubscribed.
ARGS = ["--subset", "--methods", "rtn", "--threads", "1"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(out: str) -> dict[tuple[str, str], dict[str, str]]:
    lines = [ln for ln in out.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")), strict=True)) for ln in lines[2:]]
    return {(r["type"], r["method"]): r for r in rows}


@pytest.fixture(scope="module")
def first_run(bench, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = bench.main([*ARGS, "--out-dir", str(out_dir)])
    assert rc == 0
    return out_dir, buf.getvalue()


def test_subset_table_rtn_equals_llama_cpp(first_run):
    out_dir, out = first_run
    rows = table_rows(out)
    assert set(rows) == {("f32", "reference"), ("q8_0", "llama.cpp"), ("q8_0", "rtn"),
                         ("q4_0", "llama.cpp"), ("q4_0", "rtn")}
    assert rows["f32", "reference"]["Δppl"] == "+0.0000"
    for t in ("q8_0", "q4_0"):
        ours, theirs = rows[t, "rtn"], rows[t, "llama.cpp"]
        assert ours["KLD ratio"] == "1.000" and ours["size ratio"] == "1.0000"
        assert ours["ppl"] == theirs["ppl"] and ours["KLD"] == theirs["KLD"]


def test_results_json_and_plot(first_run):
    out_dir, _ = first_run
    data = json.loads((out_dir / "results.json").read_text())
    info = data["run"]
    assert info["ctx"] == 128 and info["windows"] == 2 and info["tokens"] == 2 * 63
    assert {"machine", "nproc", "date", "command", "model"} <= info.keys()
    rows = {(r["type"], r["method"]): r for r in data["rows"]}
    assert len(rows) == 5
    for t in ("q8_0", "q4_0"):
        ours, theirs = rows[t, "rtn"], rows[t, "llama.cpp"]
        # RTN files are byte-identical to llama.cpp's: exactly the same size and KLD
        assert ours["file_size"] == theirs["file_size"] == Path(ours["file"]).stat().st_size
        assert ours["kld"] == theirs["kld"] > 0
        assert ours["quant_seconds"] > 0 and ours["peak_mib"] > 0
    assert rows["q4_0", "rtn"]["kld"] > rows["q8_0", "rtn"]["kld"]
    assert rows["f32", "reference"]["kld"] is None
    png = out_dir / "kld_vs_bpw.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_second_run_skips_everything(bench, first_run, monkeypatch, capsys):
    out_dir, out = first_run
    before = json.loads((out_dir / "results.json").read_text())["rows"]

    def fail(*args, **kwargs):
        raise AssertionError("a finished row was redone")

    monkeypatch.setattr(bench, "run_quantization", fail)
    monkeypatch.setattr(bench, "evaluate", fail)
    assert bench.main([*ARGS, "--out-dir", str(out_dir)]) == 0
    again = capsys.readouterr()
    assert table_rows(again.out) == table_rows(out)
    assert again.err.count("skip") == 5
    assert json.loads((out_dir / "results.json").read_text())["rows"] == before


def test_unknown_method_fails_before_any_work(bench, tmp_path, capsys):
    out_dir = tmp_path / "never"
    assert bench.main(["--subset", "--methods", "rtn,awq9", "--out-dir", str(out_dir)]) == 2
    assert "unknown method 'awq9'" in capsys.readouterr().err
    assert not out_dir.exists()
