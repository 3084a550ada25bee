"""The legacy ggml block formats must agree with llama.cpp byte for byte.

``gguf.quants`` reproduces llama.cpp's reference quantizers and dequantizers
in numpy, so it is the oracle here: any difference in a single byte or bit
would make our round-to-nearest files differ from ``llama-quantize``'s.
"""

from __future__ import annotations

import gguf.quants as gq
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from llmquant.formats import BlockFormat, QuantBlocks, block_formats, get_format

NAMES = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]
REAL_TENSORS = [
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.5.self_attn.v_proj.weight",
]


def _datasets() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    normal = rng.standard_normal((64, 256)).astype(np.float32)
    outliers = normal.copy()
    outliers.flat[rng.choice(normal.size, 300, replace=False)] *= 100.0
    single = np.zeros((64, 32), np.float32)
    single[np.arange(64), rng.integers(0, 32, 64)] = rng.standard_normal(64) * 3
    mixed_zero = rng.standard_normal((16, 32)).astype(np.float32)
    mixed_zero[::3] = 0.0
    constant = np.repeat(rng.standard_normal((16, 1)).astype(np.float32), 32, axis=1)
    # half-integers on grids whose 1/d is exactly 1 (amax 127; extreme -8 or -16;
    # range [0, 15] or [0, 31]), so every value is a rounding tie for some format
    ties = []
    for lo, hi, pin in (
        (-127, 127, (127.0,)),
        (-8, 7.5, (-8.0,)),
        (-16, 15.5, (-16.0,)),
        (0, 15, (0.0, 15.0)),
        (0, 31, (0.0, 31.0)),
    ):
        t = (rng.integers(int(2 * lo), int(2 * hi) + 1, (8, 32)) / 2).astype(np.float32)
        t[:, : len(pin)] = pin
        ties.append(t)
    ties = np.concatenate(ties)
    return {
        "normal_64x256": normal,
        "normal_8x32_small": (rng.standard_normal((8, 32)) * 1e-3).astype(np.float32),
        "normal_3x96_big": (rng.standard_normal((3, 96)) * 50).astype(np.float32),
        "outliers": outliers,
        "all_zero": np.zeros((8, 64), np.float32),
        "mixed_zero_blocks": mixed_zero,
        "single_nonzero": single,
        "single_negative_nonzero": -single,
        "constant": constant,
        "ties": ties,
        "tiny_fp16_underflow": (rng.standard_normal((8, 32)) * 1e-7).astype(np.float32),
    }


DATASETS = _datasets()


@pytest.fixture(scope="module")
def real_weights(smollm2_dir) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    with safe_open(str(smollm2_dir / "model.safetensors"), framework="np") as f:
        return {k: f.get_tensor(k).astype(np.float32) for k in REAL_TENSORS}


def _check_against_gguf(fmt: type[BlockFormat], x: np.ndarray) -> QuantBlocks:
    q = fmt.rtn(x.reshape(-1, fmt.block_size))
    packed = fmt.pack(q)
    ref = gq.quantize(x, fmt.qtype).reshape(-1, fmt.type_size)
    assert packed.dtype == np.uint8 and packed.shape == ref.shape
    bad = np.flatnonzero((packed != ref).any(axis=1))
    assert bad.size == 0, f"{bad.size} blocks differ, first {bad[0]}: {packed[bad[0]]} != {ref[bad[0]]}"
    return q


def _assert_same_blocks(a: QuantBlocks, b: QuantBlocks) -> None:
    assert a.codes.dtype == b.codes.dtype == np.int16
    assert np.array_equal(a.codes, b.codes)
    assert np.array_equal(a.scales.view(np.uint32), b.scales.view(np.uint32))
    assert (a.mins is None) == (b.mins is None)
    if a.mins is not None:
        assert np.array_equal(a.mins.view(np.uint32), b.mins.view(np.uint32))


def _assert_dequant_matches(fmt: type[BlockFormat], q: QuantBlocks) -> None:
    ours = fmt.dequantize(q)
    theirs = gq.dequantize(fmt.pack(q), fmt.qtype).reshape(ours.shape)
    assert ours.dtype == theirs.dtype == np.float32
    assert np.array_equal(ours, theirs)
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))


def _assert_nearest_roundtrip(fmt: type[BlockFormat], q: QuantBlocks) -> None:
    mins = None if q.mins is None else torch.from_numpy(q.mins)[:, None]
    got = fmt.nearest_codes(torch.from_numpy(fmt.dequantize(q)), torch.from_numpy(q.scales)[:, None], mins)
    live = q.scales != 0
    assert np.array_equal(got.numpy()[live], q.codes[live])


def test_registry():
    assert set(NAMES) <= set(block_formats())
    for name in NAMES:
        fmt = get_format(name.upper())
        assert fmt.name == name and fmt.block_size == 32
        assert fmt.has_min == name.endswith("_1")


@pytest.mark.parametrize("data", list(DATASETS))
@pytest.mark.parametrize("name", NAMES)
def test_rtn_matches_reference(name: str, data: str):
    fmt = get_format(name)
    q = _check_against_gguf(fmt, DATASETS[data])
    assert q.codes.min() >= fmt.qmin and q.codes.max() <= fmt.qmax
    _assert_same_blocks(fmt.unpack(fmt.pack(q)), q)
    _assert_dequant_matches(fmt, q)
    _assert_nearest_roundtrip(fmt, q)


