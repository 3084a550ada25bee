"""llmquant.imatrix against llama.cpp's own llama-imatrix and llama-quantize, on the same token windows.

The windows are llmquant's calibration windows; llama-imatrix gets them as the
text the benchmark writes for it (scripts/benchmark.py write_calibration_text,
imported, whose re-tokenization test_benchmark.py checks). The tiny model has
widths that are multiples of 256 so that Q4_K_M's k-quants (and their imatrix
searches) apply to every weight. Nothing of llama.cpp is mocked.
"""

from __future__ import annotations

import importlib.util
import subprocess
import types
from pathlib import Path

import gguf
import numpy as np
import pytest
from same_file import assert_same_file
from tiny import build_tiny_model

import llmquant
from llmquant.calibration import CalibrationConfig
from llmquant.errors import LlmquantError
from llmquant.generate import generate
from llmquant.imatrix import compute_imatrix, read_imatrix

N, CTX = 4, 64
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"


def _benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def case(tmp_path_factory, smollm2_dir):
    """The tiny model, its f32 GGUF, the calibration text, and the imatrix files of both tools."""
    from llmquant.eval import llamacpp_tools as lt

    d = tmp_path_factory.mktemp("imatrix")
    model = build_tiny_model(d / "tiny", "llama", smollm2_dir, hidden=256, intermediate=512, tied=False)
    f32 = llmquant.quantize(model, d / "tiny-f32.gguf", type="f32", progress=False).out
    text = d / "calib.txt"
    chunks = _benchmark().write_calibration_text(
        types.SimpleNamespace(model=str(model), calib_samples=N, calib_seqlen=CTX), text)
    assert chunks == N
    # llama-imatrix in f32 throughout: its K/V cache (f16 by default) and flash attention off
    f32_cache = d / "theirs-f32-cache.gguf"
    subprocess.run([str(lt.tool_path("llama-imatrix")), "-m", str(f32), "-f", text.name, "-o", str(f32_cache),
                    "--output-format", "gguf", "-c", str(CTX), "--chunks", str(N), "-t", "2", "-tb", "2",
                    "--no-ppl", "--process-output", "-fa", "off", "-ctk", "f32", "-ctv", "f32"],
                   cwd=d, check=True, capture_output=True, stdin=subprocess.DEVNULL)
    default = lt.compute_imatrix(f32, text, d / "theirs-default.gguf", ctx=CTX, chunks=N, threads=2)
    calib = CalibrationConfig(samples=N, seqlen=CTX, source="builtin")  # the benchmark's text, as llama-imatrix reads it
    ours = compute_imatrix(model, d / "ours.gguf", calibration=calib, process_output=True, progress=False)
    ours_dat = compute_imatrix(model, d / "ours.dat", calibration=calib, process_output=True, legacy=True,
                               progress=False)
    reader = gguf.GGUFReader(f32)
    columns = {t.name: int(t.shape[0]) for t in reader.tensors if len(t.shape) == 2}  # ggml ne[0] = ci
    return types.SimpleNamespace(dir=d, model=model, f32=f32, f32_cache=f32_cache, default=default, ours=ours,
                                 ours_dat=ours_dat.out, columns=columns)


def _fields(path: Path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: r.get_field(k).contents() for k in ("general.type", "imatrix.chunk_count", "imatrix.chunk_size")}


def test_values_agree_with_llama_imatrix_in_f32(case):
    """Every weight llama-imatrix collects (the head too, with --process-output), the same token counts,
    the same metadata; values within 1e-5: two f32 engines whose sums of 256 squares differ by rounding."""
    ours = read_imatrix(case.ours.out, case.columns)
    theirs = read_imatrix(case.f32_cache, case.columns)
    assert sorted(ours) == sorted(theirs)
    assert len(ours) == 2 * 7 + 1 and "output.weight" in ours and "token_embd.weight" not in ours
    assert _fields(case.ours.out) == _fields(case.f32_cache) == {
        "general.type": "imatrix", "imatrix.chunk_count": N, "imatrix.chunk_size": CTX}
    for name in ours:
        assert ours[name][1] == theirs[name][1] == N * CTX, name
        np.testing.assert_allclose(ours[name][0], theirs[name][0], rtol=1e-5, err_msg=name)
    # weights sharing an input share their statistics, as in llama.cpp
    np.testing.assert_array_equal(ours["blk.1.attn_q.weight"][0], ours["blk.1.attn_v.weight"][0])
    np.testing.assert_array_equal(ours["blk.0.ffn_gate.weight"][0], ours["blk.0.ffn_up.weight"][0])


