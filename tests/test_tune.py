"""Quantization-aware tuning: the STE gradient, keep-best, the exact grid, llama.cpp loads the result."""

from __future__ import annotations

import dataclasses

import gguf
import numpy as np
import pytest
import torch
from exact_grid import assert_file_holds
from tiny import build_tiny_model

from llmquant import CalibrationConfig, quantize
from llmquant.formats import get_format
from llmquant.generate import generate
from llmquant.methods import make_method
from llmquant.methods.tune import AWQGPTQTuneMethod, TuneMethod, _start_state, output_error, token_weights

CALIB = CalibrationConfig(samples=8, seqlen=64)


# --------------------------------------------------------------------------- the gradient on one linear


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q4_k"])
def test_ste_gradient_matches_finite_differences(qtype):
    """Autograd through fake_quant, against central differences in float64 of the same loss with the
    rounding taken straight through: the offsets V move the unrounded code (0 where it is clipped),
    α and β move each block's scale and min under fixed codes."""
    fmt = get_format(qtype)
    g = torch.Generator().manual_seed(1)
    W = torch.randn(4, 256, generator=g)
    x = torch.randn(32, 256, generator=g)
    y = x @ (W + 0.05 * torch.randn(4, 256, generator=g)).T
    st = _start_state(fmt, fmt.rtn(W.reshape(-1, fmt.block_size).numpy()), W)
    with torch.no_grad():
        st.V.uniform_(-0.4, 0.4, generator=g)
    loss = ((x @ st.weights().T - y) ** 2).mean()
    loss.backward()

    Win, s, m = (None if t is None else t.detach() for t in st.latent())
    p = st.grid(s, m)
    es, em = p.scales.reshape(4, -1, 1), None if p.mins is None else p.mins.reshape(4, -1, 1)
    blocks = Win.reshape(4, -1, fmt.sub_size)
    codes = fmt.nearest_codes(blocks, es, em).double()
    v = (blocks if em is None else blocks - em) / es
    inside = ((v >= fmt.qmin) & (v <= fmt.qmax)).double()
    x64, y64 = x.double(), y.double()

    def loss64(V=None, alpha=None, beta=None):
        """The loss with the rounding straight through (V moves the code) and the projection too
        (α, β move the stored scale and min as they move the ideal ones, under fixed codes)."""
        step = st.step.double()
        sc = es.double() if alpha is None else es.double() + ((alpha - 1) * st.s0.double())[..., None]
        mn = None if em is None else em.double() if beta is None else em.double() + ((beta - 1) * st.m0.double())[..., None]
        c = codes if V is None else codes + inside * (V - st.V.detach().double()) * step / es.double()
        w = c * sc + (0 if mn is None else mn)
        return float(((x64 @ w.reshape(4, -1).T - y64) ** 2).mean())

    eps = 1e-4
    rng = np.random.default_rng(0)
    V0 = st.V.detach().double()
    for _ in range(6):  # a few single coordinates of V, α and β
        i, j, k = rng.integers(4), rng.integers(blocks.shape[1]), rng.integers(fmt.sub_size)
        e = torch.zeros_like(V0)
        e[i, j, k] = eps
        fd = (loss64(V=V0 + e) - loss64(V=V0 - e)) / (2 * eps)
        assert st.V.grad[i, j, k].item() == pytest.approx(fd, rel=1e-3, abs=1e-6)
        for param, key in ((st.alpha, "alpha"), (st.beta, "beta")):
            if param is None:
                continue
            one = torch.ones_like(param, dtype=torch.float64)
            e = torch.zeros_like(one)
            e[i, j] = eps
            fd = (loss64(**{key: one + e}) - loss64(**{key: one - e})) / (2 * eps)
            assert param.grad[i, j].item() == pytest.approx(fd, rel=1e-3, abs=1e-6), key
    clipped = inside == 0
    if clipped.any():
        assert (st.V.grad[clipped.expand_as(st.V.grad)] == 0).all()


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q4_k", "q6_k"])
def test_start_state_reproduces_the_start_codes(qtype):
    """Before any step the iterate is exactly the start method's codes and stored grid (also where
    GPTQ's codes are not the nearest ones of the continuous weights, and a k-quant's super-scales)."""
    fmt = get_format(qtype)
    g = torch.Generator().manual_seed(2)
    W = torch.randn(8, 256, generator=g)
    q = fmt.rtn(W.reshape(-1, fmt.block_size).numpy())
    codes = q.codes.copy()
    codes[0, :4] = np.clip(codes[0, :4] + 3, fmt.qmin, fmt.qmax)  # not the nearest codes any more
    q = dataclasses.replace(q, codes=codes)
    st = _start_state(fmt, q, W)
    again = st.blocks()
    assert np.array_equal(again.codes, q.codes) and np.array_equal(again.scales, q.scales)
    assert (q.mins is None) == (again.mins is None) and (q.mins is None or np.array_equal(again.mins, q.mins))
    if q.grid is not None:
        assert np.array_equal(again.grid.sc, q.grid.sc) and np.array_equal(again.grid.d, q.grid.d)
    fmt.check(again)
    assert torch.equal(st.weights().detach().reshape(-1, fmt.sub_size), torch.from_numpy(fmt.dequantize(q)))


