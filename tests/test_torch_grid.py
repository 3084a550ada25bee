"""The torch grid steps (``formats.torch_grid`` and each format's ``project``) against the oracles.

Dequantization in torch must be bit for bit what gguf-py's independent numpy
dequantizer computes from the packed bytes; ``project`` of the scales a
quantizer's search produced must give exactly the parameters llama.cpp
stores (``ggml_quantize_chunk`` for the k-quants, gguf-py for the legacy
types); ``fake_quant``'s forward must be exactly the weights the packed file
holds, and its gradients the documented estimators.
"""

from __future__ import annotations

import time

import gguf.quants as gq
import numpy as np
import pytest
import torch
from ggml_ref import ggml_quantize
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from llmquant.formats import BlockFormat, QuantBlocks, get_format
from llmquant.formats import torch_grid as tg
from llmquant.formats.kquant import KQuantFormat, SuperGrid

LEGACY = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]
KQUANTS = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
ALL = LEGACY + KQUANTS
FFN_DOWN = "model.layers.0.mlp.down_proj.weight"


def _datasets() -> dict[str, np.ndarray]:
    """float32 [rows, 512] tensors (a multiple of every block width)."""
    rng = np.random.default_rng(2024)
    normal = rng.standard_normal((8, 512)).astype(np.float32)
    outliers = normal.copy()
    outliers.flat[rng.choice(normal.size, 40, replace=False)] *= 100.0
    mixed = rng.standard_normal((6, 512)).astype(np.float32)
    mixed[::3] = 0.0
    mixed[1::3, 32:64] = 0.0
    return {
        "normal": normal,
        "small": normal * np.float32(1e-3),
        "big": normal * np.float32(50.0),
        "huge": normal * np.float32(1e4),
        "outliers": outliers,
        "zeros": np.zeros((2, 512), np.float32),
        "mixed_zero": mixed,
        "fp16_underflow": normal * np.float32(1e-7),
        "integers": rng.integers(-8, 8, (4, 512)).astype(np.float32),
        "positive": np.abs(normal) + np.float32(3.0),
    }


DATASETS = _datasets()


@pytest.fixture(scope="module")
def ffn_down(smollm2_dir) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(str(smollm2_dir / "model.safetensors"), framework="np") as f:
        return f.get_tensor(FFN_DOWN).astype(np.float32)[:64]


def _bits_equal(a: torch.Tensor | np.ndarray, b: np.ndarray) -> bool:
    a = a.numpy() if isinstance(a, torch.Tensor) else a
    assert a.dtype == b.dtype == np.float32
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def _torch_dequant(fmt: type[BlockFormat], q) -> torch.Tensor:
    mins = None if q.mins is None else torch.from_numpy(q.mins)
    return fmt.dequantize_torch(torch.from_numpy(q.codes), torch.from_numpy(q.scales), mins)