def test_values_agree_with_the_benchmarks_llama_imatrix(case):
    """llama-imatrix as the benchmark runs it keeps K and V in f16: past the first attention the
    values move by about f16's precision (2^-11 per element), so 5e-3; before it, f32 exactly as above."""
    ours = read_imatrix(case.ours.out, case.columns)
    theirs = read_imatrix(case.default, case.columns)
    assert "output.weight" not in theirs  # no --process-output there
    for name, (imp, count) in theirs.items():
        assert ours[name][1] == count == N * CTX
        before_attention = name.startswith("blk.0.attn_") and name != "blk.0.attn_output.weight"
        np.testing.assert_allclose(ours[name][0], imp, rtol=1e-5 if before_attention else 5e-3, err_msg=name)
    worst = max(float(np.max(np.abs(ours[n][0] - theirs[n][0]) / theirs[n][0])) for n in theirs)
    assert worst > 1e-5  # the f16 cache does show: this comparison is not the f32 one again


def _blocks_differ(a: Path, b: Path) -> dict[str, float]:
    """Per quantized weight, the fraction of bytes that differ between two files of the same model."""
    ta = {t.name: t for t in gguf.GGUFReader(a).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(b).tensors}
    assert ta.keys() == tb.keys()
    return {n: float(np.mean(np.asarray(ta[n].data).view(np.uint8) != np.asarray(tb[n].data).view(np.uint8)))
            for n in ta if ta[n].tensor_type != gguf.GGMLQuantizationType.F32}


def test_llama_quantize_reads_our_imatrix(case):
    """llama-quantize --imatrix with our file gives a Q4_K_M that loads and generates, and whose codes are
    those of llama-imatrix's f32 file but for near-ties: not byte-equal, because llama-quantize's weighted
    searches flip a tie at a relative change of 1e-6 in the importance (llama.cpp's own file, perturbed by
    1e-6, moves as many bytes), while the file without an imatrix differs everywhere."""
    from llmquant.eval.llamacpp_tools import quantize_with_imatrix

    d = case.dir
    ours = quantize_with_imatrix(case.f32, d / "q-ours.gguf", "Q4_K_M", case.ours.out, threads=2)
    theirs = quantize_with_imatrix(case.f32, d / "q-theirs.gguf", "Q4_K_M", case.f32_cache, threads=2)
    plain = quantize_with_imatrix(case.f32, d / "q-plain.gguf", "Q4_K_M", None, threads=2)
    assert len(generate(ours, "Once upon a time", max_tokens=8)) > len("Once upon a time")
    near = _blocks_differ(ours, theirs)
    far = _blocks_differ(plain, theirs)
    weighted = [n for n in near if n != "token_embd.weight"]  # the embedding has no imatrix in either
    assert near["token_embd.weight"] == far["token_embd.weight"] == 0.0
    assert max(near[n] for n in weighted) < 0.005
    assert min(far[n] for n in weighted) > 0.05  # the imatrix is used, for the head too
    meta = gguf.GGUFReader(ours).get_field("quantize.imatrix.entries_count").contents()
    assert meta == 2 * 7 + 1


def test_legacy_dat_reads_back_and_quantizes(case):
    """The .dat stores mean x² times the chunk count: the same importance as the GGUF file, and
    llama-quantize takes it (the same codes but for near-ties, as above)."""
    from llmquant.eval.llamacpp_tools import quantize_with_imatrix

    assert case.ours_dat.read_bytes()[:4] != b"GGUF"
    dat = read_imatrix(case.ours_dat, case.columns)
    ours = read_imatrix(case.ours.out, case.columns)
    assert dat.keys() == ours.keys()
    # where the file came from, read in the same pass (what quantize.imatrix.* records)
    assert dat.source.chunk_count == ours.source.chunk_count == N
    assert dat.source.datasets == ours.source.datasets and len(ours.source.datasets) == 1
    for name in ours:
        assert dat[name][1] == N  # a .dat keeps the count in chunks
        np.testing.assert_allclose(dat[name][0], ours[name][0], rtol=1e-6, err_msg=name)
    q = quantize_with_imatrix(case.f32, case.dir / "q-dat.gguf", "Q4_K_M", case.ours_dat, threads=2)
    assert max(_blocks_differ(q, case.dir / "q-theirs.gguf").values()) < 0.005


