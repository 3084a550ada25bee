"""GPTQ on ggml grids: valid blocks, bit-exact W_hat, error below RTN."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize

from llmquant.formats import QuantBlocks, get_format
from llmquant.methods import gptq
from llmquant.methods.gptq import (
    HessianAccumulator,
    HessianError,
    accumulate_cross,
    accumulate_hessian,
    accumulate_residual,
    gptq_quantize,
    gptq_quantize_rows,
    model_target,
    rtn_search,
)

FORMATS = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]
CO, CI, N = 48, 256, 2048


@pytest.fixture(scope="module")
def layer():
    """A random Linear W [48, 256] with correlated inputs X [2048, 256] and H = 2/n XᵀX."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(CI, CI, generator=g) / CI**0.5 + 0.3 * torch.eye(CI)
    X = torch.randn(N, CI, generator=g) @ A
    X[:, :8] *= 6.0  # a few strong input channels, as in LLM activations
    W = 0.05 * torch.randn(CO, CI, generator=g)
    W[:, 100] *= 8.0  # and a few outlier weights
    acc = HessianAccumulator(CI)
    acc.add(X.reshape(8, N // 8, CI))
    return W, X, acc.hessian()


def out_err(W, W_hat, X) -> float:
    """Relative output error ||W Xᵀ - Ŵ Xᵀ||² / ||W Xᵀ||²."""
    return (((W - W_hat) @ X.T).square().sum() / (W @ X.T).square().sum()).item()


def rtn_hat(W, fmt) -> torch.Tensor:
    return torch.from_numpy(fmt.dequantize(fmt.rtn(W.reshape(-1, 32).numpy()))).reshape(W.shape)


def assert_valid(q: QuantBlocks, W_hat: torch.Tensor, fmt, shape) -> None:
    """q is on fmt's grid, in ggml block order, and W_hat is exactly what llama.cpp reads."""
    co, ci = shape
    assert q.codes.dtype == np.int16 and q.codes.shape == (co * ci // 32, 32)
    assert q.codes.min() >= fmt.qmin and q.codes.max() <= fmt.qmax
    assert q.scales.dtype == np.float32 and q.scales.shape == (co * ci // 32,)
    assert np.array_equal(q.scales.astype(np.float16).astype(np.float32), q.scales)
    assert (q.mins is not None) == fmt.has_min
    if fmt.has_min:
        assert np.array_equal(q.mins.astype(np.float16).astype(np.float32), q.mins)
    fmt.check(q)
    assert W_hat.dtype == torch.float32 and W_hat.shape == (co, ci)
    assert np.array_equal(fmt.dequantize(q).reshape(co, ci), W_hat.numpy())
    packed = fmt.pack(q).reshape(co, -1)
    assert np.array_equal(gguf_dequantize(packed, fmt.qtype), W_hat.numpy())


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", FORMATS)
def test_gptq_valid_and_below_rtn(layer, name, act_order):
    W, X, H = layer
    fmt = get_format(name)
    r = gptq_quantize(W, H, fmt, act_order=act_order)
    assert_valid(r.q, r.W_hat, fmt, W.shape)
    assert out_err(W, r.W_hat, X) < 0.8 * out_err(W, rtn_hat(W, fmt), X)
    assert 0 < r.rel_err < r.rel_err_rtn
    assert r.damp == 0.01 and r.n_dead == 0


@pytest.mark.parametrize("name", ["q4_0", "q5_1"])
def test_gptq_search_loss_gptq(layer, name):
    W, X, H = layer
    fmt = get_format(name)
    r = gptq_quantize(W, H, fmt, search_loss="gptq")
    assert_valid(r.q, r.W_hat, fmt, W.shape)
    assert out_err(W, r.W_hat, X) < 0.8 * out_err(W, rtn_hat(W, fmt), X)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", ["q4_0", "q4_1"])
def test_diagonal_hessian_is_rtn_grid(name, act_order):
    """With a diagonal H nothing propagates: the grid is llama.cpp's, block for block."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(6, 64, generator=g)
    H = torch.diag(torch.rand(64, generator=g) + 0.5)  # random diag: a real permutation
    fmt = get_format(name)
    r = gptq_quantize(W, H, fmt, act_order=act_order, scale_search=False)
    ref = fmt.rtn(W.reshape(-1, 32).numpy())
    assert np.array_equal(r.q.scales, ref.scales)
    if fmt.has_min:
        assert np.array_equal(r.q.mins, ref.mins)
    nearest = fmt.nearest_codes(
        W.reshape(-1, 32), torch.from_numpy(ref.scales)[:, None],
        None if ref.mins is None else torch.from_numpy(ref.mins)[:, None],
    )
    assert np.array_equal(r.q.codes, nearest.numpy())


@pytest.mark.parametrize("act_order", [False, True])
def test_block_layout_follows_rows_and_columns(layer, act_order):
    """Blocks of very different magnitude keep their own scale: r * ci/32 + b order survives.

    Rows never mix in GPTQ, so row magnitudes always show in the scales; column
    blocks mix through the error feedback, so their magnitudes show only with
    act_order's static groups (grids from the original W).
    """
    W, X, H = layer
    rowmag = 1.0 + torch.arange(CO).float()
    colmag = 10.0 ** torch.arange(CI // 32).float().remainder(4)
    Ws = W * rowmag[:, None]
    if act_order:
        Ws = Ws * colmag.repeat_interleave(32)[None, :]
    fmt = get_format("q4_0")
    r = gptq_quantize(Ws, H, fmt, act_order=act_order)
    assert_valid(r.q, r.W_hat, fmt, Ws.shape)
    amax = Ws.reshape(-1, 32).abs().amax(dim=1).numpy()
    ratio = np.abs(r.q.scales) * 8 / amax
    assert ratio.min() > 0.5 and ratio.max() < 2.0
    assert out_err(Ws, r.W_hat, X) < out_err(Ws, rtn_hat(Ws, fmt), X)


@pytest.mark.parametrize("name", ["q4_0", "q5_1"])
def test_scale_search_beats_llama_rule(layer, name):
    W, X, H = layer
    fmt = get_format(name)
    on = out_err(W, gptq_quantize(W, H, fmt, scale_search=True).W_hat, X)
    off = out_err(W, gptq_quantize(W, H, fmt, scale_search=False).W_hat, X)
    assert on < off


def test_scale_search_beats_llama_rule_on_average(layer):
    W, X, H = layer
    ratios = []
    for name in FORMATS:
        fmt = get_format(name)
        on = out_err(W, gptq_quantize(W, H, fmt, scale_search=True).W_hat, X)
        off = out_err(W, gptq_quantize(W, H, fmt, scale_search=False).W_hat, X)
        ratios.append(on / off)
    assert np.mean(ratios) < 0.97


@pytest.mark.parametrize("act_order", [False, True])
def test_dead_columns(layer, act_order):
    """Inputs never active: H[i,i] = 0. Valid blocks; those weights are kept, not zeroed."""
    W, X, _ = layer
    X = X.clone()
    dead = torch.tensor([3, 40, 41, 200])
    X[:, dead] = 0
    acc = HessianAccumulator(CI)
    acc.add(X)
    fmt = get_format("q4_0")
    r = gptq_quantize(W, acc.hessian(), fmt, act_order=act_order)
    assert_valid(r.q, r.W_hat, fmt, W.shape)
    assert r.n_dead == len(dead)
    assert out_err(W, r.W_hat, X) < out_err(W, rtn_hat(W, fmt), X)
    step = np.abs(r.q.scales).reshape(CO, -1)[:, dead.numpy() // 32]
    assert np.all(np.abs((W - r.W_hat)[:, dead].numpy()) <= 8 * step + 1e-6)
    assert r.W_hat[:, dead].abs().sum() > 0


def test_singular_hessian_rescued_by_damping(layer):
    """16 tokens for 256 inputs: rank-deficient H; with damp=0 the retry adds damping."""
    W, X, _ = layer
    H = 2 / 16 * X[:16].T @ X[:16]
    fmt = get_format("q4_0")
    r = gptq_quantize(W, H, fmt, damp=0.0)
    assert r.damp > 0
    assert_valid(r.q, r.W_hat, fmt, W.shape)
    assert out_err(W, r.W_hat, X[:16]) < out_err(W, rtn_hat(W, fmt), X[:16])


def test_unusable_hessians_raise(layer):
    """All-zero H (no calibration signal) and indefinite H raise HessianError (caller falls back to RTN)."""
    W = layer[0]
    fmt = get_format("q4_0")
    with pytest.raises(HessianError):
        gptq_quantize(W, torch.zeros(CI, CI), fmt)
    with pytest.raises(HessianError):
        gptq_quantize(W, -torch.eye(CI), fmt)
    bad = torch.eye(CI)
    bad[0, 1] = float("nan")
    with pytest.raises(HessianError):
        gptq_quantize(W, bad, fmt)
    with pytest.raises(HessianError):
        HessianAccumulator(CI).hessian()


def test_bad_shapes_raise(layer):
    W, _, H = layer
    fmt = get_format("q4_0")
    with pytest.raises(ValueError):
        gptq_quantize(W[:, :40], H[:40, :40], fmt)
    with pytest.raises(ValueError):
        gptq_quantize(W, H, fmt, block_cols=48)


def test_hessian_accumulator_sums_then_divides():
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(2, 5, 64, generator=g), torch.randn(7, 64, generator=g).double()]
    acc = HessianAccumulator(64, dtype=torch.float64)
    for x in xs:
        acc.add(x)
    X = torch.cat([x.reshape(-1, 64).double() for x in xs])
    assert acc.n == 17
    torch.testing.assert_close(acc.hessian(), 2 / 17 * X.T @ X)
    XtX = torch.zeros(64, 64)
    assert accumulate_hessian(XtX, xs[0]) == 10
    torch.testing.assert_close(XtX, xs[0].reshape(-1, 64).T @ xs[0].reshape(-1, 64))


def test_float32_hessian_is_enough(layer):
    """A float32 running sum gives the same result as float64, up to rare ties."""
    W, X, _ = layer
    a32, a64 = HessianAccumulator(CI), HessianAccumulator(CI, dtype=torch.float64)
    for xb in X.split(128):
        a32.add(xb)
        a64.add(xb)
    fmt = get_format("q4_0")
    r32, r64 = gptq_quantize(W, a32.hessian(), fmt), gptq_quantize(W, a64.hessian(), fmt)
    assert (r32.q.codes == r64.q.codes).mean() > 0.99
    assert out_err(W, r32.W_hat, X) == pytest.approx(out_err(W, r64.W_hat, X), rel=1e-2)


@pytest.mark.parametrize("name", FORMATS)
def test_rtn_search(layer, name):
    """Scale search without feedback: valid, and never worse than llama.cpp's grid in its own loss."""
    W, X, H = layer
    fmt = get_format(name)
    hdiag = H.diagonal()
    q = rtn_search(W, fmt, hdiag)
    W_hat = torch.from_numpy(fmt.dequantize(q)).reshape(W.shape)
    assert_valid(q, W_hat, fmt, W.shape)

    def hloss(Wh):
        return ((W - Wh).square() * hdiag).sum().item()

    assert hloss(W_hat) < hloss(rtn_hat(W, fmt))
    q_plain = rtn_search(W, fmt)
    W_plain = torch.from_numpy(fmt.dequantize(q_plain)).reshape(W.shape)
    assert (W - W_plain).square().sum() <= (W - rtn_hat(W, fmt)).square().sum()


@pytest.mark.parametrize("search_loss", ["hdiag", "gptq"])
def test_chunked_search_is_the_same(layer, monkeypatch, search_loss):
    """Row chunks (which bound memory on wide layers) do not change the result."""
    W, _, H = layer
    fmt = get_format("q4_1")
    full = gptq_quantize(W, H, fmt, search_loss=search_loss)
    monkeypatch.setattr(gptq, "_SEARCH_CHUNK", 7)
    chunked = gptq_quantize(W, H, fmt, search_loss=search_loss)
    assert np.array_equal(full.q.codes, chunked.q.codes)
    assert np.array_equal(full.q.scales, chunked.q.scales)
    assert np.array_equal(full.q.mins, chunked.q.mins)


@pytest.mark.parametrize("order", ["natural", "permuted"])
def test_inverse_factor_equals_the_direct_one(layer, order):
    """U from one Cholesky of the reversed H and one triangular solve is the upper Cholesky factor
    of (H + λI)⁻¹ taken directly (float64 reference), in visiting order, dead columns set to 1."""
    _, _, H = layer
    H = H.clone()
    H[:, [5, 77]] = 0
    H[[5, 77], :] = 0
    dead = H.diagonal() == 0
    perm = torch.arange(CI) if order == "natural" else torch.randperm(CI, generator=torch.Generator().manual_seed(3))
    U, damp = gptq._inverse_cholesky(H, dead, perm, 0.01)
    Hp = H.double()
    Hp.diagonal()[dead] = 1.0
    Hp = Hp[perm][:, perm]
    Hp.diagonal().add_(0.01 * Hp.diagonal().mean())
    ref = torch.linalg.cholesky(torch.linalg.inv(Hp), upper=True)
    assert U.dtype == torch.float32 and damp == 0.01
    assert torch.equal(U, U.triu())
    torch.testing.assert_close(U.double(), ref, rtol=1e-5, atol=1e-6)
    assert not torch.equal(U, gptq._inverse_cholesky(H, dead, torch.arange(CI).flip(0), 0.01)[0])


def test_hessian_is_divided_once_in_place():
    """The linears of a group share one H: no second ci×ci copy, and no sum after the division."""
    acc = HessianAccumulator(16)
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(4))
    acc.add(x)
    H = acc.hessian()
    assert H.data_ptr() == acc.XtX.data_ptr() and acc.hessian() is H
    torch.testing.assert_close(H, 2 / 10 * x.T @ x)
    with pytest.raises(RuntimeError, match="after hessian"):
        acc.add(x)


def test_mean_is_divided_once_in_place_and_excludes_the_hessian():
    """AWQ's Σxᵀx/n is the sum divided in place, exactly as a one-shot division; the sum is then gone."""
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(5))
    acc = HessianAccumulator(16)
    acc.add(x)
    want = acc.XtX / 10
    G = acc.mean()
    assert G.data_ptr() == acc.XtX.data_ptr() and acc.mean() is G
    assert torch.equal(G, want)
    with pytest.raises(RuntimeError, match="after mean"):
        acc.add(x)
    with pytest.raises(RuntimeError, match=r"hessian\(\) after mean"):
        acc.hessian()
    other = HessianAccumulator(16)
    other.add(x)
    other.hessian()
    with pytest.raises(RuntimeError, match=r"mean\(\) after hessian"):
        other.mean()


PEAK = r"""
import sys, torch
torch.set_num_threads(1)
from llmquant.methods import gptq
n = int(sys.argv[1])
def status(key):
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith(key)) * 1024
X = torch.randn(n + 64, n, generator=torch.Generator().manual_seed(0))
H = X.T @ X
del X
before = status("VmRSS:")
U, _ = gptq._inverse_cholesky(H, torch.zeros(n, dtype=torch.bool), torch.arange(n), 0.01)
print((status("VmHWM:") - before) / (n * n * 8))
"""


def test_inverse_factor_peak_is_one_float64_matrix_and_the_result():
    """At Llama-70B's down_proj width (ci = 28672) one float64 ci×ci matrix is 6.6 GB: the factor of H⁻¹
    must take one of them, the float32 result and slices (the direct route took five matrices). Measured in
    a fresh process, as its high-water resident memory over what it held before. glibc's mmap threshold is
    fixed there, so freed slices go back to the OS at once, as they do at large widths; left to adapt it, the
    peak came out one of two ways from run to run (the second one 0.28 matrices higher)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", PEAK, "4096"], capture_output=True, text=True, check=True, env=env)
    peak = float(out.stdout.strip())
    assert 1.5 <= peak < 2.0, peak


@pytest.mark.parametrize("n", [513, 1300])
@pytest.mark.parametrize("layout", ["row-major", "column-major"])
def test_lower_inversion_in_place_equals_the_solve(n, layout):
    """The recursive in-place inversion, past its base block size, equals a triangular solve against I."""
    g = torch.Generator().manual_seed(n)
    X = torch.randn(n + 8, n, generator=g, dtype=torch.float64)
    L = torch.linalg.cholesky(X.T @ X + torch.eye(n, dtype=torch.float64))
    ref = torch.linalg.solve_triangular(L, torch.eye(n, dtype=torch.float64), upper=False)
    M = L.clone() if layout == "row-major" else L.mT.contiguous().mT
    gptq._invert_lower_(M)
    torch.testing.assert_close(M, ref, rtol=0, atol=1e-12 * ref.abs().max().item())
    assert torch.equal(M.triu(1), torch.zeros_like(M))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", ["q4_0", "q5_1", "q4_K", "q6_K"])
def test_h_scale_is_bitwise_the_scaled_hessian(layer, name, act_order):
    """AWQ's H = 2·G, doubled inside GPTQ's float64 copy, writes the bytes that a float32 2·G wrote,
    dead columns (whose diagonal is set to 1, not scaled) included. A small scale (2⁻¹⁰), where that
    1 outweighs every live diagonal, shows the scale is applied, not dropped."""
    W, _, H = layer
    G = H / 2
    G[:, 7] = G[7, :] = 0.0  # a dead column
    fmt = get_format(name)
    for scale in (2.0, 2.0**-10):
        a = gptq_quantize(W, scale * G, fmt, act_order=act_order)
        b = gptq_quantize(W, G, fmt, act_order=act_order, h_scale=scale)
        assert np.array_equal(fmt.pack(a.q), fmt.pack(b.q))
        assert torch.equal(a.W_hat, b.W_hat) and torch.equal(a.rounded, b.rounded)
        assert (a.rel_err, a.rel_err_rtn, a.damp, a.n_dead) == (b.rel_err, b.rel_err_rtn, b.damp, 1)
    assert not torch.equal(gptq_quantize(W, G, fmt, act_order=act_order).W_hat, b.W_hat)


@pytest.mark.parametrize("name,search_loss", [("q4_1", "hdiag"), ("q5_0", "gptq"), ("q4_K", "hdiag")])
def test_walk_bytes_do_not_depend_on_the_thread_count(monkeypatch, name, search_loss):
    """The block searches run their row chunks side by side on torch's threads; codes, grids and
    the rounded weights are those of one thread."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(1024, 512, generator=g) * (torch.rand(512, generator=g) * 3)
    W, H = torch.randn(40, 512, generator=g), 2 / 1024 * X.T @ X
    fmt = get_format(name)
    monkeypatch.setattr(gptq, "_SEARCH_CHUNK", 7)  # several chunks per block column
    before = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(gptq_quantize(W, H, fmt, search_loss=search_loss))
    finally:
        torch.set_num_threads(before)
    one, two = runs
    for a, b in [(one.q.codes, two.q.codes), (one.q.scales, two.q.scales), (one.q.mins, two.q.mins)]:
        assert (a is None and b is None) or np.array_equal(a, b)
    assert torch.equal(one.rounded, two.rounded) and torch.equal(one.W_hat, two.W_hat)


@pytest.mark.parametrize("name", ["q4_0", "q4_K"])
def test_walk_searches_on_all_threads_and_walks_columns_on_one(monkeypatch, name):
    """Each block's grid search sees the caller's thread count; the column loop runs on one thread."""
    seen: dict[str, set] = {"search": set(), "columns": set()}
    fmt = get_format(name)

    def spy(key, fn):
        def call(*a, **k):
            seen[key].add(torch.get_num_threads())
            return fn(*a, **k)
        return call

    monkeypatch.setattr(gptq, "search_grid", spy("search", gptq.search_grid))
    monkeypatch.setattr(gptq, "_columns", spy("columns", gptq._columns))
    if fmt.block_size != fmt.sub_size:  # a k-quant's block grid is its own super-block search
        monkeypatch.setattr(fmt, "rtn_torch", spy("search", fmt.rtn_torch))
    g = torch.Generator().manual_seed(4)
    X = torch.randn(512, 256, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gptq_quantize(torch.randn(8, 256, generator=g), 2 / 512 * X.T @ X, fmt)
    finally:
        torch.set_num_threads(before)
    assert seen == {"search": {2}, "columns": {1}}


@pytest.mark.parametrize("name,act_order,search_loss", [("q4_0", False, "hdiag"), ("q5_1", False, "gptq"),
                                                         ("q4_1", True, "hdiag"), ("q4_K", False, "hdiag"),
                                                         ("q6_K", True, "hdiag")])
def test_joined_walk_gives_each_linear_what_it_gets_alone(monkeypatch, name, act_order, search_loss):
    """Linears that share H (q/k/v) walked as one stack of rows: each gets the codes, grid, rounded
    weights and reported errors of its own walk. Row counts that split the search's row chunks
    unevenly, so a chunk holds rows of two linears."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(1024, 512, generator=g) * (torch.rand(512, generator=g) * 3)
    H = 2 / 1024 * X.T @ X
    H[:, 9] = H[9, :] = 0.0  # a dead column
    Ws = [torch.randn(n, 512, generator=g) * s for n, s in ((24, 1.0), (9, 0.3), (11, 2.0))]
    fmt = get_format(name)
    monkeypatch.setattr(gptq, "_SEARCH_CHUNK", 7)
    alone = [gptq_quantize(W, H, fmt, act_order=act_order, search_loss=search_loss) for W in Ws]
    joined = gptq_quantize_rows(Ws, H, fmt, act_order=act_order, search_loss=search_loss)
    assert len(joined) == len(Ws)
    for W, a, b in zip(Ws, alone, joined, strict=True):
        assert np.array_equal(fmt.pack(a.q), fmt.pack(b.q))
        assert torch.equal(a.W_hat, b.W_hat) and torch.equal(a.rounded, b.rounded)
        assert b.W_hat.shape == W.shape
        assert (a.rel_err, a.rel_err_rtn, a.damp, a.n_dead) == (b.rel_err, b.rel_err_rtn, b.damp, b.n_dead)


def test_joined_walk_needs_one_input_width():
    H = torch.eye(64)
    with pytest.raises(ValueError, match="share their input width"):
        gptq_quantize_rows([torch.randn(4, 64), torch.randn(4, 32)], H, get_format("q4_0"))


def _two_streams(noise: float, n: int = 2048, ci: int = 256, seed: int = 3):
    """Full-precision inputs X [n, ci] and the quantized model's Xq = X + noise, with H and D from them."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, ci, generator=g) * (torch.rand(ci, generator=g) * 2 + 0.1)
    Xq = X + noise * torch.randn(n, ci, generator=g) * X.abs().mean(0)
    H = torch.zeros(ci, ci)
    accumulate_hessian(H, Xq)
    D = torch.zeros(ci, ci)
    accumulate_cross(D, X, Xq)
    return X, Xq, H * (2 / n), D * (2 / n)


def test_model_target_is_the_least_squares_fit_of_the_full_precision_output():
    """W*·X̃ᵀX̃ = W·XᵀX̃ (undamped): X̃·W*ᵀ is the best linear fit of X·Wᵀ from the quantized inputs."""
    X, Xq, H, D = _two_streams(0.2)
    W = torch.randn(48, 256, generator=torch.Generator().manual_seed(1))
    (Ws,) = model_target([W], H, D, damp=0.0)
    residual = (Xq @ Ws.T - X @ W.T).T @ Xq  # the normal equations' gradient
    assert residual.abs().max() < 1e-4 * (X @ W.T).T.abs().max() * Xq.abs().max()
    fit = ((Xq @ Ws.T - X @ W.T) ** 2).sum()
    assert fit < 0.95 * ((Xq @ W.T - X @ W.T) ** 2).sum()


def test_model_target_is_w_where_both_streams_agree():
    X, _, _, _ = _two_streams(0.0)
    H, D = torch.zeros(256, 256), torch.zeros(256, 256)
    accumulate_hessian(H, X)
    accumulate_cross(D, X, X)
    assert not D.any()
    Ws = [torch.randn(8, 256), torch.randn(3, 256)]
    assert all(torch.equal(a, b) for a, b in zip(model_target(Ws, H, D), Ws, strict=True))


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q4_K", "q6_K"])
@pytest.mark.parametrize("noise", [0.05, 0.3])
def test_gptq_of_the_model_target_fits_the_full_precision_output_better(name, noise):
    """GPTQ of W* under H leaves less error against the full-precision model's output than GPTQ
    of W, on inputs that the quantized layers before have moved; two linears walked together
    get what each gets alone."""
    X, Xq, H, D = _two_streams(noise)
    g = torch.Generator().manual_seed(7)
    W = torch.randn(64, 256, generator=g)
    fmt = get_format(name)

    def err(W_hat):
        return float(((Xq @ W_hat.T - X @ W.T) ** 2).sum())

    (Ws,) = model_target([W], H, D)
    assert err(gptq_quantize(Ws, H, fmt).W_hat) < err(gptq_quantize(W, H, fmt).W_hat)
    W2 = torch.randn(16, 256, generator=g)
    both = model_target([W, W2], H, D)
    assert torch.equal(both[0], Ws) and torch.equal(both[1], model_target([W2], H, D)[0])
    mine = [W.clone(), W2.clone()]
    into = model_target(mine, H, D, in_place=True)  # into the weights given: no second copy
    assert into[0] is mine[0] and into[1] is mine[1]
    assert torch.equal(mine[0], both[0]) and torch.equal(mine[1], both[1])


def test_the_stream_target_is_the_least_squares_fit_of_the_full_precision_stream():
    """model_target with the residual term: W* minimizes ||X̃ W*ᵀ - (X Wᵀ + R)||², the full-precision
    stream after the add seen from the quantized model's inputs (undamped, against lstsq)."""
    g = torch.Generator().manual_seed(0)
    n, ci, co = 400, 24, 16
    X = torch.randn(n, ci, generator=g, dtype=torch.float64)
    Xq = X + 0.1 * torch.randn(n, ci, generator=g, dtype=torch.float64)
    R = 0.3 * torch.randn(n, co, generator=g, dtype=torch.float64)
    W = torch.randn(co, ci, generator=g, dtype=torch.float64)
    H, D, E = Xq.T @ Xq, (X - Xq).T @ Xq, torch.zeros(co, ci, dtype=torch.float64)
    accumulate_residual(E, R, Xq)
    torch.testing.assert_close(E, R.T @ Xq)
    (got,) = model_target([W.float()], H.float(), D.float(), damp=0.0, E=E.float())
    want = torch.linalg.lstsq(Xq, X @ W.T + R).solution.T
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-3)
    (without,) = model_target([W.float()], H.float(), D.float(), damp=0.0)
    assert (without.double() - want).abs().max() > 0.01  # the residual term is what moves it there
    with pytest.raises(ValueError, match="residual term"):
        model_target([W.float()], H.float(), D.float(), damp=0.0, E=E[:3].float())
