"""The architectures people run: Llama 3.x rope scaling (llama3, linear), Qwen3 and Phi-3, HF -> GGUF -> llama.cpp.

Each tiny random model is built from its config (tests/tiny.py); its f32 file must give transformers'
logits in llama.cpp at early and late positions (for llama3: beyond original_max_position_embeddings,
where its per-frequency factors act), its q8_0 file must load and generate, and the calibrated
methods must write files llama.cpp loads and that still compute the model.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tiny import build_tiny_model

from llmquant import quantize
from llmquant.calibration import CalibrationConfig
from llmquant.errors import LlmquantError
from llmquant.export.arch import get_arch
from llmquant.generate import generate, load_llama
from llmquant.loading.source import read_config
from llmquant.loading.weights import WeightStore
from llmquant.plan import plan_tensors
from llmquant.policy import get_recipe

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
# head_dim 16, theta 1e4: wavelengths 6.3, 19.9, 62.8, ... against 32/4 = 8 and 32/1 = 32, so one
# frequency is kept, one blended, six divided by the factor
MODELS = {
    "llama3": ("llama", dict(max_position_embeddings=256, rope_parameters=LLAMA3_ROPE)),
    "llama-linear": ("llama", dict(max_position_embeddings=256,
                                   rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})),
    # head_dim 32 with 4 heads of a 64-wide model: q is 128 wide, unlike hidden/heads
    "qwen3": ("qwen3", dict(head_dim=32, max_position_embeddings=256, random_norms=True)),
    # fused qkv_proj [64 + 2·32, 64] and gate_up_proj [2·192, 64]; RoPE over half of each 16-wide head; a
    # window as long as the compared tokens (within it, sliding attention is the full one llama.cpp computes)
    "phi3": ("phi3", dict(max_position_embeddings=256, sliding_window=160, random_norms=True,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
}
UNTIED = ("qwen3", "phi3")  # Phi-3's checkpoints have their own lm_head
N_TOKENS = 160  # positions 0..159: well past original_max_position_embeddings=32
TOLERANCE = 2e-3  # of max |logit|: the llama tests', which allows for llama.cpp's default f16 KV cache
F32_CACHE_TOLERANCE = 1e-4  # with an f32 KV cache (as here) only float rounding remains


@pytest.fixture(scope="module")
def models(smollm2_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("archs")
    # folder "phi" (the file's general.name), not "phi3": llama.cpp gives a model named phi-3/phi3 Phi-3's
    # special-token attributes and looks up <s>, </s> and <unk>, which the SmolLM2 vocabulary lacks
    return {name: build_tiny_model(root / name.replace("phi3", "phi"), arch, smollm2_dir, tied=name not in UNTIED,
                                   **cfg)
            for name, (arch, cfg) in MODELS.items()}


def token_ids(n: int = N_TOKENS) -> list[int]:
    return [1, *np.random.default_rng(0).integers(3, 49152, n - 1).tolist()]


def torch_logits(model_dir: Path, ids: list[int], **config_changes) -> np.ndarray:
    """transformers' logits [n, vocab] for ids (config_changes: the same weights under another config)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    for key, value in config_changes.items():
        setattr(config, key, value)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, config=config, dtype=torch.float32)
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    llm = load_llama(path, n_ctx=256, logits_all=True, type_k=0, type_v=0)  # f32 KV cache: no f16 rounding
    llm.eval(ids)
    return np.asarray(llm.scores[: len(ids)])


def rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def rms_error(got: np.ndarray, ref: np.ndarray) -> float:
    """RMS of the logit error over the RMS of the logits (a layout mistake gives about 1 or more)."""
    return float(np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref ** 2)))


