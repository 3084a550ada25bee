"""Evaluation room: llama-perplexity protocol, KLD, the perplexity command, text sources.

GGUF files under test come from fixtures (``full_gguf``, ``q8_gguf``,
``q4_gguf``) so the source of the files can be swapped in one place. Windows
are small (ctx 128, 2-4 windows) and everything runs on one thread: on shared
CPU cores llama.cpp's OpenMP threads slow down badly when a core is busy.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmquant import quantize
from llmquant.errors import LlmquantError
from llmquant.eval import command
from llmquant.eval.perplexity import (
    PerplexityResult,
    evaluate,
    evaluate_many,
    log_softmax,
    make_windows,
    ppl_and_stderr,
    window_stats,
)
from llmquant.text import default_text, load_text

CTX = 128
THREADS = 1
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def gguf_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="session")
def full_gguf(smollm2_dir: Path, gguf_cache: Path) -> Path:
    """Our own f32 GGUF of the default model: the reference for every KLD."""
    return quantize(smollm2_dir, gguf_cache / "full-f32.gguf", type="f32", progress=False).out


@pytest.fixture(scope="session")
def q8_gguf(smollm2_dir: Path, gguf_cache: Path) -> Path:
    return quantize(smollm2_dir, gguf_cache / "q8_0.gguf", type="q8_0", progress=False).out


@pytest.fixture(scope="session")
def q4_gguf(smollm2_dir: Path, gguf_cache: Path) -> Path:
    return quantize(smollm2_dir, gguf_cache / "q4_0.gguf", type="q4_0", progress=False).out


@pytest.fixture(scope="session")
def eval_text() -> str:
    return default_text("eval")


def _run(model: Path, text: str, **kw) -> PerplexityResult:
    kw.setdefault("windows", 2)
    return evaluate(model, text=text, ctx=CTX, threads=THREADS, progress=False, **kw)


# --- the protocol, without a model --------------------------------------------------------


def test_windows_are_disjoint_and_get_bos_when_the_vocab_adds_it():
    tokens = list(range(10, 10 + 3 * 8 + 5))
    plain = make_windows(tokens, 8, None, add_bos=False, bos=1)
    assert plain.shape == (3, 8) and plain.ravel().tolist() == tokens[:24]
    bos = make_windows(tokens, 8, 2, add_bos=True, bos=1)
    assert bos[:, 0].tolist() == [1, 1] and bos[:, 1:].tolist() == plain[:2, 1:].tolist()


def test_windows_beyond_the_text_warn_and_use_what_is_there():
    with pytest.warns(UserWarning, match="only 2 windows of 8 tokens; using 2, not 5"):
        assert make_windows(list(range(20)), 8, 5, add_bos=False, bos=None).shape == (2, 8)
    with pytest.raises(LlmquantError, match="text has 7 tokens, fewer than one window of 8"):
        make_windows(list(range(7)), 8, None, add_bos=False, bos=None)


def test_window_stats_score_the_second_half_with_exact_kld():
    rng = np.random.default_rng(0)
    n, vocab = 8, 11
    window = rng.integers(0, vocab, n)
    test, ref = rng.normal(size=(n, vocab)) * 3, rng.normal(size=(n, vocab)) * 3
    s = window_stats(test.astype(np.float32), window, ref.astype(np.float32))
    p_test = np.exp(test[4:7]) / np.exp(test[4:7]).sum(-1, keepdims=True)
    p_ref = np.exp(ref[4:7]) / np.exp(ref[4:7]).sum(-1, keepdims=True)
    assert s["nll"].shape == (3,)  # logits 4..6 predict tokens 5..7
    np.testing.assert_allclose(s["nll"], -np.log(p_test[np.arange(3), window[5:]]), rtol=1e-5)
    np.testing.assert_allclose(s["kld"], (p_ref * np.log(p_ref / p_test)).sum(-1), rtol=1e-4, atol=1e-6)
    assert s["top1"].tolist() == (test[4:7].argmax(-1) == ref[4:7].argmax(-1)).tolist()


def test_log_softmax_is_stable_and_ppl_stderr_follows_llama_perplexity():
    lp = log_softmax(np.array([[1000.0, 1000.0, -1000.0]], dtype=np.float32))
    np.testing.assert_allclose(np.exp(lp).sum(), 1.0)
    np.testing.assert_allclose(lp[0, 0], np.log(0.5))
    nll = np.array([1.0, 2.0, 3.0, 4.0])
    ppl, err = ppl_and_stderr(nll)
    assert ppl == pytest.approx(np.exp(2.5))
    assert err == pytest.approx(np.exp(2.5) * np.sqrt(1.25 / 3))


# --- text sources -------------------------------------------------------------------------


def test_default_text_parts_are_disjoint_and_cover_the_corpus():
    calib, held_out = default_text("calib"), default_text("eval")
    assert len(calib) > 200_000 and len(held_out) > 80_000
    assert 0.65 < len(calib) / (len(calib) + len(held_out)) < 0.75
    # pydoc topics repeat passages; no held-out passage may reappear in calibration text
    assert not any(held_out[i : i + 200] in calib for i in range(0, len(held_out) - 200, 1000))
    assert load_text(None, None, "eval") == held_out


def test_load_text_errors_are_one_clear_line(tmp_path, monkeypatch):
    with pytest.raises(LlmquantError, match="does not exist"):
        load_text(tmp_path / "nope.txt", None)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(LlmquantError, match="is empty"):
        load_text(tmp_path / "empty.txt", None)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(LlmquantError, match="not UTF-8"):
        load_text(tmp_path / "bin.txt", None)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if `datasets` were not installed
    with pytest.raises(LlmquantError, match=r"cannot load dataset wikitext-2-raw-v1 .*; pass --text FILE"):
        load_text(None, "wikitext-2-raw-v1")


# --- models -------------------------------------------------------------------------------


def test_hf_model_in_torch_matches_its_full_precision_gguf(smollm2_dir, full_gguf, eval_text):
    """Same weights, same tokens: torch float32 and llama.cpp agree within 0.5% in ppl."""
    from llmquant.eval.perplexity import _GgufRunner, _HfRunner

    hf, gg = _HfRunner(smollm2_dir, THREADS), _GgufRunner(full_gguf, CTX, THREADS)
    assert (hf.add_bos, gg.add_bos) == (False, False)
    assert hf.tokenize(eval_text[:20_000]) == gg.tokenize(eval_text[:20_000])
    gg.close()
    hf.close()
    r = _run(smollm2_dir, eval_text, hf=True, ref=full_gguf, windows=3)
    assert r.tokens == 3 * (CTX - 1 - CTX // 2)
    assert abs(r.ppl / r.ref_ppl - 1) < 0.005, (r.ppl, r.ref_ppl)
    assert r.kld < 1e-3 and r.top1 > 0.97
    assert r.bits_per_weight == pytest.approx(32, abs=0.01)


def test_kld_of_a_file_against_itself_is_zero(full_gguf, eval_text):
    r = _run(full_gguf, eval_text, ref=full_gguf)
    assert abs(r.kld) < 1e-6 and abs(r.kld_p99) < 1e-6
    assert r.top1 == 1.0 and r.ppl == r.ref_ppl
    assert r.bits_per_weight == pytest.approx(32.0)


def test_kld_grows_as_bits_shrink(full_gguf, q8_gguf, q4_gguf, eval_text):
    q8 = _run(q8_gguf, eval_text, ref=full_gguf)
    q4 = _run(q4_gguf, eval_text, ref=full_gguf)
    assert 0 < q8.kld < q4.kld and q8.kld_p99 < q4.kld_p99 and q8.top1 >= q4.top1
    assert q4.bits_per_weight < q8.bits_per_weight < 16
    assert q8.ref_ppl == pytest.approx(q4.ref_ppl)  # same reference tokens in both runs
    assert abs(q8.ppl / q8.ref_ppl - 1) < 0.01  # q8_0 within 1% of f32



def test_evaluate_many_scores_each_file_as_evaluate_does(full_gguf, q8_gguf, q4_gguf, eval_text):
    """One pass with the reference run once per window gives every file exactly its own evaluation."""
    many = evaluate_many([q8_gguf, q4_gguf], text=eval_text, ctx=CTX, windows=2, ref=full_gguf, threads=THREADS,
                         progress=False)
    alone = [_run(q8_gguf, eval_text, ref=full_gguf), _run(q4_gguf, eval_text, ref=full_gguf)]
    assert [m.to_dict() for m in many] == [a.to_dict() for a in alone]
    assert many[0].kld < many[1].kld

def test_json_output_is_one_object_with_the_schema(q8_gguf, full_gguf, eval_text, tmp_path, capsys):
    text_file = tmp_path / "eval.txt"
    text_file.write_text(eval_text[:40_000])
    argv = [str(q8_gguf), "--text", str(text_file), "--ctx", str(CTX), "--windows", "2",
            "--ref", str(full_gguf), "--threads", str(THREADS), "--json"]
    assert command.main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    floats = ("ppl", "ppl_stderr", "kld", "kld_p99", "top1", "bits_per_weight")
    assert all(isinstance(data[k], float) for k in floats)
    assert {k: data[k] for k in ("tokens", "ctx", "windows", "model")} == {
        "tokens": 2 * (CTX // 2 - 1), "ctx": CTX, "windows": 2, "model": str(q8_gguf)}
    assert data["file_size"] == q8_gguf.stat().st_size and 1 < data["ppl"] < 100


def test_human_table_without_reference(q4_gguf, eval_text, tmp_path, capsys):
    (tmp_path / "t.txt").write_text(eval_text[:20_000])
    argv = [str(q4_gguf), "--text", str(tmp_path / "t.txt"), "--ctx", str(CTX), "--windows", "1", "--threads", "1"]
    assert command.main(argv) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "bits/weight" in out and "KLD" not in out


# --- bad inputs ---------------------------------------------------------------------------


def test_bad_inputs_raise_llmquant_error(tmp_path, full_gguf):
    with pytest.raises(LlmquantError, match="does not exist"):
        _run(tmp_path / "missing.gguf", "text")
    (tmp_path / "notgguf.gguf").write_bytes(b"PK\x03\x04 definitely not gguf")
    with pytest.raises(LlmquantError, match="is not a GGUF file"):
        _run(tmp_path / "notgguf.gguf", "text")
    with pytest.raises(LlmquantError, match=r"text has \d+ tokens, fewer than one window of 128"):
        _run(full_gguf, "far too short")
    with pytest.raises(LlmquantError, match="does not exist"):
        _run(full_gguf, "text", ref=tmp_path / "missing-ref.gguf")


def test_model_is_required_without_hf(capsys):
    assert command.main(["--ctx", "128"]) == 2
    assert "MODEL is required" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing", "not-gguf", "short-text"])
def test_module_entry_point_exits_2_without_traceback(case, tmp_path, full_gguf):
    target = {"missing": tmp_path / "missing.gguf", "not-gguf": tmp_path / "x.gguf", "short-text": full_gguf}[case]
    (tmp_path / "x.gguf").write_text("hello")
    (tmp_path / "short.txt").write_text("A sentence that is much shorter than one window.")
    proc = subprocess.run(
        [sys.executable, "-m", "llmquant.eval.command", str(target), "--text", str(tmp_path / "short.txt"),
         "--ctx", "128", "--threads", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert proc.stdout == ""
