"""AWQ: the fold keeps the function, the search never loses to RTN, the file holds exactly its codes."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from exact_grid import assert_file_holds
from tiny import build_tiny_model
from torch import nn

from llmquant import CalibrationConfig, quantize
from llmquant.export.arch import get_arch
from llmquant.formats import BlockFormat, get_format
from llmquant.generate import generate
from llmquant.loading.source import read_config
from llmquant.loading.weights import WeightStore
from llmquant.methods import METHODS, make_method
from llmquant.methods.awq import AWQGPTQMethod, AWQMethod, channel_map, fold_scales, scale_gram_
from llmquant.methods.gptq import gptq_quantize_rows

CALIB = CalibrationConfig(samples=4, seqlen=128)


# --------------------------------------------------------------------------- folding on a real layer


@pytest.fixture(scope="module")
def real_layer(smollm2_dir):
    """Layer 0 of the default model, its spec, and a few hundred tokens of its real input."""
    from llmquant.loading.layers import LayerRunner

    config = read_config(smollm2_dir)
    spec = get_arch(config)
    store = WeightStore(smollm2_dir)
    runner = LayerRunner(smollm2_dir, store, spec.layer_prefix)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(100, 20000, (2, 160), generator=g)
    hidden = store.get(spec.embed)[tokens]
    runner.capture_kwargs(hidden)
    weights = {n: store.get(n) for n in spec.layer_names(0, store.__contains__)}
    layer = runner.build(0, weights)
    yield runner, layer, spec, hidden
    runner.free(0)


def _state(layer):
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


def test_fold_keeps_the_full_precision_function_of_a_real_layer(real_layer):
    runner, layer, spec, hidden = real_layer
    before = _state(layer)
    ref = runner.forward(layer, hidden)
    g = torch.Generator().manual_seed(1)
    try:
        for group in spec.sequential_groups:
            smooth = spec.smooth_from[group[0]]
            index = channel_map(layer, list(group), smooth)
            assert index is not None, group  # o_proj under GQA too (9 heads on 3 kv heads): repeated
            s = torch.exp(torch.randn(int(index.max()) + 1, generator=g) * 0.7)
            assert fold_scales(layer, list(group), smooth, s, index) == {}
        changed = [k for k, v in layer.state_dict().items() if not torch.equal(v, before[k])]
        assert len(changed) == 9  # 7 linears, 2 norms
        out = runner.forward(layer, hidden)
        assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    finally:
        layer.load_state_dict(before)


@pytest.mark.parametrize("pow2", [True, False])
def test_fold_into_an_already_quantized_linear_keeps_its_codes(pow2, real_layer):
    """down_proj ← up_proj after up_proj was quantized: same codes, each row's grid / s in fp16."""
    runner, layer, spec, hidden = real_layer
    before = _state(layer)
    fmt = get_format("q4_1")
    up = layer.mlp.up_proj
    try:
        q = fmt.rtn(up.weight.data.reshape(-1, 32).numpy())
        up.weight.data = torch.from_numpy(fmt.dequantize(q)).reshape(up.weight.shape)
        ref = runner.forward(layer, hidden)
        g = torch.Generator().manual_seed(2)
        s = torch.exp2(torch.randint(-3, 4, (up.out_features,), generator=g).float()) if pow2 else \
            torch.exp(torch.randn(up.out_features, generator=g) * 0.7)
        index = channel_map(layer, ["mlp.down_proj"], "mlp.up_proj")
        revised = fold_scales(layer, ["mlp.down_proj"], "mlp.up_proj", s, index, {"mlp.up_proj": q})
        q2 = revised["mlp.up_proj"]
        assert np.array_equal(q2.codes, q.codes)
        fmt.check(q2)  # fp16-exact scales and mins
        assert torch.equal(up.weight.data, torch.from_numpy(fmt.dequantize(q2)).reshape(up.weight.shape))
        out = runner.forward(layer, hidden)
        # exact for powers of two; else within fp16 rounding of the grids
        assert (out - ref).abs().max() <= (1e-4 if pow2 else 2e-3) * ref.abs().max()
    finally:
        layer.load_state_dict(before)


# --------------------------------------------------------------------------- the search on a toy group


