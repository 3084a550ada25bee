"""scripts/benchmark.py end to end in its --subset mode (default model, rtn only, plus llama.cpp+imatrix).

The llama.cpp+imatrix series needs llama-imatrix and llama-quantize: the first
run on a machine builds them once into $LLMQUANT_CACHE (several minutes).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
IMX = "llama.cpp+imatrix"
OURS = "rtn+imatrix"
# One thread: on a shared 2-core machine llama.cpp's spinning worker threads are
# several times slower than one thread when the cores are oversubscribed.
ARGS = ["--subset", "--methods", f"rtn,{OURS}", "--threads", "1"]


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
    assert set(rows) == {("f32", "reference"), ("q8_0", "llama.cpp"), ("q8_0", IMX), ("q8_0", "rtn"), ("q8_0", OURS),
                         ("q4_0", "llama.cpp"), ("q4_0", IMX), ("q4_0", "rtn"), ("q4_0", OURS)}
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
    assert len(rows) == 9
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


def test_imatrix_series(first_run):
    """llama-imatrix ran once on the subset's 4 x 128 calibration windows; its q4_0 file has other
    codes (and llama.cpp's imatrix variant of the recipe); both KLD ratio columns agree with the KLDs."""
    import gguf

    out_dir, out = first_run
    data = json.loads((out_dir / "results.json").read_text())
    info = data["run"]
    assert info["imatrix"] is True and info["imatrix_chunks"] == 4 and info["imatrix_ctx"] == 128
    imatrix = Path(info["imatrix_file"])
    reader = gguf.GGUFReader(imatrix)
    assert reader.get_field("general.type").contents() == "imatrix"
    assert reader.get_field("imatrix.chunk_count").contents() == 4
    rows = {(r["type"], r["method"]): r for r in data["rows"]}

    def tensors(row):
        return {t.name: (int(t.tensor_type), bytes(t.data.tobytes())) for t in gguf.GGUFReader(row["file"]).tensors}

    plain, imx = tensors(rows["q4_0", "llama.cpp"]), tensors(rows["q4_0", IMX])
    assert set(imx) == set(plain)
    # llama.cpp's q4_0 recipe differs when it has an imatrix: ffn_down of the first n_layer/8
    # layers goes to q4_1 ("guard against craziness", src/llama-quant.cpp); every other tensor keeps its type
    n_layer = 1 + max(int(n.split(".")[1]) for n in plain if n.startswith("blk."))
    guarded = {f"blk.{i}.ffn_down.weight" for i in range(n_layer // 8)}
    assert len(guarded) == 3  # SmolLM2: 30 layers
    q4_0, q4_1 = int(gguf.GGMLQuantizationType.Q4_0), int(gguf.GGMLQuantizationType.Q4_1)
    assert {n for n in plain if imx[n][0] != plain[n][0]} == guarded
    assert all(plain[n][0] == q4_0 and imx[n][0] == q4_1 for n in guarded)
    same = [n for n in plain if n not in guarded]
    assert all(len(imx[n][1]) == len(plain[n][1]) for n in same)
    moved = [n for n in same if imx[n][1] != plain[n][1]]
    assert moved and all(plain[n][0] == q4_0 for n in moved)  # the imatrix moved q4_0 codes, only those
    assert rows["q4_0", IMX]["bits_per_weight"] > rows["q4_0", "llama.cpp"]["bits_per_weight"]
    assert rows["q4_0", IMX]["kld"] != rows["q4_0", "llama.cpp"]["kld"]
    # q8_0 has no use for an imatrix: the same tensors, the same KLD
    assert tensors(rows["q8_0", IMX]) == tensors(rows["q8_0", "llama.cpp"])
    assert rows["q8_0", IMX]["kld"] == rows["q8_0", "llama.cpp"]["kld"]
    table = table_rows(out)
    for (t, m), r in rows.items():
        if m == "reference":
            assert r["kld_ratio_imatrix"] is None and table[t, m]["KLD ratio imatrix"] == "-"
            continue
        assert r["kld_ratio"] == pytest.approx(r["kld"] / rows[t, "llama.cpp"]["kld"], rel=1e-12)
        assert r["kld_ratio_imatrix"] == pytest.approx(r["kld"] / rows[t, IMX]["kld"], rel=1e-12)
        assert table[t, m]["KLD ratio imatrix"] == format(r["kld_ratio_imatrix"], ".3f")
    assert rows["q4_0", IMX]["kld_ratio_imatrix"] == 1.0
    assert rows["q4_0", "rtn"]["kld_ratio_imatrix"] == pytest.approx(
        rows["q4_0", "rtn"]["kld_ratio"] * rows["q4_0", "llama.cpp"]["kld"] / rows["q4_0", IMX]["kld"])


def test_our_imatrix_series_is_llama_cpps_pipeline_streamed(first_run, tmp_path):
    """rtn+imatrix is llmquant's streamed imatrix on the same windows, then quantize --imatrix:
    llama-quantize given our imatrix file writes exactly our file's tensors; against llama.cpp's own
    pipeline the only difference is the imatrix values (llama-imatrix keeps K/V in f16), so the plan
    and the size are the same and the KLDs nearly so."""
    import gguf

    from llmquant.eval.llamacpp_tools import quantize_with_imatrix

    out_dir, _ = first_run
    data = json.loads((out_dir / "results.json").read_text())
    info, rows = data["run"], {(r["type"], r["method"]): r for r in data["rows"]}
    assert info["our_imatrix_chunks"] == 4 and info["our_imatrix_seconds"] > 0

    def tensors(path):
        return {t.name: (int(t.tensor_type), bytes(t.data.tobytes())) for t in gguf.GGUFReader(path).tensors}

    ours, theirs = rows["q4_0", OURS], rows["q4_0", IMX]
    lq = quantize_with_imatrix(rows["f32", "reference"]["file"], tmp_path / "lq.gguf", "q4_0",
                               info["our_imatrix_file"], threads=1)
    assert tensors(lq) == tensors(ours["file"])
    mine, llama = tensors(ours["file"]), tensors(theirs["file"])
    assert {n: t for n, (t, _) in mine.items()} == {n: t for n, (t, _) in llama.items()}
    assert ours["bits_per_weight"] == theirs["bits_per_weight"]
    assert mine != tensors(rows["q4_0", "rtn"]["file"])
    assert abs(ours["kld_ratio_imatrix"] - 1) < 0.05 and ours["kld_ratio"] < 0.9
    assert tensors(rows["q8_0", OURS]["file"]) == tensors(rows["q8_0", "rtn"]["file"])  # q8_0 ignores it
    # the two imatrices of the real model: every weight, the same token counts, values within the f16
    # K/V cache's rounding (llama-imatrix's default)
    import numpy as np

    from llmquant.imatrix import read_imatrix

    f32 = gguf.GGUFReader(rows["f32", "reference"]["file"])
    columns = {t.name: int(t.shape[0]) for t in f32.tensors if len(t.shape) == 2}
    mine, llama = read_imatrix(info["our_imatrix_file"], columns), read_imatrix(info["imatrix_file"], columns)
    assert mine.keys() == llama.keys() and len(mine) == 7 * 30
    for name in mine:
        assert mine[name][1] == llama[name][1] == 4 * 128
        np.testing.assert_allclose(mine[name][0], llama[name][0], rtol=5e-3, err_msg=name)


def test_imatrix_saw_llmquants_calibration_windows(bench, first_run, smollm2_dir):
    """The text fed to llama-imatrix tokenizes, in llama.cpp, to exactly the windows gptq/awq calibrate on."""
    import llama_cpp

    from llmquant.calibration import CalibrationConfig, calibration_tokens

    out_dir, _ = first_run
    info = json.loads((out_dir / "results.json").read_text())["run"]
    windows = calibration_tokens(smollm2_dir, CalibrationConfig(samples=4, seqlen=128, source="builtin"))
    text = Path(info["imatrix_text"]).read_text(encoding="utf-8")
    f32 = next(r["file"] for r in json.loads((out_dir / "results.json").read_text())["rows"]
               if r["method"] == "reference")
    llm = llama_cpp.Llama(model_path=f32, vocab_only=True, verbose=False)
    ids = llm.tokenize(text.encode(), add_bos=False, special=False)
    assert ids[: windows.numel()] == windows.flatten().tolist()
    assert len(ids) >= windows.numel() + 64  # the padding after the last window


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
    assert again.err.count("skip") == 9
    assert "llama-imatrix on" not in again.err  # the imatrices are not recomputed either
    assert "llmquant imatrix on" not in again.err
    assert json.loads((out_dir / "results.json").read_text())["rows"] == before


def test_unknown_method_fails_before_any_work(bench, tmp_path, capsys):
    out_dir = tmp_path / "never"
    assert bench.main(["--subset", "--methods", "rtn,awq9", "--out-dir", str(out_dir)]) == 2
    assert "unknown method 'awq9'" in capsys.readouterr().err
    assert not out_dir.exists()


def test_no_imatrix_drops_the_series(bench, first_run, capsys):
    out_dir, out = first_run
    assert bench.main([*ARGS, "--no-imatrix", "--out-dir", str(out_dir)]) == 0
    again = capsys.readouterr()
    rows = table_rows(again.out)
    assert set(rows) == {k for k in table_rows(out) if k[1] != IMX}
    assert all(r["KLD ratio imatrix"] == "-" for r in rows.values())
    assert again.err.count("skip") == 7


def test_kquant_recipe_names(bench, tmp_path, capsys):
    import llama_cpp

    for name, ftype in bench.FTYPES.items():
        assert getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name.upper()}") == ftype
    args = bench.parse_args(["--types", "q4_k_m, Q6_K,q3_k_l,Q4_0", "--out-dir", str(tmp_path / "x")])
    assert args.types == ["Q4_K_M", "Q6_K", "Q3_K_L", "q4_0"]
    plan = bench.plan_rows(args, {"rtn": False, "gptq": True})
    kq = [r for r in plan if r["type"] == "Q4_K_M"]
    assert [r["method"] for r in kq] == ["llama.cpp", IMX, "rtn", "gptq"]
    assert kq[0]["job"]["ftype"] == 15 and kq[1]["job"]["type"] == "Q4_K_M" and kq[2]["job"]["type"] == "Q4_K_M"
    assert bench.main(["--types", "q4_k_x", "--out-dir", str(tmp_path / "never")]) == 2
    assert "unsupported type(s) ['q4_k_x']" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_method_options_are_their_own_series(bench, tmp_path, capsys):
    args = bench.parse_args(["--types", "q4_0", "--methods", "gptq,gptq@damp=0.1@act_order=True",
                             "--out-dir", str(tmp_path / "x")])
    plan = bench.plan_rows(args, bench.check_args(args))
    ours = {r["method"]: r for r in plan if r["type"] == "q4_0" and r["method"].startswith("gptq")}
    assert ours["gptq"]["job"]["options"] is None
    tuned = ours["gptq@damp=0.1@act_order=True"]
    assert tuned["job"]["method"] == "gptq" and tuned["job"]["options"] == {"damp": 0.1, "act_order": True}
    assert tuned["file"] != ours["gptq"]["file"] and bench.row_key(tuned) != bench.row_key(ours["gptq"])
    assert bench.method_spec("awq+gptq+tune@target=model@steps=200") == ("awq+gptq+tune", {"target": "model", "steps": 200})
    for spec, expect in (("gptq@steps=3", "--tune-steps does not apply to --method gptq"),
                         ("gptq@damp=-1", "--damp must be at least 0"),
                         ("gptq@damp", "is not KEY=VALUE"), ("gptq@damp=x", "--damp must be a number, got 'x'"),
                         ("gptq@damp=", "has no value"), ("gptq@damp=1-", "is not a number, True/False or a word"),
                         ("tune@target=all", "--tune-target must be one of layer, model, got 'all'")):
        assert bench.main(["--types", "q4_0", "--methods", spec, "--out-dir", str(tmp_path / "never")]) == 2
        assert expect in capsys.readouterr().err, spec
    assert not (tmp_path / "never").exists()