@pytest.mark.parametrize("name", list(MODELS))
def test_f32_logits_match_torch_early_and_late(name, models, tmp_path):
    model_dir = models[name]
    out = tmp_path / f"{name}-f32.gguf"
    quantize(model_dir, out, type="f32", progress=False)
    ids = token_ids()
    ref = torch_logits(model_dir, ids)
    got = llama_cpp_logits(out, ids)
    early, late = rel_error(got[:32], ref[:32]), rel_error(got[32:], ref[32:])
    print(f"{name}: max |llama.cpp - torch| / max |torch|: positions < 32 {early:.2e}, >= 32 {late:.2e}")
    assert early < F32_CACHE_TOLERANCE and late < F32_CACHE_TOLERANCE


@pytest.mark.parametrize("name", ["llama3", "llama-linear"])
def test_rope_scaling_changes_late_logits(name, models):
    """The comparison above can fail: without the scaling, the same weights give other logits past 32."""
    ids = token_ids()
    ref = torch_logits(models[name], ids)
    plain = torch_logits(models[name], ids, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    assert rel_error(plain[40:], ref[40:]) > 20 * TOLERANCE


def test_llama3_rope_freqs_are_transformers_frequencies(models):
    """rope_freqs.weight [head_dim/2] divides the default frequencies into transformers' llama3 ones."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = read_config(models["llama3"])
    plan = plan_tensors(get_arch(config), config, WeightStore(models["llama3"]), get_recipe("q4_0"), False)
    first = plan.entries[0]
    assert (first.tensor.name, first.tensor.shape, first.tensor.type) == ("rope_freqs.weight", (8,), "f32")
    assert first.source is None and first.layer is None
    factors = first.values
    assert factors[0] == 1.0 and factors[-1] == 4.0 and 1.0 < factors[1] < 4.0
    hf = AutoConfig.from_pretrained(models["llama3"])
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    default = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
    np.testing.assert_allclose(default / factors, want.numpy(), rtol=1e-6)


def test_old_style_rope_scaling_gives_the_same_file(models, tmp_path):
    """A Llama 3.1 config.json as the hub has it (rope_scaling, top-level rope_theta) = transformers 5's form."""
    new = tmp_path / "new.gguf"
    quantize(models["llama3"], new, type="f32", progress=False)
    old_dir = tmp_path / "old"
    old_dir.mkdir()
    for f in models["llama3"].iterdir():
        (old_dir / f.name).symlink_to(f)
    cfg = json.loads((models["llama3"] / "config.json").read_text())
    params = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = params
    (old_dir / "config.json").unlink()
    (old_dir / "config.json").write_text(json.dumps(cfg))
    old = tmp_path / "old.gguf"
    quantize(old_dir, old, type="f32", progress=False)
    a, b = gguf.GGUFReader(new), gguf.GGUFReader(old)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors, strict=True):
        assert np.array_equal(ta.data, tb.data), ta.name
    # llama.cpp's converter writes no rope-scaling key for llama3: the tensor carries it
    assert not [k for k in a.fields if "rope.scaling" in k]


def test_plan_walks_every_tensor_in_file_order(models, tmp_path):
    """The file's tensor table is the plan, entry for entry, with roles and layer indices."""
    out = tmp_path / "q.gguf"
    report = quantize(models["qwen3"], out, type="q4_k_m", progress=False)
    config = read_config(models["qwen3"])
    plan = plan_tensors(get_arch(config), config, WeightStore(models["qwen3"]), get_recipe("q4_k_m"), False)
    file = [(t.name, t.tensor_type.name.lower()) for t in gguf.GGUFReader(out).tensors]
    assert file == [(t.name, t.type) for t in plan.tensors] == [(t.name, t.type) for t in report.tensors]
    roles = {e.tensor.name: (e.role, e.layer) for e in plan.entries}
    assert roles["blk.1.attn_q_norm.weight"] == ("other", 1)
    assert roles["blk.0.attn_v.weight"] == ("attn_v", 0)
    assert roles["output.weight"] == ("output", None)
    assert [n for n, _ in file[:2]] == ["token_embd.weight", "blk.0.attn_norm.weight"]
    assert dict(file)["blk.0.attn_k_norm.weight"] == "f32"