def _imatrix(cols: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """A positive column importance [cols] with some unused columns, and it per super-block [rows·cols/256, 256]."""
    im = np.random.default_rng(5).lognormal(0.0, 1.0, cols).astype(np.float32)
    im[::7] = 0.0
    return im, np.broadcast_to(im.reshape(1, -1, 256), (rows, cols // 256, 256)).reshape(-1, 256)


def _tensor(a: np.ndarray | None) -> torch.Tensor | None:
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a))


# --------------------------------------------------------------------------- dequantize_torch


@pytest.mark.parametrize("data", list(DATASETS))
@pytest.mark.parametrize("name", ALL)
def test_dequantize_torch_matches_gguf(name: str, data: str):
    fmt = get_format(name)
    q = fmt.rtn(DATASETS[data].reshape(-1, fmt.block_size))
    ours = _torch_dequant(fmt, q)
    assert isinstance(ours, torch.Tensor) and ours.shape == q.codes.shape
    theirs = gq.dequantize(fmt.pack(q), fmt.qtype).reshape(ours.shape)
    assert _bits_equal(ours, theirs)
    assert _bits_equal(ours, fmt.dequantize(q))


@pytest.mark.parametrize("name", ALL)
def test_dequantize_torch_matches_gguf_on_real_weights(name: str, ffn_down: np.ndarray):
    fmt = get_format(name)
    q = fmt.rtn(ffn_down.reshape(-1, fmt.block_size))
    assert _bits_equal(_torch_dequant(fmt, q), gq.dequantize(fmt.pack(q), fmt.qtype).reshape(q.codes.shape))


fp16 = st.floats(width=16, allow_nan=False, allow_infinity=False)


@st.composite
def packable(draw, fmt: type[BlockFormat]):
    """Any QuantBlocks fmt can pack: random codes on a random grid (fp16 fields, integer sub-scales)."""
    n = draw(st.integers(1, 3))
    per = fmt.block_size // fmt.sub_size
    codes = draw(hnp.arrays(np.int16, (n * per, fmt.sub_size), elements=st.integers(fmt.qmin, fmt.qmax)))
    halves = hnp.arrays(np.float32, n, elements=fp16)
    if not issubclass(fmt, KQuantFormat):
        return QuantBlocks(codes, draw(halves), draw(halves) if fmt.has_min else None)
    sc = draw(hnp.arrays(np.int16, (n, per), elements=st.integers(fmt.sc_min, fmt.sc_max)))
    if fmt.has_min:
        m = draw(hnp.arrays(np.int16, (n, per), elements=st.integers(0, fmt.m_max)))
        return fmt.make(codes, SuperGrid(d=draw(halves), sc=sc, dmin=draw(halves), m=m))
    return fmt.make(codes, SuperGrid(d=draw(halves), sc=sc))


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_dequantize_torch_property(name: str, data):
    """Every packable grid, subnormal and extreme fp16 values included, dequantizes as gguf-py does."""
    fmt = get_format(name)
    q = data.draw(packable(fmt))
    theirs = gq.dequantize(fmt.pack(q), fmt.qtype).reshape(q.codes.shape)
    assert _bits_equal(_torch_dequant(fmt, q), theirs)


# --------------------------------------------------------------------------- the torch helpers


@settings(max_examples=200, deadline=None)
@given(x=hnp.arrays(np.float32, 64, elements=st.floats(width=32)))
def test_f16_round_matches_numpy(x: np.ndarray):
    t = torch.from_numpy(x.copy())
    with np.errstate(over="ignore"):
        f16 = x.astype(np.float16).astype(np.float32)
    assert np.array_equal(tg.f16_round(t, saturate=False).numpy(), f16, equal_nan=True)
    clipped = np.clip(x, -65504, 65504).astype(np.float16).astype(np.float32)
    assert np.array_equal(tg.f16_round(t).numpy(), clipped, equal_nan=True)


@settings(max_examples=200, deadline=None)
@given(x=hnp.arrays(np.float32, 64, elements=st.floats(-(2.0**22), 2.0**22 - 1, width=32)))
def test_nearest_int_rounds_half_to_even_in_range(x: np.ndarray):
    """ggml's nearest_int is round-half-to-even wherever x + 1.5·2^23 keeps the exponent 2^23: x in [-2^22, 2^22)."""
    assert np.array_equal(tg.nearest_int(torch.from_numpy(x.copy())).numpy(), np.rint(x).astype(np.int32))


def test_nearest_int_outside_its_range_is_cs_bit_trick():
    """Past its range C returns the low 23 mantissa bits of x + 12582912.f minus 2^22 (worked out by hand)."""
    x = torch.tensor([float("inf"), float("-inf"), float("nan"), 2.0**22, 2.0**23, 3.0 * 2**22, -(2.0**22), 2.5, -2.5,
                      0.5, -0.0], dtype=torch.float32)
    # inf: 0x7f800000 -> mantissa 0; NaN: 0x7fc00000 -> 0x400000; 2^22: 2^24 -> mantissa 0;
    # 2^23: 1.25·2^24 -> 0x200000; 3·2^22: 1.5·2^24 -> 0x400000; -2^22: 2^23 -> mantissa 0
    expect = [-(2**22), -(2**22), 0, -(2**22), 0x200000 - 2**22, 0, -(2**22), 2, -2, 0, 0]
    assert tg.nearest_int(x).tolist() == expect and tg.nearest_int(x).dtype == torch.int32


def test_sqrt_is_correctly_rounded():
    """``tg.sqrt`` is C's sqrtf (numpy's float32 sqrt: IEEE, correctly rounded), where torch's CPU one is not."""
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.random(1 << 20) * 10, rng.random(1 << 16) * 1e-38, rng.random(1 << 16) * 3e38,
                        [0.0, 1e-45, 3.4e38, 4.0, 2.0, np.inf]]).astype(np.float32)
    assert _bits_equal(tg.sqrt(torch.from_numpy(x)), np.sqrt(x))
    assert (torch.sqrt(torch.from_numpy(x)).numpy() != np.sqrt(x)).any()  # why tg.sqrt exists (MKL's vector sqrt)


