"""``llmquant compare``: the numbers are ``llmquant perplexity``'s on the same files, llama.cpp's file is
llama.cpp's quantizer of the same recipe (the same plan, --pure kept), and bad input is one line."""

from __future__ import annotations

import json
import types

import gguf
import pytest
from tiny import build_tiny_model

import llmquant
from llmquant.cli import main
from llmquant.eval.compare import compare
from llmquant.eval.perplexity import evaluate
from llmquant.text import default_text

CTX, WINDOWS = 64, 2


@pytest.fixture(scope="module")
def case(tmp_path_factory, smollm2_dir):
    d = tmp_path_factory.mktemp("compare")
    model = build_tiny_model(d / "tiny", "llama", smollm2_dir, hidden=256, intermediate=512, tied=False)
    calib = llmquant.CalibrationConfig(samples=4, seqlen=64)
    gptq = llmquant.quantize(model, d / "gptq-Q4_K_M.gguf", type="Q4_K_M", method="gptq", calibration=calib,
                             progress=False).out
    pure = llmquant.quantize(model, d / "rtn-q5_0-pure.gguf", type="q5_0", pure=True, progress=False).out
    return types.SimpleNamespace(dir=d, model=model, gptq=gptq, pure=pure)


def _tensors(path):
    return {t.name: (t.tensor_type, bytes(t.data.tobytes())) for t in gguf.GGUFReader(path).tensors}


def test_numbers_are_llmquant_perplexitys_and_the_baseline_is_llama_cpps(case):
    r = compare(case.gptq, model=case.model, ctx=CTX, windows=WINDOWS, threads=1, max_tokens=4, progress=False)
    assert r.type == "q4_k_m" and r.pure is False and [row.name for row in r.rows] == [case.gptq.name, "llama.cpp"]
    text = default_text("eval")
    for row in r.rows:
        e = evaluate(row.file, text=text, ctx=CTX, windows=WINDOWS, ref=r.ref, threads=1, progress=False)
        assert (row.kld, row.ppl, row.top1, row.size) == (e.kld, e.ppl, e.top1, e.file_size)
        assert row.completion.startswith(r.prompt) and len(row.completion) > len(r.prompt)
    ours, theirs = r.rows
    # llama.cpp's file is what `--method rtn` writes (byte-identical), so the same plan and size
    rtn = llmquant.quantize(case.model, case.dir / "rtn-Q4_K_M.gguf", type="Q4_K_M", progress=False).out
    assert _tensors(theirs.file) == _tensors(rtn)
    assert ours.size == theirs.size and ours.kld != theirs.kld
    table = r.table()
    assert "| llama.cpp |" in table and "1.000 | 1.0000" in table and f"{ours.kld / theirs.kld:.3f}" in table


def test_pure_files_are_compared_with_a_pure_llama_cpp_file_and_the_cli_prints_json(case, capsys):
    rc = main(["compare", str(case.pure), "--model", str(case.model), "--ctx", str(CTX), "--windows", "1",
               "--threads", "1", "--max-tokens", "2", "--json", "-q"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pure"] is True and out["type"] == "q5_0"
    ours, theirs = out["rows"]
    assert {t for t, _ in _tensors(theirs["file"]).values()} <= {gguf.GGMLQuantizationType.Q5_0,
                                                                 gguf.GGMLQuantizationType.F32}
    assert _tensors(theirs["file"]) == _tensors(case.pure)  # rtn is llama.cpp's quantizer, --pure included
    assert ours["kld"] == theirs["kld"]


def test_bad_input_is_one_line(case, capsys, tmp_path):
    f32 = llmquant.quantize(case.model, tmp_path / "f32.gguf", type="f32", progress=False).out
    other = build_tiny_model(tmp_path / "other", "llama", case.model, hidden=128, intermediate=256, tied=False)
    capsys.readouterr()  # the tiny model's own progress output
    for args, expect in (([str(f32)], "is f32: there is no quantizer to compare against"),
                         ([str(case.gptq), "--model", str(other)], "does not hold the tensors of"),
                         ([str(case.gptq), "--against", "gptq"], "--against gptq: choose from llama.cpp"),
                         ([str(tmp_path / "missing.gguf")], "missing.gguf")):
        assert main(["compare", *args, "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("error: ") and expect in err, err


def test_model_card_from_quantize_then_compare(case, tmp_path):
    """quantize --card writes the recipe and checksum; compare --card adds the table and the plot;
    quantizing again replaces its own section and keeps the measured one."""
    out = tmp_path / "tiny-Q4_K_M.gguf"
    calib = llmquant.CalibrationConfig(samples=4, seqlen=64)
    rep = llmquant.quantize(case.model, out, type="Q4_K_M", method="gptq", calibration=calib, card=True,
                            progress=False)
    card = tmp_path / "tiny-Q4_K_M.md"
    assert rep.card == str(card)
    text = card.read_text()
    assert text.startswith("# tiny Q4_K_M\n") and rep.checksum in text and "| method | gptq |" in text
    assert "| calibration | 4 x 64 tokens" in text and "damp=0.01" in text
    assert f"| q4_k | {sum(t.type == 'q4_k' for t in rep.tensors)} |" in text
    r = compare(out, model=case.model, ctx=CTX, windows=1, threads=1, max_tokens=2, card=True, progress=False)
    text = card.read_text()
    assert "Measured against llama.cpp's own quantizer" in text and f"{r.rows[0].kld:.6f}" in text
    png = tmp_path / "tiny-Q4_K_M.kld.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "(tiny-Q4_K_M.kld.png)" in text
    llmquant.quantize(case.model, out, type="Q4_K_M", method="gptq", calibration=calib, card=True, progress=False)
    def timeless(t: str) -> list[str]:
        return [line for line in t.splitlines() if not line.startswith("| time |")]

    # same settings, same bytes: the same card but for the run's time, the measured part kept
    assert timeless(card.read_text()) == timeless(text)