# --------------------------------------------------------------------------- whole layers, whole files


class RecordingTune(AWQGPTQTuneMethod):
    """awq+gptq+tune that keeps each linear's final weights and each layer's tuning summary."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self._w_hat, self._layers = {}, []

    def quantize_layer(self, work):
        codes = super().quantize_layer(work)
        for rel in work.formats:
            self._w_hat[work.name(rel)] = work.layer.get_submodule(rel).weight.data.numpy().copy()
        self._layers.append(work.reports[0].extra["tune"])
        return codes

    @property
    def w_hat(self):
        return self._w_hat


@pytest.fixture(scope="module")
def tiny_llama(smollm2_dir, tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-tune") / "llama", "llama", smollm2_dir, hidden=128)


@pytest.fixture(scope="module")
def tiny_k(smollm2_dir, tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-tune-k") / "llama", "llama", smollm2_dir, hidden=256,
                            intermediate=512)


@pytest.mark.parametrize(("fixture", "qtype"), [("tiny_llama", "q4_0"), ("tiny_k", "q4_k")])
def test_file_holds_exactly_the_tuned_weights_and_runs(fixture, qtype, request, tmp_path):
    model = request.getfixturevalue(fixture)
    method = RecordingTune(steps=30, n_grid=5, gptq_target="layer")  # a start that leaves tuning room in 30 steps
    out = tmp_path / f"tune-{qtype}.gguf"
    quantize(model, out, type=qtype, pure=True, method=method, calibration=CALIB, progress=False)
    assert_file_holds(model, out, method.w_hat, qtype)
    assert len(method._layers) == 2
    for s in method._layers:  # keep best: never above the start; and tuning does find something here
        assert s["layer_err_tuned"] < s["layer_err_start"] or s["kept"] == "start"
    assert any(s["kept"] == "tuned" and s["layer_err_tuned"] < 0.95 * s["layer_err_start"] for s in method._layers)
    text = generate(out, "Hello", max_tokens=4)
    assert text.startswith("Hello") and len(text) > len("Hello")


def _tensor_bytes(path):
    return {t.name: bytes(np.asarray(t.data).view(np.uint8).tobytes()) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("loss", ["hidden", "normed"])
def test_tuning_that_hurts_keeps_the_start(loss, tiny_llama, tmp_path):
    """A step size far too large wrecks the iterate: every layer keeps its start, so the file holds
    exactly what the start method (rtn) writes, whichever error the tuning measures."""
    method = make_method("tune", steps=3, lr=1.0, loss=loss)
    seen = []
    orig = method.quantize_layer

    def spy(work):
        codes = orig(work)
        seen.append(work.reports[0].extra["tune"])
        return codes

    method.quantize_layer = spy
    out = tmp_path / "hurt.gguf"
    quantize(tiny_llama, out, type="q4_0", method=method, calibration=CALIB, progress=False)
    assert len(seen) == 2
    assert all(s["kept"] == "start" and s["layer_err_tuned"] > s["layer_err_start"] for s in seen), seen
    rtn = tmp_path / "rtn.gguf"
    quantize(tiny_llama, rtn, type="q4_0", method="rtn", progress=False)
    tuned, start = _tensor_bytes(out), _tensor_bytes(rtn)
    assert tuned.keys() == start.keys()
    assert [name for name in tuned if tuned[name] != start[name]] == []


class TargetsSeen(AWQGPTQTuneMethod):
    """awq+gptq+tune that keeps each layer's targets and inputs as the pipeline handed them."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self._seen = []

    def quantize_layer(self, work):
        self._seen.append((None if work.targets is None else work.targets.clone(), work.inputs.clone()))
        return super().quantize_layer(work)


