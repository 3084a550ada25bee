"""scripts/calib_transfer.py reduced: a tiny model, two sources, two domains, rtn and gptq.

rtn takes no calibration, so its rows must equal llama.cpp's file on every
domain (ratio exactly 1); the ratios to llama.cpp+imatrix are taken against the
importance matrix of the same source, and that matrix must change the file.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import pytest
from tiny import build_tiny_model

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "calib_transfer.py"
SOURCES = ("builtin", "generated")
DOMAINS = ("builtin", "news")
METHODS = ("rtn", "gptq", "gptq@gptq_target=layer")  # a method with options (scripts/benchmark.py's spec)


@pytest.fixture(scope="module")
def run(smollm2_dir, tmp_path_factory):
    spec = importlib.util.spec_from_file_location("calib_transfer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    root = tmp_path_factory.mktemp("transfer")
    model = build_tiny_model(root / "llama", "llama", smollm2_dir, hidden=64)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = module.main(["--model", str(model), "--methods", ",".join(METHODS), "--sources", ";".join(SOURCES),
                          "--domains", ",".join(DOMAINS), "--calib-samples", "4", "--calib-seqlen", "64",
                          "--ctx", "64", "--windows", "2", "--threads", "1", "--out-dir", str(root / "out")])
    assert rc == 0
    results = json.loads((root / "out" / "results.json").read_text())
    return root / "out", buf.getvalue(), {r["file"]: r for r in results["rows"]}


def test_rows_are_llama_cpp_then_imatrix_and_methods_per_source(run):
    _, out, rows = run
    expected = ["llama.cpp"] + [f"{m} [{s}]" for s in SOURCES for m in ("llama.cpp+imatrix", *METHODS)]
    assert list(rows) == expected
    table = [ln for ln in out.splitlines() if ln.startswith("| ")]
    assert [ln.split("|")[1].strip() for ln in table[1:]] == expected


def test_rtn_equals_llama_cpp_on_every_domain(run):
    _, _, rows = run
    for s in SOURCES:
        rtn = rows[f"rtn [{s}]"]
        assert rtn["kld"] == rows["llama.cpp"]["kld"]
        assert rtn["ratio"] == {d: 1.0 for d in DOMAINS} and rtn["transfer"] == 1.0


def test_ratios_are_to_the_same_source_and_the_imatrix_is_used(run):
    _, _, rows = run
    for s in SOURCES:
        imx, gptq = rows[f"llama.cpp+imatrix [{s}]"], rows[f"gptq [{s}]"]
        assert imx["kld"] != rows["llama.cpp"]["kld"]  # the importance matrix reached llama-quantize
        for d in DOMAINS:
            assert gptq["ratio_imatrix"][d] == pytest.approx(gptq["kld"][d] / imx["kld"][d], rel=1e-12)
            assert gptq["ratio"][d] == pytest.approx(gptq["kld"][d] / rows["llama.cpp"]["kld"][d], rel=1e-12)
        assert gptq["transfer"] == pytest.approx(gptq["ratio"]["news"] / gptq["ratio"]["builtin"], rel=1e-12)
    assert rows["gptq [builtin]"]["kld"] != rows["gptq [generated]"]["kld"]  # the source reached the method
    for s in SOURCES:  # the option reached the method, and its report tells where the time went
        assert rows[f"gptq@gptq_target=layer [{s}]"]["kld"] != rows[f"gptq [{s}]"]["kld"]
        report = json.loads(Path(rows[f"gptq@gptq_target=layer [{s}]"]["path"]).with_suffix(".report.json").read_text())
        assert report["method"] == "gptq" and report["stages"]["forward"] > 0


def test_plot_and_table_written(run):
    out_dir, _, _ = run
    assert (out_dir / "transfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out_dir / "table.md").read_text().count("\n") == 2 + 1 + (1 + len(METHODS)) * len(SOURCES)
