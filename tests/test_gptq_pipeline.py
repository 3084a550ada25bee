"""GPTQ inside the streaming pipeline: the file holds exactly the weights GPTQ chose."""

from __future__ import annotations

import warnings

import gguf
import numpy as np
import pytest
import torch
from same_file import assert_same_file
from tiny import build_tiny_model

from llmquant import CalibrationConfig, LlmquantError, quantize
from llmquant.export.arch import get_arch
from llmquant.generate import generate
from llmquant.loading.source import read_config
from llmquant.methods.gptq_method import GPTQMethod

CALIB = CalibrationConfig(samples=4, seqlen=128)


class RecordingGPTQ(GPTQMethod):
    """GPTQ that also keeps the dequantized weights it hands to the pipeline."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.w_hat: dict[str, np.ndarray] = {}

    def quantize_group(self, group, members):
        out = super().quantize_group(group, members)
        for (name, W, fmt), (q, _) in zip(members, out, strict=True):
            self.w_hat[name] = fmt.dequantize(q).reshape(W.shape)
        return out


@pytest.fixture(scope="module")
def tiny_llama(smollm2_dir, tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama", smollm2_dir, hidden=128)


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"])
@pytest.mark.parametrize("act_order", [False, True])
def test_file_dequantizes_to_exactly_the_gptq_weights(qtype, act_order, tiny_llama, tmp_path):
    method = RecordingGPTQ(act_order=act_order)
    out = tmp_path / f"{qtype}.gguf"
    report = quantize(tiny_llama, out, type=qtype, method=method, calibration=CALIB, progress=False)
    config = read_config(tiny_llama)
    spec = get_arch(config)
    by_name = {t.name: t for t in gguf.GGUFReader(out).tensors}
    planned = {t.name: t for t in report.tensors}
    assert len(method.w_hat) == 7 * 2  # every linear of both layers went through GPTQ
    for hf_name, w_hat in method.w_hat.items():
        gguf_name = spec.gguf_tensor_name(hf_name, 2)
        t = by_name[gguf_name]
        assert t.tensor_type.name.lower() == planned[gguf_name].type == qtype
        deq = gguf.quants.dequantize(t.data.view(np.uint8), t.tensor_type)
        assert np.array_equal(deq, spec.to_gguf_rows(hf_name, w_hat, config)), hf_name
    errs = [r for r in report.linears if r.err_method is not None]
    assert errs and all(r.err_method < r.err_rtn for r in errs)


@pytest.mark.parametrize("method", ["gptq", "awq+gptq"])
def test_each_group_is_walked_once_per_format(method, tiny_llama, tmp_path, monkeypatch):
    """q/k/v and gate/up share their input, so each group's linears of one format go through one
    GPTQ walk: per layer, walks of 3 (q, k, v), 1 (o), 2 (gate, up) and 1 (down) linears."""
    import llmquant.methods.awq as awq_module
    import llmquant.methods.gptq_method as gptq_module

    module = gptq_module if method == "gptq" else awq_module
    # awq+gptq's default settles α by trial walks on sampled rows first: only the final walks here
    options = {} if method == "gptq" else {"alpha_by": "rtn"}
    walks = []

    def spy(Ws, *a, **k):
        walks.append([W.shape[0] for W in Ws])
        return real(Ws, *a, **k)

    real = module.gptq_quantize_rows
    monkeypatch.setattr(module, "gptq_quantize_rows", spy)
    quantize(tiny_llama, tmp_path / "o.gguf", type="q4_0", method=method, method_options=options or None,
             calibration=CALIB, progress=False)
    config = read_config(tiny_llama)
    kv = config["num_key_value_heads"] * config["hidden_size"] // config["num_attention_heads"]
    h, f = config["hidden_size"], config["intermediate_size"]
    assert walks == [[h, kv, kv], [h], [f, f], [h]] * config["num_hidden_layers"]


def test_gptq_file_loads_and_generates_in_llama_cpp(tiny_llama, tmp_path):
    out = tmp_path / "gptq.gguf"
    quantize(tiny_llama, out, type="q4_0", method="gptq", calibration=CALIB, progress=False)
    text = generate(out, "Hello", max_tokens=4)
    assert text.startswith("Hello") and len(text) > len("Hello")


def test_gptq_is_deterministic(tiny_llama, tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    for out in (a, b):
        quantize(tiny_llama, out, type="q4_0", method="gptq", calibration=CALIB, progress=False)
    assert_same_file(a, b)


def test_rtn_bytes_do_not_depend_on_the_thread_count(smollm2_dir, tmp_path):
    """SmolLM2's widths (576 wide, 1216-wide MLP here): wide enough for torch to split its kernels."""
    model = build_tiny_model(tmp_path / "m", "llama", smollm2_dir, hidden=576, layers=2, tied=False)
    before = torch.get_num_threads()
    try:
        sums = {quantize(model, tmp_path / f"t{n}.gguf", type="q4_1", threads=n, progress=False).checksum
                for n in (1, 2, 3)}
    finally:
        torch.set_num_threads(before)
    assert len(sums) == 1, sums