class Toy(nn.Module):
    """norm -> (a, b): one group of two linears sharing the norm's output."""

    def __init__(self, ci: int = 128, co: int = 96, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.norm = nn.RMSNorm(ci, eps=1e-6)
        self.a = nn.Linear(ci, co, bias=False)
        self.b = nn.Linear(ci, co // 2, bias=False)
        with torch.no_grad():
            self.norm.weight.copy_(1 + 0.1 * torch.randn(ci, generator=g))
            self.a.weight.copy_(torch.randn(co, ci, generator=g) * 0.05)
            self.b.weight.copy_(torch.randn(co // 2, ci, generator=g) * 0.05)


def _run_group(method, toy, x, fmt):
    """observe -> prepare_group -> quantize both members; the effective weights W_hat / s."""
    with torch.no_grad():
        for xb in x.split(64):
            method.observe("0:a", toy.norm(xb))
    members = ["a", "b"]
    method.prepare_group("0:a", toy, members, "norm", fmts=dict.fromkeys(members, fmt), done={})
    st = method._groups["0:a"]
    out = {}
    for rel in members:
        W = getattr(toy, rel).weight.data
        q, report = method.quantize(f"model.layers.0.{rel}.weight", "0:a", W, fmt)
        W_hat = torch.from_numpy(fmt.dequantize(q)).reshape(W.shape)
        out[rel] = (W_hat if st.s is None else W_hat / st.s, report)
    return out


def test_equal_activations_pick_alpha_zero_and_touch_nothing():
    toy = Toy()
    signs = torch.randint(0, 2, (512, 128), generator=torch.Generator().manual_seed(3)) * 2 - 1
    x = signs.float() * 0.7  # |x| equal in every channel
    toy.norm.weight.data.fill_(1.0)  # the group's input is then equal in |x| too
    before = _state(toy)
    method = AWQMethod()
    _run_group(method, toy, x, get_format("q4_0"))
    st = method._groups["0:a"]
    assert st.extra["alpha"] == 0.0 and st.s is None
    assert all(torch.equal(v, before[k]) for k, v in toy.state_dict().items())


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1"])
def test_awq_beats_rtn_on_a_group_with_outlier_channels(qtype):
    toy = Toy()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1024, 128, generator=g)
    x[:, [3, 40, 77, 100]] *= 25.0  # a few large-magnitude input channels
    fmt = get_format(qtype)
    W_orig = {rel: getattr(toy, rel).weight.data.clone() for rel in "ab"}
    with torch.no_grad():
        X = toy.norm(x)
    method = AWQMethod()
    out = _run_group(method, toy, x, fmt)
    assert method._groups["0:a"].extra["alpha"] > 0
    err_awq = err_rtn = 0.0
    for rel, W in W_orig.items():
        W_rtn = torch.from_numpy(fmt.dequantize(fmt.rtn(W.reshape(-1, 32).numpy()))).reshape(W.shape)
        err_rtn += ((W_rtn - W) @ X.T).square().sum().item()
        err_awq += ((out[rel][0] - W) @ X.T).square().sum().item()
        report = out[rel][1]
        assert report.err_method < report.err_rtn and "clip_changed" in report.extra
    assert err_awq < 0.7 * err_rtn
    # the folded group computes the same function in full precision
    with torch.no_grad():
        for rel, W in W_orig.items():
            y = getattr(toy, rel)(toy.norm(x))
            assert (y - X @ W.T).abs().max() <= 1e-4 * y.abs().max()


def _group_error(out, W_orig, X):
    return sum(((out[rel][0] - W) @ X.T).square().sum().item() for rel, W in W_orig.items())


def test_awq_gptq_settles_alpha_by_the_error_gptq_reaches():
    """Among fractions of the RTN search's α (0 and 1 included), the group is scaled by the one whose GPTQ
    codes have the least output error; the settle's estimate is what the final walk reaches."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1024, 128, generator=g)
    x[:, [3, 40, 77, 100]] *= 25.0
    fmt = get_format("q4_0")
    results = {}
    for alpha_by in ("rtn", "gptq"):
        toy = Toy()
        W_orig = {rel: getattr(toy, rel).weight.data.clone() for rel in "ab"}
        with torch.no_grad():
            X = toy.norm(x)
        method = AWQGPTQMethod(gptq_target="layer", alpha_by=alpha_by)
        out = _run_group(method, toy, x, fmt)
        results[alpha_by] = (method._groups["0:a"].extra, _group_error(out, W_orig, X))
    (extra_rtn, err_rtn), (extra, err) = results["rtn"], results["gptq"]
    a = extra_rtn["alpha"]
    assert a > 0 and extra["alpha_rtn"] == a
    ratios = extra["gptq_err_vs_unscaled"]
    assert set(ratios) == {f"{f * a:g}" for f in AWQGPTQMethod.ALPHA_FRACTIONS} and ratios["0"] == 1.0
    assert {0.0, 1.0} <= set(AWQGPTQMethod.ALPHA_FRACTIONS)  # never worse than no scale, nor than AWQ's own α
    chosen = min(ratios, key=ratios.get)
    assert f"{extra['alpha']:g}" == chosen
    # the estimate (every row: 96 ≤ ALPHA_ROWS) is the final codes' own error, relative to α = 0's
    toy = Toy()
    with torch.no_grad():
        X = toy.norm(x)
    G = X.T @ X / X.shape[0]
    Ws = [toy.a.weight.data, toy.b.weight.data]
    err0 = sum(((r.W_hat - W) @ X.T).square().sum().item()
               for W, r in zip(Ws, gptq_quantize_rows(Ws, G, fmt, h_scale=2.0), strict=True))
    assert err / err0 == pytest.approx(ratios[chosen], rel=1e-4)
    assert err <= err_rtn * (1 + 1e-6)  # the RTN search's α is one of the candidates


# --------------------------------------------------------------------------- whole pipeline, tiny model


class Recording:
    """Keeps the weights the method handed to the pipeline, and the norms it folded."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.w_hat: dict[str, np.ndarray] = {}
        self.norms: dict[str, np.ndarray] = {}
        self.revised: list[str] = []

    def prepare_group(self, group, layer, members, smooth, **kw):
        revised = super().prepare_group(group, layer, members, smooth, **kw)
        prefix = f"model.layers.{group.split(':')[0]}."
        mod = layer.get_submodule(smooth)
        if mod.weight.dim() == 1:
            self.norms[prefix + smooth + ".weight"] = mod.weight.detach().numpy().copy()
        for rel, q in (revised or {}).items():
            self.w_hat[prefix + rel + ".weight"] = BlockFormat.dequantize(q).reshape(mod.weight.shape)
            self.revised.append(prefix + rel)
        return revised

    def quantize_group(self, group, members):
        out = super().quantize_group(group, members)
        for (name, W, fmt), (q, _) in zip(members, out, strict=True):
            self.w_hat[name] = fmt.dequantize(q).reshape(W.shape)
        return out


class RecordingAWQ(Recording, AWQMethod):
    pass


class RecordingAWQGPTQ(Recording, AWQGPTQMethod):
    pass


@pytest.fixture(scope="module")
def tiny_llama(smollm2_dir, tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama", smollm2_dir, hidden=128)


@pytest.mark.parametrize(("cls", "qtype"), [(RecordingAWQ, "q4_0"), (RecordingAWQGPTQ, "q4_1")])
def test_file_holds_exactly_the_awq_weights_and_runs(cls, qtype, tiny_llama, tmp_path):
    method = cls(n_grid=10)
    out = tmp_path / f"{method.name}-{qtype}.gguf"
    report = quantize(tiny_llama, out, type=qtype, method=method, calibration=CALIB, progress=False)
    assert_file_holds(tiny_llama, out, method.w_hat, qtype)
    config = read_config(tiny_llama)
    spec = get_arch(config)
    by_name = {t.name: t for t in gguf.GGUFReader(out).tensors}
    for hf_name, norm in method.norms.items():  # folded norms are in the file as folded
        assert np.array_equal(np.asarray(by_name[spec.gguf_tensor_name(hf_name, 2)].data), norm), hf_name
    alphas = [r.extra["alpha"] for r in report.linears]
    assert len(alphas) == 14 and any(a > 0 for a in alphas)
    assert method.revised  # o_proj/down_proj scales went into an already-quantized v_proj/up_proj
    text = generate(out, "Hello", max_tokens=4)
    assert text.startswith("Hello") and len(text) > len("Hello")


def test_methods_are_registered():
    assert {"awq", "awq+gptq"} <= set(METHODS)
    assert make_method("awq", n_grid=5).name == "awq"
    assert make_method("awq+gptq", damp=0.02).name == "awq+gptq"


# --------------------------------------------------------------------------- the scaled Gram matrix


@pytest.mark.parametrize("ci", [300, 129, 7])  # slices of 19 (the last short), 9 (short), 1
def test_scaled_gram_in_place_equals_the_one_shot_division(ci):
    """Row slices give every element exactly as G / (s sᵀ) does, in G's own storage."""
    g = torch.Generator().manual_seed(ci)
    x = torch.randn(512, ci, generator=g)
    G = x.T @ x / 512
    s = torch.rand(ci, generator=g) * 3 + 0.1
    want = G / (s[:, None] * s[None, :])
    ptr = G.data_ptr()
    out = scale_gram_(G, s)
    assert out.data_ptr() == ptr and out.dtype == torch.float32
    assert torch.equal(out, want)
