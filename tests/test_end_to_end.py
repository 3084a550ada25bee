"""Whole path: HF checkpoint -> our GGUF -> llama.cpp, against llama.cpp's own quantizer."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tiny import build_tiny_model

from llmquant import quantize
from llmquant.formats import get_format
from llmquant.generate import generate, load_llama

QUANT_TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]
FTYPES = {"q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q8_0": 7}


def llama_cpp_quantize(src: Path, dst: Path, qtype: str, pure: bool) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[qtype]
    params.pure = pure
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) == 0
    return dst


def tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def assert_same_bytes(ours: Path, theirs: Path) -> None:
    a, b = tensors(ours), tensors(theirs)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type, name
        assert np.array_equal(a[name].data.view(np.uint8), b[name].data.view(np.uint8)), name


@pytest.fixture(scope="module")
def f32_file(smollm2_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("e2e") / "smollm2-f32.gguf"
    quantize(smollm2_dir, out, type="f32", progress=False)
    return out


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_rtn_pure_is_byte_identical_to_llama_cpp(qtype, smollm2_dir, f32_file, tmp_path):
    ours = tmp_path / f"ours-{qtype}.gguf"
    report = quantize(smollm2_dir, ours, type=qtype, pure=True, progress=False)
    assert report.file_size == ours.stat().st_size
    theirs = llama_cpp_quantize(f32_file, tmp_path / f"theirs-{qtype}.gguf", qtype, pure=True)
    assert_same_bytes(ours, theirs)


def test_rtn_default_policy_matches_llama_cpp_and_gguf_quants(smollm2_dir, f32_file, tmp_path):
    ours = tmp_path / "ours-q5_1.gguf"
    quantize(smollm2_dir, ours, type="q5_1", progress=False)
    theirs = llama_cpp_quantize(f32_file, tmp_path / "theirs-q5_1.gguf", "q5_1", pure=False)
    assert_same_bytes(ours, theirs)
    # and every tensor equals gguf.quants on the f32 weights, and dequantizes to the format's grid
    src = tensors(f32_file)
    for name, t in tensors(ours).items():
        w = np.asarray(src[name].data, dtype=np.float32)
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            assert np.array_equal(t.data, w)
            continue
        data = t.data.view(np.uint8)
        assert np.array_equal(data, gguf.quants.quantize(w, t.tensor_type)), name
        fmt = get_format(t.tensor_type.name)
        q = fmt.rtn(w.reshape(-1, fmt.block_size))
        deq = gguf.quants.dequantize(data, t.tensor_type)
        assert np.array_equal(deq.reshape(-1, fmt.block_size), fmt.dequantize(q)), name


def test_quantized_file_generates_text(smollm2_dir, tmp_path):
    out = tmp_path / "q8_0.gguf"
    report = quantize(smollm2_dir, out, type="q8_0", progress=False)
    assert 8.0 < report.bits_per_weight < 9.0
    text = generate(out, "The capital of France is", max_tokens=8)
    assert "Paris" in text


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_model_logits_match_torch(arch, smollm2_dir, tmp_path):
    """A random model's f32 GGUF gives the same logits in llama.cpp as in torch.

    Random weights make any layout mistake (Q/K permute, biases, names) visible.
    """
    from transformers import AutoModelForCausalLM

    model_dir = build_tiny_model(tmp_path / arch, arch, smollm2_dir)
    out = tmp_path / f"{arch}-f32.gguf"
    quantize(model_dir, out, type="f32", progress=False)
    ids = [1, 504, 3458, 314, 2337, 282, 7493, 30, 4162, 2095]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    llm = load_llama(out, n_ctx=64, logits_all=True)
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)])
    assert np.abs(got - ref).max() < 2e-3 * np.abs(ref).max()


@pytest.mark.parametrize("arch,qtype", [("llama", "q4_0"), ("qwen2", "q5_1")])
def test_tiny_model_quantized_loads_and_generates(arch, qtype, smollm2_dir, tmp_path):
    model_dir = build_tiny_model(tmp_path / arch, arch, smollm2_dir, tied=False)
    out = tmp_path / f"{arch}-{qtype}.gguf"
    report = quantize(model_dir, out, type=qtype, progress=False)
    names = {t.name for t in report.tensors}
    assert "output.weight" in names and "token_embd.weight" in names
    text = generate(out, "Hello", max_tokens=4)
    assert text.startswith("Hello") and len(text) > len("Hello")