@pytest.mark.parametrize("name", NAMES)
def test_rtn_matches_reference_on_real_weights(name: str, real_weights: dict[str, np.ndarray]):
    fmt = get_format(name)
    for w in real_weights.values():
        q = _check_against_gguf(fmt, w)
        _assert_same_blocks(fmt.unpack(fmt.pack(q)), q)
        _assert_dequant_matches(fmt, q)
        _assert_nearest_roundtrip(fmt, q)


def test_q8_0_rtn_stays_symmetric():
    x = np.tile(np.linspace(-1, 1, 32, dtype=np.float32), (4, 1))
    q = get_format("q8_0").rtn(x)
    assert q.codes.min() == -127 and q.codes.max() == 127


def test_q8_0_roundf_is_c_roundf_on_every_float_it_meets():
    """Every float32 in [0.25, 2), the 2**16 smallest, and 2**16 floats around each tie k + 0.5
    up to 2**22, against gguf's np_roundf (ties away from zero), both signs (q8_0's |v| <= 127)."""
    from llmquant.formats.q8_0 import roundf

    bits = np.float32([0.25, 2.0]).view(np.int32)
    low = np.concatenate([np.arange(1 << 16, dtype=np.int32), np.arange(*bits, dtype=np.int32)]).view(np.float32)
    ties = np.concatenate([np.arange(128), 2.0 ** np.arange(7, 23) - 1]).astype(np.float32) + np.float32(0.5)
    around = (ties.view(np.int32)[:, None] + np.arange(-1 << 15, 1 << 15, dtype=np.int32)).view(np.float32)
    v = np.concatenate([low, around.ravel()])
    v = np.concatenate([v, -v])
    assert np.array_equal(roundf(torch.from_numpy(v)).numpy(), gq.np_roundf(v))


def test_q4_0_extreme_lands_on_minus_8():
    x = np.linspace(-1, 3, 32, dtype=np.float32)[None]
    q = get_format("q4_0").rtn(x)
    assert q.codes[0, -1] == -8 and q.scales[0] < 0


fp16 = st.floats(width=16, allow_nan=False, allow_infinity=False)


@st.composite
def quant_blocks(draw, fmt: type[BlockFormat]) -> QuantBlocks:
    n = draw(st.integers(1, 6))
    codes = draw(hnp.arrays(np.int16, (n, fmt.block_size), elements=st.integers(fmt.qmin, fmt.qmax)))
    scales = draw(hnp.arrays(np.float32, n, elements=fp16))
    mins = draw(hnp.arrays(np.float32, n, elements=fp16)) if fmt.has_min else None
    return QuantBlocks(codes=codes, scales=scales, mins=mins)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_pack_unpack_property(name: str, data):
    fmt = get_format(name)
    q = data.draw(quant_blocks(fmt))
    _assert_same_blocks(fmt.unpack(fmt.pack(q)), q)
    _assert_dequant_matches(fmt, q)


def test_pack_rejects_off_grid_blocks():
    fmt = get_format("q4_1")
    ok = QuantBlocks(np.zeros((1, 32), np.int16), np.ones(1, np.float32), np.zeros(1, np.float32))
    fmt.pack(ok)
    for bad in (
        QuantBlocks(ok.codes + 16, ok.scales, ok.mins),
        QuantBlocks(ok.codes, np.array([0.1], np.float32), ok.mins),
        QuantBlocks(ok.codes, ok.scales, None),
    ):
        with pytest.raises(ValueError):
            fmt.pack(bad)


def test_nearest_codes_rounding_clipping_and_zero_scale():
    fmt = get_format("q4_0")
    x = torch.tensor([[0.5, -0.5, 1.5, -2.5, 0.49999999999999994, 100.0, -100.0, 3.0]], dtype=torch.float64)
    s = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    got = fmt.nearest_codes(x, s)
    assert got.shape == (2, 8)
    assert got[0].tolist() == [0, -0, 2, -2, 0, 7, -8, 3]  # ties to even
    assert got[1].tolist() == [0] * 8
    q1 = get_format("q4_1")
    got = q1.nearest_codes(torch.tensor([1.0, 1.25, 9.0]), torch.tensor(0.5), torch.tensor(1.0))
    assert got.tolist() == [0, 0, 15]


@pytest.mark.parametrize("name", ["q4_0", "q5_0"])
def test_signed_zeros_and_tied_extremes_are_llama_cpp_s(name) -> None:
    """Blocks of zeros led by -0.0 (C's scan keeps its +0.0 start, so the scale is -0.0; an argmax
    of |x| would take the -0.0) and blocks whose extremes tie as +a and -a (the first wins),
    against llama.cpp's own quantizer."""
    from ggml_ref import ggml_quantize

    fmt = get_format(name)
    rng = np.random.default_rng(7)
    zeros = np.zeros((4, 32), np.float32)
    zeros[0, 0] = zeros[1, 0] = zeros[1, 9] = zeros[2, 31] = -0.0
    tied = rng.integers(-3, 4, (64, 32)).astype(np.float32)
    tied[::2, 0], tied[::2, 5] = 3.0, -3.0
    tied[1::2, 2], tied[1::2, 7] = -3.0, 3.0
    x = np.concatenate([zeros, tied])
    packed = fmt.pack(fmt.rtn(x))
    assert np.array_equal(packed, ggml_quantize(x, fmt.qtype))
    assert (packed[:4, :2].view(np.uint16) == 0x8000).all()  # the scale -0.0, as C stores it