@pytest.mark.parametrize("name", ["llama3", "qwen3", "phi3"])  # linear rope changes only keys the f32 test covers
def test_q8_0_is_llama_cpp_s_own_and_generates(name, models, tmp_path):
    """Our q8_0 file, byte for byte, is llama.cpp's quantizer run on our f32 file (rope_freqs and q/k
    norms stay f32 in both); it loads, tracks the model's logits, and generates."""
    import llama_cpp

    f32, ours, theirs = tmp_path / "f32.gguf", tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    quantize(models[name], f32, type="f32", progress=False)
    quantize(models[name], ours, type="q8_0", progress=False)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = int(gguf.LlamaFileType.MOSTLY_Q8_0), 2
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), params) == 0
    a, b = ({t.name: t for t in gguf.GGUFReader(p).tensors} for p in (ours, theirs))  # llama.cpp reorders
    assert {n: t.tensor_type for n, t in a.items()} == {n: t.tensor_type for n, t in b.items()}
    for n in a:
        assert np.array_equal(a[n].data.view(np.uint8), b[n].data.view(np.uint8)), n
    ids = token_ids(64)
    err = rms_error(llama_cpp_logits(ours, ids), torch_logits(models[name], ids))
    print(f"{name} q8_0: rms logit error / rms logit {err:.4f}")
    assert err < 0.1  # random weights amplify rounding; a layout mistake gives about 1
    text = generate(ours, "Hello", max_tokens=4, ctx=128)
    assert text.startswith("Hello") and len(text) > len("Hello")


# each method and each architecture once: AWQ's folds across Qwen3's q/k norms and into Phi-3's fused
# linears, GPTQ beside rope_freqs
@pytest.mark.parametrize(("name", "method"), [("llama3", "gptq"), ("qwen3", "awq+gptq"), ("phi3", "awq+gptq")])
def test_calibrated_methods_run_and_load(name, method, models, tmp_path):
    """Every linear quantized by the method; the file computes the model about as well as RTN's does."""
    # 64 tokens: past llama3's original 32 positions. 16 windows: gptq fits the full-precision model by a
    # least-squares solve over the calibration tokens, which 4 windows (256 tokens, widest input 192)
    # over-fitted on these random weights (1.37x RTN's logit error on other tokens)
    calib = CalibrationConfig(samples=16, seqlen=64)
    ours = tmp_path / f"{name}-{method}.gguf"
    report = quantize(models[name], ours, type="q4_0", method=method, calibration=calib, progress=False)
    linears = [rel for group in get_arch(read_config(models[name])).sequential_groups for rel in group]
    assert len(report.linears) == 2 * len(linears)  # both layers, every linear of each
    assert {r.name.rsplit(".", 1)[0].split(".", 3)[-1] for r in report.linears} == set(linears)
    rtn = tmp_path / f"{name}-rtn.gguf"
    quantize(models[name], rtn, type="q4_0", progress=False)
    ids = token_ids(96)
    ref = torch_logits(models[name], ids)
    err = {p.name: rms_error(llama_cpp_logits(p, ids), ref) for p in (ours, rtn)}
    print(f"{name} {method}: rms logit error / rms logit {err[ours.name]:.4f}, rtn {err[rtn.name]:.4f}")
    # random weights and tokens: calibration on text need not beat RTN here, only stay near it; a wrong
    # fold or layout gives an error of about 1 or more
    assert err[ours.name] < 1.3 * err[rtn.name] and err[ours.name] < 0.8


def test_qwen3_attention_bias_is_refused(smollm2_dir, tmp_path):
    """Qwen3's attention_bias gives o_proj a bias that llama.cpp's qwen3 does not read."""
    model_dir = build_tiny_model(tmp_path / "m", "qwen3", smollm2_dir, attention_bias=True)
    with pytest.raises(LlmquantError, match=r"tensor model\.layers\.0\.self_attn\.o_proj\.bias \(and 1 more\) "
                                            r"of the checkpoint has no place in llama\.cpp's qwen3 layout"):
        quantize(model_dir, tmp_path / "m.gguf", type="f32", progress=False)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmquant.cli", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