def _refused(path: Path, columns: dict[str, int], match: str) -> None:
    with pytest.raises(LlmquantError, match=match) as info:
        read_imatrix(path, columns)
    assert "\n" not in str(info.value)


def test_broken_or_mismatched_files_are_refused_in_one_line(case, tmp_path):
    good = case.ours.out.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good[: len(good) // 2])
    _refused(cut, case.columns, "truncated or corrupt")
    _refused(case.f32, case.columns, "general.type='model', not an importance matrix")
    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"\x05\x00\x00\x00not an imatrix at all")
    _refused(junk, case.columns, "neither a GGUF imatrix nor a legacy .dat")
    cut_dat = tmp_path / "cut.dat"
    cut_dat.write_bytes(case.ours_dat.read_bytes()[:-3000])
    _refused(cut_dat, case.columns, "neither a GGUF imatrix nor a legacy .dat")
    _refused(tmp_path / "missing.gguf", case.columns, "cannot read the imatrix")
    # a file for another model: a weight this one lacks, or one of another width
    fewer = {n: c for n, c in case.columns.items() if n != "blk.1.ffn_down.weight"}
    _refused(case.ours.out, fewer, "entry for blk.1.ffn_down.weight, which this model does not have")
    _refused(case.f32_cache, fewer, "computed for another model")
    wider = {**case.columns, "blk.0.attn_q.weight": 512}
    _refused(case.ours.out, wider, "has 256 columns for blk.0.attn_q.weight, the model's tensor has 512")
    _refused(case.ours_dat, wider, "has 256 columns for blk.0.attn_q.weight")
    # and the good files are read (the refusals above are about the files, not the reader)
    assert len(read_imatrix(case.ours.out, case.columns)) == 15


def test_without_process_output_the_head_is_left_to_llama_quantize(case, tmp_path):
    """llama-imatrix's default: decoder weights only; llama-quantize then quantizes the head plainly."""
    calib = CalibrationConfig(samples=N, seqlen=CTX, source="builtin")
    ours = compute_imatrix(case.model, tmp_path / "no-head.gguf", calibration=calib, progress=False)
    read = read_imatrix(ours.out, case.columns)
    assert "output.weight" not in read and len(read) == 2 * 7
    assert read.keys() == read_imatrix(case.default, case.columns).keys()


def _types_and_bytes_equal(a: Path, b: Path) -> dict[str, float]:
    ta = {t.name: t.tensor_type for t in gguf.GGUFReader(a).tensors}
    tb = {t.name: t.tensor_type for t in gguf.GGUFReader(b).tensors}
    assert ta == tb, {n: (ta[n].name, tb[n].name) for n in ta if ta[n] != tb.get(n)}
    return _blocks_differ(a, b)


@pytest.mark.parametrize("ftype", ["q4_0", "q5_1", "Q2_K", "Q4_K_M", "Q6_K"])
def test_rtn_with_imatrix_is_llama_quantize_byte_for_byte(case, ftype):
    """``quantize --imatrix`` with llama-imatrix's own file: every tensor's type and bytes are
    llama-quantize's with that file (the head too: it has an entry), k-quants and legacy types alike."""
    from llmquant.eval.llamacpp_tools import quantize_with_imatrix

    d = case.dir
    theirs = quantize_with_imatrix(case.f32, d / f"lq-{ftype}.gguf", ftype, case.f32_cache, threads=2)
    ours = llmquant.quantize(case.model, d / f"rtn-im-{ftype}.gguf", type=ftype, imatrix=case.f32_cache,
                             progress=False)
    differ = _types_and_bytes_equal(ours.out, theirs)
    assert differ and max(differ.values()) == 0.0, {n: v for n, v in differ.items() if v}
    assert ours.imatrix_tensors == 15
    r = gguf.GGUFReader(ours.out)
    assert r.get_field("quantize.imatrix.entries_count").contents() == 15
    assert r.get_field("quantize.imatrix.chunks_count").contents() == N


