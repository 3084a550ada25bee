"""GPTQ, AWQ and awq+gptq on the k-quants' two-level grids: the file holds exactly their weights.

A tiny llama whose rows are all multiples of 256, quantized ``pure`` so that every
linear takes the k-quant under test; each method's dequantized weights (and the
codes AWQ revised when it folded scales into an already-quantized v_proj/up_proj)
must be what gguf-py dequantizes from the file, bit for bit.
"""

from __future__ import annotations

import pytest
from exact_grid import assert_file_holds
from test_awq import RecordingAWQ, RecordingAWQGPTQ
from test_gptq_pipeline import RecordingGPTQ
from tiny import build_tiny_model

from llmquant import CalibrationConfig, quantize
from llmquant.generate import generate

CALIB = CalibrationConfig(samples=4, seqlen=128)
K_TYPES = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]


@pytest.fixture(scope="module")
def tiny_k(smollm2_dir, tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-k") / "llama", "llama", smollm2_dir, hidden=256,
                            intermediate=512)


def _check_file(model, out, method, report, qtype):
    assert_file_holds(model, out, method.w_hat, qtype)
    errs = [r for r in report.linears if r.err_method is not None and r.err_rtn]
    assert len(errs) == 14
    return errs


@pytest.mark.parametrize(("qtype", "act_order"), [(t, False) for t in K_TYPES] + [("q3_k", True), ("q4_k", True)])
def test_gptq_file_is_exactly_its_weights(qtype, act_order, tiny_k, tmp_path):
    method = RecordingGPTQ(act_order=act_order)
    out = tmp_path / f"{qtype}.gguf"
    report = quantize(tiny_k, out, type=qtype, pure=True, method=method, calibration=CALIB, progress=False)
    errs = _check_file(tiny_k, out, method, report, qtype)
    ratio = sum(r.err_method / r.err_rtn for r in errs) / len(errs)
    assert ratio < 1.0, ratio  # on average GPTQ's output error is below llama.cpp's rule


@pytest.mark.parametrize(("cls", "qtype"), [(RecordingAWQ, "q4_k"), (RecordingAWQGPTQ, "q3_k"), (RecordingAWQ, "q6_k")])
def test_awq_file_is_exactly_its_weights(cls, qtype, tiny_k, tmp_path):
    method = cls(n_grid=10)
    out = tmp_path / f"{method.name}-{qtype}.gguf"
    report = quantize(tiny_k, out, type=qtype, pure=True, method=method, calibration=CALIB, progress=False)
    _check_file(tiny_k, out, method, report, qtype)
    assert any(r.extra.get("alpha", 0) > 0 for r in report.linears)
    assert method.revised  # scales folded into an already-quantized k-quant v_proj/up_proj


def test_recipe_with_a_method_loads_and_generates(tiny_k, tmp_path):
    out = tmp_path / "m.gguf"
    report = quantize(tiny_k, out, type="Q4_K_M", method="awq+gptq", calibration=CALIB, progress=False)
    types = {t.type for t in report.tensors}
    assert {"q4_k", "q6_k"} <= types  # the recipe's mixture, with GPTQ on each type
    text = generate(out, "Hello", max_tokens=4)
    assert text.startswith("Hello") and len(text) > len("Hello")