def test_short_calibration_text_warns_with_the_token_count(tiny_llama, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    calib = CalibrationConfig(samples=64, seqlen=128, text_file=text)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize(tiny_llama, tmp_path / "s.gguf", type="q4_0", method="gptq", calibration=calib, progress=False)
    assert any("windows of 128 tokens" in str(w.message) for w in caught)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("too short")
    with pytest.raises(LlmquantError, match="fewer than one window"):
        quantize(tiny_llama, tmp_path / "t.gguf", type="q4_0", method="gptq",
                 calibration=CalibrationConfig(text_file=tiny, seqlen=128), progress=False)
    assert not (tmp_path / "t.gguf").exists()


def test_dead_input_channels_fall_back_or_survive(tiny_llama, tmp_path):
    """A layer whose inputs are zero in some channels still quantizes (dead-column handling)."""
    method = RecordingGPTQ()
    calls = []

    def observe(group, x, _orig=method.observe):
        x = x.clone()
        x[..., :16] = 0  # 16 channels never active
        calls.append(group)
        _orig(group, x)

    method.observe = observe
    quantize(tiny_llama, tmp_path / "dead.gguf", type="q4_0", method=method, calibration=CALIB, progress=False)
    assert calls and all(torch.isfinite(torch.from_numpy(w)).all() for w in method.w_hat.values())


def test_cli_report_json_lists_each_linear_with_its_error_vs_rtn(tiny_llama, tmp_path):
    import json

    from llmquant.cli import main

    out, report = tmp_path / "r.gguf", tmp_path / "r.json"
    rc = main(["quantize", str(tiny_llama), "--out", str(out), "--method", "gptq", "--calib-samples", "4",
               "--calib-seqlen", "128", "--quiet", "--report", str(report)])
    assert rc == 0 and out.exists()
    data = json.loads(report.read_text())
    assert data["method"] == "gptq" and data["file_size"] == out.stat().st_size
    linears = data["linears"]
    assert len(linears) == 14 and all(r["err_method"] < r["err_rtn"] and r["seconds"] > 0 for r in linears)


def test_layer_arguments_are_captured_on_one_thread(tiny_llama):
    """The capture computes the model's rotary cos/sin, a run's first transcendental math. Done on
    several threads, the workers' share of that first call now and then came out less accurate, and
    two runs (or a run and its resume) wrote different bytes: the capture runs on one thread, and
    the thread count is restored after it."""
    from llmquant.loading.layers import LayerRunner

    config = read_config(tiny_llama)
    runner = LayerRunner(tiny_llama, None, get_arch(config).layer_prefix)
    seen = []
    runner.decoder.rotary_emb.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runner.capture_kwargs(torch.randn(2, 16, config["hidden_size"]))
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    cos, sin = runner.layer_kwargs[0]["position_embeddings"]
    assert cos.shape[:2] == (1, 16)


@pytest.mark.parametrize("method", ["gptq", "awq+gptq"])
def test_fitting_the_full_precision_model_changes_only_what_its_inputs_change(method, tiny_llama, tmp_path):
    """--gptq-target model: layer 0's q/k/v see the same inputs in both streams (the embeddings),
    so they get the codes plain GPTQ gives them; every later group sees inputs the quantized
    layers moved, and its codes change. (awq+gptq with α settled by GPTQ: o_proj's α then depends
    on the target, and v_proj's grid is divided by o_proj's scales, so v_proj's bytes may differ
    too; AWQ's own α, chosen on the layer's inputs alone, keeps them.)"""
    files = {}
    for target in ("layer", "model"):
        files[target] = tmp_path / f"{target}.gguf"
        options = {"gptq_target": target} if method == "gptq" else {"gptq_target": target, "alpha_by": "rtn"}
        quantize(tiny_llama, files[target], type="q4_0", method=method, method_options=options,
                 calibration=CALIB, progress=False)
    data = {t: {x.name: x.data.tobytes() for x in gguf.GGUFReader(f).tensors} for t, f in files.items()}
    same = {name for name in data["layer"] if data["layer"][name] == data["model"][name]}
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight"):
        assert name in same
    for name in ("blk.0.attn_output.weight", "blk.0.ffn_down.weight", "blk.1.attn_q.weight", "blk.1.ffn_up.weight"):
        assert name not in same


def test_file_dequantizes_to_exactly_the_weights_gptq_fitted_to_the_model(tiny_llama, tmp_path):
    method = RecordingGPTQ(gptq_target="model")
    out = tmp_path / "m.gguf"
    quantize(tiny_llama, out, type="q4_K", method=method, calibration=CALIB, progress=False)
    config = read_config(tiny_llama)
    spec = get_arch(config)
    by_name = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert len(method.w_hat) == 7 * 2
    for hf_name, w_hat in method.w_hat.items():
        t = by_name[spec.gguf_tensor_name(hf_name, 2)]
        deq = gguf.quants.dequantize(t.data.view(np.uint8), t.tensor_type)
        assert np.array_equal(deq, spec.to_gguf_rows(hf_name, w_hat, config)), hf_name


class PairsSeen(GPTQMethod):
    """gptq fitted to the model, keeping every input pair it observes."""

    def __init__(self, **kw):
        super().__init__(gptq_target="model", **kw)
        self.pairs: dict[str, list] = {}

    def observe_pair(self, group, x_fp, x):
        self.pairs.setdefault(group, []).append((x_fp.clone(), x.clone()))
        super().observe_pair(group, x_fp, x)


def test_full_precision_inputs_are_the_hf_models_own(tiny_llama, tmp_path):
    """What ``--gptq-target model`` pairs with each quantized input is what the unquantized HF model
    feeds that linear on the same calibration tokens (forward pre-hooks on transformers' own modules),
    batch for batch; the quantized stream's inputs differ from it after the first group."""
    from transformers import AutoModelForCausalLM

    from llmquant.calibration import calibration_tokens

    method = PairsSeen()
    quantize(tiny_llama, tmp_path / "m.gguf", type="q4_0", method=method, calibration=CALIB, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, torch_dtype=torch.float32).eval()
    seen = {}
    modules = {f"{i}:{rel}": layer.get_submodule(rel) for i, layer in enumerate(hf.model.layers)
               for rel in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")}
    hooks = [m.register_forward_pre_hook(lambda _m, args, key=key: seen.setdefault(key, args[0].clone()))
             for key, m in modules.items()]
    with torch.no_grad():
        hf(calibration_tokens(tiny_llama, CALIB))
    for h in hooks:
        h.remove()
    assert method.pairs.keys() == modules.keys()
    for key, pairs in method.pairs.items():
        x_fp = torch.cat([p[0] for p in pairs])
        x = torch.cat([p[1] for p in pairs])
        torch.testing.assert_close(x_fp, seen[key], rtol=1e-4, atol=1e-4, msg=key)
        if key != "0:self_attn.q_proj":
            assert (x - x_fp).abs().max() > 1e-3, key
        else:
            assert torch.equal(x, x_fp)


class StreamSeen(RecordingGPTQ):
    """gptq fitted to the stream, keeping the residual it is handed with each pair."""

    def __init__(self, **kw):
        super().__init__(gptq_target="stream", **kw)
        self.residuals: dict[str, list] = {}

    def observe_pair(self, group, x_fp, x, residual=None):
        if residual is not None:
            self.residuals.setdefault(group, []).append(residual.clone())
        super().observe_pair(group, x_fp, x, residual)


def _pre_add_streams(model, n_layers: int, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """What each residual writer adds into, hooked on an HF llama: o_proj into the layer's input,
    down_proj into post_attention_layernorm's input."""
    seen, hooks = {}, []

    def keep(key, args, kwargs) -> None:
        seen[key] = (args[0] if args else kwargs["hidden_states"]).clone()

    for i, layer in enumerate(model.model.layers[:n_layers]):
        for key, module in ((f"{i}:self_attn.o_proj", layer), (f"{i}:mlp.down_proj", layer.post_attention_layernorm)):
            hooks.append(module.register_forward_pre_hook(
                lambda _m, args, kwargs, key=key: keep(key, args, kwargs), with_kwargs=True))
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    return seen


def test_the_stream_residual_is_the_full_precision_models_minus_the_quantized_ones(tiny_llama, tmp_path):
    """--gptq-target stream hands o_proj and down_proj the full-precision model's residual stream
    minus the quantized model's just before their add, token for token: checked against the HF
    model as it is and with every linear set to the weights the file holds (the quantized stream
    that far is that model's), hooked where each writer adds."""
    from transformers import AutoModelForCausalLM

    from llmquant.calibration import calibration_tokens

    method = StreamSeen()
    quantize(tiny_llama, tmp_path / "m.gguf", type="q4_0", method=method, calibration=CALIB, progress=False)
    tokens = calibration_tokens(tiny_llama, CALIB)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, torch_dtype=torch.float32).eval()
    n_layers = len(hf.model.layers)
    fp = _pre_add_streams(hf, n_layers, tokens)
    state = hf.state_dict()
    for name, w_hat in method.w_hat.items():
        state[name].copy_(torch.from_numpy(np.ascontiguousarray(w_hat)))
    q = _pre_add_streams(hf, n_layers, tokens)
    assert method.residuals.keys() == {f"{i}:{rel}" for i in range(n_layers)
                                       for rel in ("self_attn.o_proj", "mlp.down_proj")}
    for key, parts in method.residuals.items():
        r = torch.cat(parts)
        torch.testing.assert_close(r, fp[key] - q[key], rtol=1e-3, atol=1e-4, msg=key)
        if key == "0:self_attn.o_proj":  # the embeddings: both streams agree
            assert torch.equal(r, torch.zeros_like(r))
        else:
            assert r.abs().max() > 1e-3, key


def test_fitting_the_stream_changes_only_the_writers_whose_stream_differs(tiny_llama, tmp_path):
    """Against --gptq-target model: layer 0's q/k/v and o_proj (which adds into the embeddings,
    the same in both streams) keep their bytes; layer 0's down_proj, which adds into a stream the
    quantized attention moved, and everything after it change."""
    files = {}
    for target in ("model", "stream"):
        files[target] = tmp_path / f"{target}.gguf"
        quantize(tiny_llama, files[target], type="q4_0", method="gptq", method_options={"gptq_target": target},
                 calibration=CALIB, progress=False)
    data = {t: {x.name: x.data.tobytes() for x in gguf.GGUFReader(f).tensors} for t, f in files.items()}
    same = {name for name in data["model"] if data["model"][name] == data["stream"][name]}
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight", "blk.0.attn_output.weight",
                 "blk.0.ffn_gate.weight", "blk.0.ffn_up.weight"):
        assert name in same, name
    for name in ("blk.0.ffn_down.weight", "blk.1.attn_output.weight", "blk.1.attn_q.weight"):
        assert name not in same, name