def _with_config(model_dir: Path, dst: Path, **changes) -> Path:
    dst.mkdir()
    for f in model_dir.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f)
    cfg = {**json.loads((model_dir / "config.json").read_text()), **changes}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


REFUSED = {
    "llama-yarn": ("llama3", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
                   r"config\.json has rope_parameters of type 'yarn', which llmquant does not carry into llama\.cpp's "
                   r"llama; supported rope scaling types: default, linear, llama3"),
    "llama-longrope": ("llama3", {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
                       r"type 'longrope', .*supported rope scaling types: default, linear, llama3$"),
    "llama-dynamic": ("llama3", {"rope_type": "dynamic", "factor": 2.0},
                      r"type 'dynamic', .*supported rope scaling types: default, linear, llama3$"),
    "qwen3-yarn": ("qwen3", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
                   r"type 'yarn', which llmquant does not carry into llama\.cpp's qwen3; supported rope scaling "
                   r"types: default, linear$"),
    "qwen3-llama3": ("qwen3", LLAMA3_ROPE, r"type 'llama3', .*llama\.cpp's qwen3; supported rope scaling types: "
                                           r"default, linear$"),
    # Phi-3 128k: llama.cpp picks long or short factors by its context, transformers by each input's length
    "phi3-longrope": ("phi3", {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                               "original_max_position_embeddings": 64},
                      r"config\.json has rope_parameters of type 'longrope', which llmquant does not carry into "
                      r"llama\.cpp's phi3; supported rope scaling types: default$"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_rope_type_is_one_line_exit_2(case, models, tmp_path):
    name, rope, expect = REFUSED[case]
    model_dir = _with_config(models[name], tmp_path / "model", rope_parameters={"rope_theta": 10000.0, **rope})
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = _cli("quantize", str(model_dir), "--out", str(out_dir / "m.gguf"), cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("error: ") and re.search(expect, lines[0]), lines[0]
    assert list(out_dir.iterdir()) == []


BAD_LLAMA3 = {
    "no-low-freq-factor": ({"low_freq_factor": None},
                           "config.json has a llama3 rope_parameters with low_freq_factor=None; expected a positive number"),
    "no-original-context": ({"original_max_position_embeddings": None},
                            "config.json has a llama3 rope_parameters with original_max_position_embeddings=None; "
                            "expected a positive integer"),
    "low-not-below-high": ({"low_freq_factor": 4.0, "high_freq_factor": 4.0},
                           "config.json has a llama3 rope_parameters with low_freq_factor=4.0 and high_freq_factor=4.0; "
                           "expected low_freq_factor < high_freq_factor"),
    "negative-factor": ({"factor": -2.0}, "config.json has rope_parameters.factor=-2.0; expected a positive number"),
    "context-not-whole": ({"original_max_position_embeddings": 32.5},
                          "config.json has rope_parameters.original_max_position_embeddings=32.5; expected a positive "
                          "integer"),
}


@pytest.mark.parametrize("case", list(BAD_LLAMA3))
def test_bad_llama3_parameters_refused_by_name(case, models, tmp_path, capsys):
    from llmquant.cli import main

    change, expect = BAD_LLAMA3[case]
    rope = {k: v for k, v in {**LLAMA3_ROPE, **change}.items() if v is not None}
    model_dir = _with_config(models["llama3"], tmp_path / "model", rope_parameters=rope)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rc = main(["quantize", str(model_dir), "--out", str(out_dir / "m.gguf")])
    err = capsys.readouterr().err
    assert rc == 2 and err == f"error: {expect}\n", err
    assert list(out_dir.iterdir()) == []


def test_phi3_file_keeps_the_fused_projections_and_declares_the_window(models, tmp_path):
    """attn_qkv and ffn_up hold transformers' fused rows unchanged (no permute: NeoX RoPE); the header
    carries the partial rotary size and, since llama.cpp's phi3 attends to every earlier token, the
    sliding window as the context, with the key written as llama.cpp's converter does."""
    from safetensors.numpy import load_file

    out = tmp_path / "phi3.gguf"
    with pytest.warns(UserWarning, match=r"sliding_window=160: .* declares a context of 160 tokens"):
        quantize(models["phi3"], out, type="f32", progress=False)
    reader = gguf.GGUFReader(out)
    fields = {k: reader.fields[k].contents() for k in reader.fields if k.startswith("phi3.")}
    assert fields["phi3.context_length"] == 160 and fields["phi3.attention.sliding_window"] == 160
    assert fields["phi3.rope.dimension_count"] == 8  # half of each 16-wide head
    assert fields["phi3.rope.scaling.original_context_length"] == 4096  # Phi3Config's default, as converted
    tensors = {t.name: t.data for t in reader.tensors}
    assert not [n for n in tensors if re.search(r"attn_[qkv]\.|ffn_gate", n)]
    hf = load_file(models["phi3"] / "model.safetensors")
    for i in range(2):
        for gguf_name, hf_name, rows in (("attn_qkv", "self_attn.qkv_proj", 128), ("ffn_up", "mlp.gate_up_proj", 384)):
            got, want = tensors[f"blk.{i}.{gguf_name}.weight"], hf[f"model.layers.{i}.{hf_name}.weight"]
            assert got.shape == want.shape == (rows, 64) and np.array_equal(got, want)
    assert np.array_equal(tensors["output.weight"], hf["lm_head.weight"])


@pytest.mark.parametrize(("change", "expect"), [
    ({"head_dim": 32}, r"config\.json has head_dim=32; llama\.cpp's phi3 computes heads of hidden_size / "
                       r"num_attention_heads = 16 only"),
    ({"hidden_act": "gelu"}, r"config\.json has hidden_act='gelu'; llama\.cpp's phi3 block computes silu only"),
])
def test_phi3_features_llama_cpp_would_not_compute_are_refused(change, expect, models, tmp_path):
    model_dir = _with_config(models["phi3"], tmp_path / "model", **change)
    with pytest.raises(LlmquantError, match=f"^{expect}$"):
        quantize(model_dir, tmp_path / "m.gguf", type="f32", progress=False)
    assert not (tmp_path / "m.gguf").exists()


def test_phi3_awq_folds_into_the_norms_before_the_fused_linears(models, tmp_path):
    """AWQ scales qkv_proj's and gate_up_proj's inputs and folds the inverse into input_layernorm and
    post_attention_layernorm (the file's norms change). At q8_0, where rounding is small, the file still
    computes the model as closely as RTN's: a fold into the wrong norm gives about 10x RTN's error."""
    from safetensors.numpy import load_file

    calib = CalibrationConfig(samples=4, seqlen=64)
    awq, rtn = tmp_path / "awq.gguf", tmp_path / "rtn.gguf"
    quantize(models["phi3"], awq, type="q8_0", method="awq", calibration=calib, progress=False)
    quantize(models["phi3"], rtn, type="q8_0", progress=False)
    hf = load_file(models["phi3"] / "model.safetensors")
    norms = {t.name: t.data for t in gguf.GGUFReader(awq).tensors if "norm" in t.name}
    for gguf_name, hf_name in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")):
        assert not np.allclose(norms[f"blk.0.{gguf_name}.weight"], hf[f"model.layers.0.{hf_name}.weight"]), gguf_name
    ids = token_ids(96)
    ref = torch_logits(models["phi3"], ids)
    err = {p.name: rms_error(llama_cpp_logits(p, ids), ref) for p in (awq, rtn)}
    print(f"phi3 q8_0 awq: rms logit error / rms logit {err[awq.name]:.4f}, rtn {err[rtn.name]:.4f}")
    assert err[awq.name] < 1.3 * err[rtn.name]