def test_rtn_with_our_dat_imatrix_matches_llama_quantize_and_differs_from_plain(case):
    """The legacy .dat path too; and the imatrix changes the file (it is not ignored)."""
    from llmquant.eval.llamacpp_tools import quantize_with_imatrix

    d = case.dir
    theirs = quantize_with_imatrix(case.f32, d / "lq-dat-q4_k_m.gguf", "Q4_K_M", case.ours_dat, threads=2)
    ours = llmquant.quantize(case.model, d / "rtn-dat-q4_k_m.gguf", type="Q4_K_M", imatrix=case.ours_dat,
                             progress=False).out
    assert max(_types_and_bytes_equal(ours, theirs).values()) == 0.0
    plain = llmquant.quantize(case.model, d / "rtn-plain-q4_k_m.gguf", type="Q4_K_M", progress=False).out
    changed = _blocks_differ(ours, plain)
    assert changed["token_embd.weight"] == 0.0  # no entry for the embedding
    assert min(v for n, v in changed.items() if n != "token_embd.weight") > 0.05
    assert len(generate(ours, "Once upon a time", max_tokens=8)) > len("Once upon a time")


def test_with_an_imatrix_q4_0_guards_the_first_ffn_down_layers(tmp_path, smollm2_dir):
    """llama.cpp's plan changes with an imatrix: q4_0 (q5_0) writes the first n_layer/8 ffn_down
    in q4_1 (q5_1); the same types, tensor for tensor, and the same bytes as llama-quantize."""
    from llmquant.eval.llamacpp_tools import quantize_with_imatrix

    model = build_tiny_model(tmp_path / "tiny16", "llama", smollm2_dir, hidden=64, intermediate=128, layers=16)
    f32 = llmquant.quantize(model, tmp_path / "f32.gguf", type="f32", progress=False).out
    im = compute_imatrix(model, tmp_path / "im.gguf", calibration=CalibrationConfig(samples=2, seqlen=32),
                         progress=False).out
    for ftype, guard in (("q4_0", "q4_1"), ("q5_0", "q5_1")):
        ours = llmquant.quantize(model, tmp_path / f"{ftype}.gguf", type=ftype, imatrix=im, progress=False)
        types_ = {t.name: t.type for t in ours.tensors}
        assert [types_[f"blk.{i}.ffn_down.weight"] for i in range(3)] == [guard, guard, ftype]
        theirs = quantize_with_imatrix(f32, tmp_path / f"lq-{ftype}.gguf", ftype, im, threads=2)
        assert max(_types_and_bytes_equal(ours.out, theirs).values()) == 0.0
        plain = llmquant.quantize(model, tmp_path / f"plain-{ftype}.gguf", type=ftype, progress=False)
        assert {t.name: t.type for t in plain.tensors}["blk.0.ffn_down.weight"] == ftype


def test_imatrix_with_a_calibrated_method_or_another_model_is_refused(case, tmp_path, smollm2_dir):
    with pytest.raises(LlmquantError, match="use --method rtn with --imatrix"):
        llmquant.quantize(case.model, tmp_path / "x.gguf", type="q4_0", method="gptq", imatrix=case.ours.out,
                          progress=False)
    other = build_tiny_model(tmp_path / "wider", "llama", smollm2_dir, hidden=128, intermediate=256)
    with pytest.raises(LlmquantError, match="computed for another model"):
        llmquant.quantize(other, tmp_path / "y.gguf", type="q4_0", imatrix=case.ours.out, progress=False)
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()


def test_the_imatrix_command_writes_what_compute_imatrix_writes(case, tmp_path, capsys):
    from llmquant.cli import main

    out = tmp_path / "cli.imatrix.gguf"
    rc = main(["imatrix", str(case.model), "--out", str(out), "--calib-samples", str(N), "--calib-seqlen", str(CTX),
               "--calib-source", "builtin", "--process-output", "-q"])
    assert rc == 0
    assert_same_file(out, case.ours.out)
    printed = capsys.readouterr().out
    assert f"15 weights, {N} chunks of {CTX} tokens" in printed and "--imatrix" in printed
    assert main(["imatrix", str(case.model), "--out", str(tmp_path / "x.gguf"), "--calib-samples", "0"]) == 2
    assert "--calib-samples must be" in capsys.readouterr().err