def test_model_target_is_the_full_precision_models_own_layer_output(tiny_llama, tmp_path):
    """By default (``target="model"``) each layer is fitted to what the unquantized HF model computes there
    (forward hooks on transformers' own layers, fed the same calibration tokens), while its inputs
    are the quantized stream; with ``target="layer"`` (and a start fitted to its layers) no second
    stream is carried."""
    from transformers import AutoModelForCausalLM

    from llmquant.calibration import calibration_tokens

    method = TargetsSeen(steps=4, n_grid=5)  # the default
    quantize(tiny_llama, tmp_path / "m.gguf", type="q4_0", method=method, calibration=CALIB, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, torch_dtype=torch.float32).eval()
    outs = []
    hooks = [layer.register_forward_hook(lambda _m, _i, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for layer in hf.model.layers]
    with torch.no_grad():
        hf(calibration_tokens(tiny_llama, CALIB))
    for h in hooks:
        h.remove()
    assert len(method._seen) == len(outs) == 2
    for i, ((targets, _inputs), ref) in enumerate(zip(method._seen, outs, strict=True)):
        torch.testing.assert_close(targets, ref, rtol=1e-4, atol=1e-4, msg=f"layer {i}")
    # layer 1's inputs are the quantized layer 0's outputs, not the full-precision ones
    assert (method._seen[1][1] - outs[0]).abs().max() > 1e-2
    plain = TargetsSeen(steps=4, n_grid=5, target="layer", gptq_target="layer")
    quantize(tiny_llama, tmp_path / "l.gguf", type="q4_0", method=plain, calibration=CALIB, progress=False)
    assert [t for t, _ in plain._seen] == [None, None]


def test_normed_loss_weighs_each_token_as_the_next_norm_sees_it():
    """A token with massive activations (the attention sink) and the same relative error as the others
    dominates the plain hidden-state error, but counts as one token of many under ``normed``; and
    ``normed`` is unchanged when one token's output and target are scaled together, as RMSNorm is."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(2, 16, 32, generator=gen)
    y[:, 0] *= 1000.0
    out = y * (1 + 0.01 * torch.randn(y.shape, generator=gen))
    share = {}
    for loss in ("hidden", "normed"):
        w = token_weights(y, loss)
        per_token = torch.stack([output_error(out[:, t:t + 1], y[:, t:t + 1], None if w is None else w[:, t:t + 1])
                                 for t in range(16)])
        share[loss] = float(per_token[0] / per_token.sum())
        torch.testing.assert_close(output_error(out, y, w), per_token.mean())
    assert share["hidden"] > 0.99 and share["normed"] < 0.2, share
    scaled_y, scaled_out = y.clone(), out.clone()
    scaled_y[1, 5] *= 37.0
    scaled_out[1, 5] *= 37.0
    w, ws = token_weights(y, "normed"), token_weights(scaled_y, "normed")
    torch.testing.assert_close(output_error(scaled_out, scaled_y, ws), output_error(out, y, w))
    assert not torch.allclose(output_error(scaled_out, scaled_y, None), output_error(out, y, None))


def test_tune_methods_are_registered_with_their_options():
    m = make_method("awq+gptq+tune", steps=7, damp=0.02)
    assert isinstance(m, TuneMethod) and m.settings()["steps"] == 7 and m.settings()["damp"] == 0.02
    assert {"tune", "gptq+tune", "awq+tune", "awq+gptq+tune"} <= set(__import__("llmquant").methods.METHODS)


@pytest.mark.parametrize(("qtype", "act_order"), [("q4_0", False), ("q4_1", True), ("q4_k", False)])
def test_gptq_hands_over_the_weights_it_rounded(qtype, act_order):
    """GPTQ's codes are the nearest codes of its error-updated weights (what tuning starts from),
    not of the weights it was given."""
    from llmquant.methods.gptq import gptq_quantize

    fmt = get_format(qtype)
    g = torch.Generator().manual_seed(3)
    W = torch.randn(16, 512, generator=g)
    X = torch.randn(2048, 512, generator=g) * torch.linspace(0.2, 3.0, 512)
    res = gptq_quantize(W, 2 * X.T @ X / len(X), fmt, act_order=act_order)
    s = torch.from_numpy(res.q.scales).reshape(16, -1, 1)
    m = None if res.q.mins is None else torch.from_numpy(res.q.mins).reshape(16, -1, 1)
    codes = torch.from_numpy(res.q.codes.astype("float32")).reshape(16, -1, fmt.sub_size)
    near = fmt.nearest_codes(res.rounded.reshape(16, -1, fmt.sub_size), s, m)
    assert torch.equal(near, codes)
    assert not torch.equal(fmt.nearest_codes(W.reshape(16, -1, fmt.sub_size), s, m), codes)


def test_tuning_starts_from_gptq_fitted_to_the_model(tiny_llama, tmp_path):
    """gptq_target reaches the start method: with no steps, awq+gptq+tune writes awq+gptq's own
    tensors for each target, and the targets differ."""
    files = {}
    for method, options in (("awq+gptq+tune", {"steps": 0, "gptq_target": "model", "n_grid": 5}),
                            ("awq+gptq+tune", {"steps": 0, "gptq_target": "stream", "n_grid": 5}),
                            ("awq+gptq", {"gptq_target": "model", "n_grid": 5}),
                            ("awq+gptq", {"gptq_target": "stream", "n_grid": 5}),
                            ("awq+gptq", {"gptq_target": "layer", "n_grid": 5})):
        path = tmp_path / f"{method}-{options['gptq_target']}.gguf"
        quantize(tiny_llama, path, type="q4_0", method=method, method_options=options, calibration=CALIB,
                 progress=False)
        files[(method, options["gptq_target"])] = _tensor_bytes(path)
    assert files[("awq+gptq+tune", "model")] == files[("awq+gptq", "model")]
    assert files[("awq+gptq+tune", "stream")] == files[("awq+gptq", "stream")]
    assert files[("awq+gptq", "model")] != files[("awq+gptq", "layer")]
    assert files[("awq+gptq", "stream")] != files[("awq+gptq", "model")]