def test_sequential_sums_add_left_to_right():
    """row_sum / col_sum are C's ``for`` loop in float32: 1 + 2^-24 + 2^-24 stays 1, pairwise would give 1 + 2^-23."""
    a = torch.tensor([[1.0, 2.0**-24, 2.0**-24], [2.0**-24, 2.0**-24, 1.0]])
    assert tg.row_sum(a).tolist() == [1.0, 1.0 + 2.0**-23]
    assert tg.col_sum(a.t()).tolist() == [1.0, 1.0 + 2.0**-23]
    z = torch.tensor([[-0.0], [-0.0]])
    assert str(tg.col_sum(z).item()) == "0.0" and str(tg.col_sum(z, first=True).item()) == "-0.0"


def _c_loop_sum(a: torch.Tensor, first: bool = False) -> np.ndarray:
    """C's ``acc = 0; acc += a[i]`` (``first``: ``acc = a[0]``) down axis -2, one float32 add at a time."""
    rows = a.numpy().astype(np.float32)
    rows = np.moveaxis(rows, -2, 0)
    acc = rows[0].copy() if first else np.float32(0) + rows[0]
    for row in rows[1:]:
        acc = (acc + row).astype(np.float32)
    return acc


def _adversarial(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Values spread over 2^±20 with zeros of both signs: sums that round differently in any other order."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-20, 20, shape, generator=g).float())
    r = torch.rand(shape, generator=g)
    a[r < 0.1] = -0.0
    a[(r >= 0.1) & (r < 0.15)] = 0.0
    return a


@pytest.mark.parametrize("n", [2, 15, 16, 17, 18, 32, 33, 256])
@pytest.mark.parametrize("cols", [64, 130, 1000])
@pytest.mark.parametrize("lead", [(), (3,)], ids=["2d", "batched"])
def test_col_sum_fast_path_adds_in_cs_order(n, cols, lead):
    """col_sum through torch's sum kernel (one thread) is C's loop bit for bit, for short and long columns,
    column counts with a tail outside the kernel's in-order steps, batched rows, and clobber or not; a
    plain ``torch.sum`` is not (the reason for the runs), and without clobber the input is untouched."""
    a = _adversarial((*lead, n, cols), seed=n * 1000 + cols)
    ref = _c_loop_sum(a)
    with tg.serial(a):
        assert tg.kernel_sums_in_order(a)
        kept = a.clone()
        assert _bits_equal(tg.col_sum(a), ref)
        assert torch.equal(a.view(torch.int32), kept.view(torch.int32))
        assert _bits_equal(tg.col_sum(a.clone(), clobber=True), ref)
        if n >= 18:
            assert not _bits_equal(a.sum(dim=-2), ref)


def test_col_sum_from_first_keeps_a_column_of_negative_zeros_negative():
    """``first``: C's ``acc = a[0]`` differs from ``0 + a[0]`` only for an all -0.0 column; the fast path agrees."""
    a = _adversarial((32, 200), seed=7)
    a[:, 0] = -0.0
    a[:, 1] = -0.0
    a[5, 1] = 0.0
    a[:, 2] = 0.0
    with tg.serial(a):
        got = tg.col_sum(a, first=True)
    assert _bits_equal(got, _c_loop_sum(a, first=True))
    assert str(got[0].item()) == "-0.0" and str(got[1].item()) == "0.0"


def test_kernel_sums_in_order_only_where_checked():
    """The fast path is taken on one CPU thread for float32 alone: elsewhere rows are added one op each."""
    a = torch.zeros(4, 128)
    with tg.serial(a):
        assert tg.kernel_sums_in_order(a)
        assert not tg.kernel_sums_in_order(a.double())
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert not tg.kernel_sums_in_order(a)
    finally:
        torch.set_num_threads(before)


def _c_scan(xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = xt[0].clone(), xt[0].clone()
    for row in xt[1:]:
        lo = torch.where(row < lo, row, lo)
        hi = torch.where(row > hi, row, hi)
    return lo, hi


def test_scan_extremes_keeps_cs_first_zero_and_skips_nans():
    """Column extremes as C's strict scan: the first of +0.0 / -0.0 wins, NaNs after the first element are
    skipped (a first one stays)."""
    xt = torch.tensor([[-0.0, 0.0, 1.0, float("nan"), -1.0, 0.0, float("inf")],
                       [0.0, -0.0, float("nan"), 2.0, -0.0, -0.0, 3.0],
                       [-1.0, 0.0, 0.5, -3.0, -2.0, 0.0, float("-inf")]])
    lo, hi = tg.scan_extremes(xt)
    ref_lo, ref_hi = _c_scan(xt)
    assert _bits_equal(lo, ref_lo.numpy()) and _bits_equal(hi, ref_hi.numpy())
    assert str(hi[0].item()) == "-0.0" and str(hi[1].item()) == "0.0"
    assert (lo[2].item(), hi[2].item()) == (0.5, 1.0) and hi[3].isnan()  # a first NaN stays
    big = _adversarial((32, 500), seed=3)
    big[:, :50] = big[:, :50].abs()
    big[:, 50:100] = -big[:, 50:100].abs()
    for got, ref in zip(tg.scan_extremes(big), _c_scan(big), strict=True):
        assert _bits_equal(got, ref.numpy())


def test_map_rows_more_slices_than_threads_and_errors():
    """Every slice runs once, in order, whatever the thread count; a slice's error reaches the caller."""
    x = torch.arange(40.0).reshape(40, 1)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = tg.map_rows(lambda a: a.sum(), (x,), 3)
        assert [o.item() for o in out] == [x[i : i + 3].sum().item() for i in range(0, 40, 3)]

        def fail(a):
            if a[0, 0] == 21:
                raise ValueError("slice 7")
            return a

        with pytest.raises(ValueError, match="slice 7"):
            tg.map_rows(fail, (x,), 3)

        ran = []

        def first_fails(a):  # the others are slow: after the failure no one starts another
            ran.append(int(a[0, 0]))
            if a[0, 0] == 0:
                raise ValueError("slice 0")
            time.sleep(0.2)
            return a

        with pytest.raises(ValueError, match="slice 0"):
            tg.map_rows(first_fails, (x,), 3)
        assert len(ran) <= 3 < 14, ran
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("name", ["q3_k", "q6_k"])
def test_symmetric_searches_match_llama_cpp_on_hard_groups(name: str, imatrix: bool):
    """make_qx_quants (q6_K; q3_K with an imatrix) and make_q3_quants (q3_K without) against llama.cpp's bytes.

    Sub-blocks of 16 at magnitudes spread over decades put many sub-scales on sc = 0, where the
    bytes carry the search's own codes; all-zero, 1e-16 and half-zero groups hit its edge cases.
    One row of 65536 makes the imatrix a weight per element (zeros included).
    """
    fmt = get_format(name)
    rng = np.random.default_rng(fmt.qmax)
    x = (rng.standard_normal((4096, 16)) * rng.lognormal(0, 2, (4096, 1))).astype(np.float32)
    x[::97] = 0.0
    x[1::97] = 1e-16
    x[2::97, :8] = 0.0
    row = x.reshape(1, -1)
    im = (rng.random(row.size) * (rng.random(row.size) > 0.1)).astype(np.float32) if imatrix else None
    ours = fmt.pack(fmt.rtn_rows(row, im))
    ref = ggml_quantize(row, fmt.qtype, im)
    bad = np.flatnonzero((ours != ref).any(axis=1))
    assert bad.size == 0, f"{bad.size} of {len(ref)} super-blocks differ from llama.cpp's"


def test_no_reciprocal_rounding_in_divisions():
    """The reason for ``const``: ``3.0 / t`` is two roundings in torch; the helpers divide tensor by tensor."""
    x = np.random.default_rng(0).standard_normal(4096).astype(np.float32)
    t = torch.from_numpy(x)
    assert np.array_equal((tg.const(3.0, t) / t).numpy(), np.float32(3.0) / x)
    assert not np.array_equal((3.0 / t).numpy(), np.float32(3.0) / x)


# --------------------------------------------------------------------------- project


def _assert_projection_is(fmt: type[BlockFormat], p: tg.Projection, ref) -> None:
    """A projection equals the parameters unpacked from a reference file, bit for bit."""
    assert _bits_equal(p.scales, ref.scales)
    assert (p.mins is None) == (ref.mins is None) == (not fmt.has_min)
    if p.mins is not None:
        assert _bits_equal(p.mins, ref.mins)
    if ref.grid is not None:
        g = ref.grid
        assert _bits_equal(p.d, g.d) and np.array_equal(p.sc.numpy(), g.sc)
        if fmt.has_min:
            assert _bits_equal(p.dmin, g.dmin) and np.array_equal(p.m.numpy(), g.m)


@pytest.mark.parametrize("imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("data", list(DATASETS))
@pytest.mark.parametrize("name", KQUANTS)
def test_project_of_search_scales_is_llama_cpp_grid(name: str, data: str, imatrix: bool):
    """project(the search's ideal scales) == what llama.cpp stores, and with its codes packs to its bytes."""
    fmt = get_format(name)
    x = DATASETS[data]
    im, importance = _imatrix(x.shape[1], x.shape[0]) if imatrix else (None, None)
    ref_bytes = ggml_quantize(x, fmt.qtype, im)
    ref = fmt.unpack(ref_bytes)
    ideal = fmt.search(torch.from_numpy(x.reshape(-1, 256)), _tensor(importance))
    p = fmt.project(ideal.scales, ideal.mins, ideal.weights, saturate=False)
    _assert_projection_is(fmt, p, ref)
    if data != "huge":  # within fp16's range saturating changes nothing
        _assert_projection_is(fmt, fmt.project(ideal.scales, ideal.mins, ideal.weights), ref)
    assert np.array_equal(fmt.pack(fmt.blocks(torch.from_numpy(ref.codes), p)), ref_bytes)


@pytest.mark.parametrize("name", KQUANTS)
def test_project_on_real_weights(name: str, ffn_down: np.ndarray):
    fmt = get_format(name)
    for imatrix in (False, True):
        im, importance = _imatrix(ffn_down.shape[1], ffn_down.shape[0]) if imatrix else (None, None)
        ref = fmt.unpack(ggml_quantize(ffn_down, fmt.qtype, im))
        ideal = fmt.search(torch.from_numpy(ffn_down.reshape(-1, 256)), _tensor(importance))
        _assert_projection_is(fmt, fmt.project(ideal.scales, ideal.mins, ideal.weights), ref)


@pytest.mark.parametrize("data", list(DATASETS))
@pytest.mark.parametrize("name", LEGACY)
def test_legacy_project_is_fp16_storage(name: str, data: str):
    """project(rtn's scales) keeps them, and with rtn's codes packs to gguf-py's bytes."""
    fmt = get_format(name)
    x = DATASETS[data]
    q = fmt.rtn(x.reshape(-1, 32))
    p = fmt.project(torch.from_numpy(q.scales), None if q.mins is None else torch.from_numpy(q.mins))
    ref = gq.quantize(x, fmt.qtype).reshape(-1, fmt.type_size)
    _assert_projection_is(fmt, p, fmt.unpack(ref))
    assert np.array_equal(fmt.pack(fmt.blocks(torch.from_numpy(q.codes), p)), ref)


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_projected_grid_is_a_fixed_point(name: str, data):
    """A grid the file can store projects onto itself, so a tuned grid does not drift once representable."""
    fmt = get_format(name)
    n_sub = data.draw(st.integers(1, 3)) * (fmt.block_size // fmt.sub_size)
    scale = st.floats(2.0**-10, 128.0, width=32)
    s = torch.from_numpy(data.draw(hnp.arrays(np.float32, n_sub, elements=scale)))
    if fmt.qmin < 0 and fmt.block_size == 256:  # q3_K, q6_K: signed sub-scales
        s = s * torch.from_numpy(data.draw(hnp.arrays(np.float32, n_sub, elements=st.sampled_from([-1.0, 1.0]))))
    m = -torch.from_numpy(data.draw(hnp.arrays(np.float32, n_sub, elements=scale))) if fmt.has_min else None
    p = fmt.project(s, m)
    again = fmt.project(p.scales, p.mins)
    for a, b in ((p.scales, again.scales), (p.mins, again.mins), (p.d, again.d), (p.dmin, again.dmin)):
        assert (a is None and b is None) or _bits_equal(a, b.numpy())
    for a, b in ((p.sc, again.sc), (p.m, again.m)):
        assert (a is None and b is None) or torch.equal(a, b)


def test_project_checks_mins_and_whole_super_blocks():
    with pytest.raises(ValueError):
        get_format("q4_0").project(torch.ones(4), torch.zeros(4))
    with pytest.raises(ValueError):
        get_format("q4_k").project(torch.ones(8))
    with pytest.raises(ValueError):
        get_format("q6_k").project(torch.ones(17))


def test_project_clamps_to_the_unsigned_grid():
    """Negative ideal scales and positive ideal mins have no unsigned sc/m: they become 0."""
    p = get_format("q4_k").project(torch.tensor([-1.0, 2.0, 1.0, 0.5, 1.0, 1.0, 1.0, 1.0]),
                                   torch.tensor([0.3, -1.0, -0.5, 0.0, 0.0, 0.0, 0.0, 0.0]))
    assert p.sc[0, 0] == 0 and p.sc[0, 1] == 63 and p.m[0, 0] == 0 and p.m[0, 1] == 63
    assert p.scales[0] == 0 and p.mins[0] == 0


# --------------------------------------------------------------------------- fake_quant


def _ideal(fmt: type[BlockFormat], W: torch.Tensor, factor: float = 0.9):
    """Deliberately non-llama.cpp ideal grids for W [rows, cols]: [rows, cols/sub] scales (and mins)."""
    b = W.reshape(W.shape[0], -1, fmt.sub_size)
    if fmt.has_min:
        lo = b.amin(-1)
        return (b.amax(-1) - lo) * factor / fmt.qmax, lo
    ext = b.gather(-1, b.abs().argmax(-1, keepdim=True))[..., 0]
    return ext * factor / fmt.qmin, None


@pytest.mark.parametrize("data", ["normal", "big", "small", "mixed_zero", "integers", "outliers"])
@pytest.mark.parametrize("name", ALL)
def test_fake_quant_forward_is_the_file(name: str, data: str):
    """Forward == dequantize_torch(nearest codes on project(...)) == gguf-py's dequantization of the packed blocks."""
    fmt = get_format(name)
    W = torch.from_numpy(DATASETS[data].copy())
    s, m = _ideal(fmt, W)
    out = fmt.fake_quant(W, s, m)
    p = fmt.project(s.reshape(-1), None if m is None else m.reshape(-1))
    codes = fmt.nearest_codes(W.reshape(-1, fmt.sub_size), p.scales[:, None], None if m is None else p.mins[:, None])
    assert _bits_equal(out.reshape(-1, fmt.sub_size), fmt.dequantize_torch(codes, p.scales, p.mins).numpy())
    packed = fmt.pack(fmt.blocks(codes, p))
    assert _bits_equal(out, gq.dequantize(packed, fmt.qtype).reshape(W.shape))


@pytest.mark.parametrize("name", KQUANTS)
def test_fake_quant_with_importance_uses_that_projection(name: str):
    fmt = get_format(name)
    W = torch.from_numpy(DATASETS["normal"].copy())
    s, m = _ideal(fmt, W, 1.0)
    imp = torch.rand(s.shape, generator=torch.Generator().manual_seed(3)) + 0.1
    p = fmt.project(s.reshape(-1), None if m is None else m.reshape(-1), imp.reshape(-1))
    codes = fmt.nearest_codes(W.reshape(-1, fmt.sub_size), p.scales[:, None], None if m is None else p.mins[:, None])
    out = fmt.fake_quant(W, s, m, imp)
    assert _bits_equal(out.reshape(-1, fmt.sub_size), fmt.dequantize_torch(codes, p.scales, p.mins).numpy())


def test_fake_quant_ste_inside_and_zero_where_clipped():
    fmt = get_format("q4_1")
    s = torch.tensor([[0.5]], requires_grad=True)
    m = torch.tensor([[-1.0]], requires_grad=True)
    # v = (w - m)/s: inside [0, 15] for the first 30, clipped below (-3) and above (20) for the last two
    w = torch.cat([torch.linspace(-1.0, 6.5, 30), torch.tensor([-2.5, 9.0])])[None].requires_grad_()
    g = torch.arange(1.0, 33.0)[None]
    (fmt.fake_quant(w, s, m, project=False) * g).sum().backward()
    assert torch.equal(w.grad[0, :30], g[0, :30]) and torch.equal(w.grad[0, 30:], torch.zeros(2))
    codes = torch.cat([torch.round((torch.linspace(-1.0, 6.5, 30) + 1.0) / 0.5), torch.tensor([0.0, 15.0])])
    assert torch.allclose(s.grad, (g * codes).sum()[None, None])
    assert torch.allclose(m.grad, g.sum()[None, None])


def test_fake_quant_lsq_estimator_by_hand():
    """q4_0, s = 1: v = (0.25, 2.75, 9, -12, 0…) -> codes (0, 3, 7, -8, 0…)."""
    fmt = get_format("q4_0")
    w = torch.zeros(1, 32)
    w[0, :4] = torch.tensor([0.25, 2.75, 9.0, -12.0])
    for lsq, expected in ((False, 0 + 3 + 7 - 8), (True, (0 - 0.25) + (3 - 2.75) + 7 - 8)):
        s = torch.ones(1, 1, requires_grad=True)
        fmt.fake_quant(w, s, project=False, lsq=lsq).sum().backward()
        assert s.grad.item() == expected
    m = torch.zeros(1, 1, requires_grad=True)
    w1 = torch.full((1, 32), 3.0)
    w1[0, 0] = 40.0  # clipped above 15
    get_format("q4_1").fake_quant(w1, torch.ones(1, 1), m, project=False, lsq=True).sum().backward()
    assert m.grad.item() == 1.0


@pytest.mark.parametrize("name", ["q4_0", "q5_1", "q3_k", "q4_k"])
def test_fake_quant_scale_gradient_matches_finite_differences(name: str):
    """Between rounding steps the forward is smooth in s and m; its derivative is the gradient returned."""
    fmt = get_format(name)
    gen = torch.Generator().manual_seed(1)
    rows, cols = 2, fmt.block_size
    n = cols // fmt.sub_size
    s = (torch.rand(rows, n, generator=gen, dtype=torch.float64) + 0.5) * (0.1 if fmt.qmin < 0 else 0.2)
    m = -torch.rand(rows, n, generator=gen, dtype=torch.float64) if fmt.has_min else None
    # codes drawn inside the range, then W placed a fraction in [0.2, 0.4] of a step off each: no ties
    lo, hi = fmt.qmin, fmt.qmax
    c = torch.randint(lo, hi + 1, (rows, n, fmt.sub_size), generator=gen).to(torch.float64)
    frac = (torch.rand(c.shape, generator=gen, dtype=torch.float64) * 0.2 + 0.2)
    frac = frac * torch.where(c == hi, -1.0, torch.where(c == lo, 1.0, torch.sign(torch.randn(c.shape, generator=gen,
                                                                                          dtype=torch.float64))))
    W = ((c + frac) * s[..., None] + (0 if m is None else m[..., None])).reshape(rows, cols)
    g = torch.randn(rows, cols, generator=gen, dtype=torch.float64)

    def loss(s_, m_):
        return (fmt.fake_quant(W, s_, m_, project=False) * g).sum()

    s_ = s.clone().requires_grad_()
    m_ = None if m is None else m.clone().requires_grad_()
    loss(s_, m_).backward()
    eps = 1e-7
    for j in range(n):
        e = torch.zeros_like(s)
        e[0, j] = eps
        fd = (loss(s + e, m) - loss(s - e, m)) / (2 * eps)
        assert abs(fd.item() - s_.grad[0, j].item()) < 1e-6 * max(1.0, abs(fd.item()))
        if m is not None:
            fd = (loss(s, m + e) - loss(s, m - e)) / (2 * eps)
            assert abs(fd.item() - m_.grad[0, j].item()) < 1e-6 * max(1.0, abs(fd.item()))


@pytest.mark.parametrize("name", ["q4_1", "q2_k", "q6_k"])
def test_fake_quant_projection_is_straight_through(name: str):
    """The gradient to the ideal scales is the gradient to the projected ones."""
    fmt = get_format(name)
    W = torch.from_numpy(DATASETS["normal"].copy())
    s, m = _ideal(fmt, W)
    p = fmt.project(s.reshape(-1), None if m is None else m.reshape(-1))
    grads = []
    for project, s0, m0 in ((True, s, m), (False, p.scales.reshape(s.shape),
                                         None if m is None else p.mins.reshape(s.shape))):
        s1 = s0.clone().requires_grad_()
        m1 = None if m0 is None else m0.clone().requires_grad_()
        W1 = W.clone().requires_grad_()
        (fmt.fake_quant(W1, s1, m1, project=project) ** 2).sum().backward()
        grads.append((W1.grad, s1.grad, None if m1 is None else m1.grad))
    for a, b in zip(*grads, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("name", ALL)
def test_fake_quant_needs_no_host_values(name: str):
    """On the meta device no value exists, so no numpy, no ``.item()``: forward and backward still run."""
    fmt = get_format(name)
    n = 512 // fmt.sub_size
    W = torch.empty(4, 512, device="meta", requires_grad=True)
    s = torch.empty(4, n, device="meta", requires_grad=True)
    m = torch.empty(4, n, device="meta", requires_grad=True) if fmt.has_min else None
    out = fmt.fake_quant(W, s, m)
    assert out.device.type == "meta" and out.shape == (4, 512)
    out.sum().backward()
    assert s.grad.shape == s.shape and W.grad.shape == W.shape and (m is None or m.grad.shape == m.shape)


def test_fake_quant_rejects_bad_shapes():
    fmt = get_format("q4_k")
    with pytest.raises(ValueError):
        fmt.fake_quant(torch.zeros(2, 128), torch.ones(2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError):
        fmt.fake_quant(torch.zeros(2, 256), torch.ones(2, 8))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"])
def test_searches_by_slices_of_super_blocks_give_the_same_bytes(name, threads, monkeypatch):
    """rtn_torch searches a run of super-blocks at a time (bounded temporaries), on a CPU side by side on
    torch's threads: the same bytes as one search of them all, at any thread count."""
    from llmquant.formats import kquant

    fmt = get_format(name)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 256, generator=g) * torch.rand(7, 1, generator=g)
    importance = torch.rand(7, 256, generator=g)
    whole = [fmt.pack(fmt.blocks(*fmt.rtn_torch(x, imp))) for imp in (None, importance)]
    slices = []

    def recording(fn, tensors, rows):
        slices.append(rows)
        return tg.map_rows(fn, tensors, rows)

    monkeypatch.setattr(kquant, "SEARCH_SUPERS", 3)
    monkeypatch.setattr(kquant, "SLICE_SUPERS_MIN", 1)
    monkeypatch.setattr(kquant, "map_rows", recording)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sliced = [fmt.pack(fmt.blocks(*fmt.rtn_torch(x, imp))) for imp in (None, importance)]
    finally:
        torch.set_num_threads(before)
    assert slices == [3, 3]
    assert all(np.array_equal(a, b) for a, b in zip(whole, sliced, strict=True))


def test_map_rows_runs_slices_side_by_side_each_on_one_thread():
    """Slices run concurrently (a barrier of two would time out otherwise), each with torch on one
    thread and the caller's grad mode; results come back in slice order; the caller's threads are kept."""
    import threading

    barrier = threading.Barrier(2, timeout=20)
    seen = []

    def fn(a, b):
        seen.append((torch.get_num_threads(), torch.is_grad_enabled(), b is None))
        barrier.wait()
        return a * 2

    x = torch.arange(8.0).reshape(8, 1)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            out = tg.map_rows(fn, (x, None), 2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert [o.flatten().tolist() for o in out] == [[0, 2], [4, 6], [8, 10], [12, 14]]
    assert seen == [(1, False, True)] * 4
    assert tg.slice_rows(10_000, 4096, 256, x) == 4096
    assert tg.slice_rows(1000, 4096, 256, x) == max(256, -(-1000 // torch.get_num_threads()))


def test_qkx_levels_round_in_place_only_where_cs_trick_is_rounding():
    """make_qkx_quants' levels: MAX(0, MIN(nmax, nearest_int(iscale·(x − min)))). In range the float
    rounding path; with a min above the largest element (iscale < 0, |products| past 2^22) C's trick,
    whose garbage differs from rounding there, so a search that always rounded would fail this."""
    from llmquant.formats.qkx_search import qkx_levels

    def reference(xt, iscale, mn):
        return tg.nearest_int(iscale * (xt - mn)).clamp(0, 15).to(torch.float32)

    g = torch.Generator().manual_seed(5)
    xt = torch.randn(32, 64, generator=g)
    hi, lo = xt.max(0).values, xt.min(0).values.clamp(max=0)
    none = torch.zeros(64, dtype=torch.bool)
    iscale = tg.const(15.0, xt) / (hi - lo)
    assert torch.equal(qkx_levels(xt, iscale, lo, hi, lo, none, 15), reference(xt, iscale, lo))

    xt = torch.tensor([[-2.0, -3.0, -1.5, -1.25], [-1.0, -1.0, -1.0, -1.0]])  # [n = 2, N = 4]
    hi, lo = xt.max(0).values, xt.min(0).values
    mn = hi + 2.0**-20
    iscale = tg.const(15.0, xt) / (hi - mn)
    ref = reference(xt, iscale, mn)
    assert not torch.equal(ref, (iscale * (xt - mn)).round().clamp(0, 15))
    assert torch.equal(qkx_levels(xt, iscale, mn, hi, lo, torch.zeros(4, dtype=torch.bool), 15), ref)
