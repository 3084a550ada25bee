"""``rtn_rows`` with an importance matrix against llama.cpp's own quantizer, every type.

With an imatrix llama.cpp runs another quantizer (``quantize_row_*_impl``): the
legacy types search their block scale with weights that depend on the whole
row, the k-quants run their weighted searches. ``ggml_quantize_chunk`` (the
function llama-quantize calls) is the byte oracle; a wrong row grouping, a
fallback to the reference rule or a sum in another order shows as differing
blocks.
"""

from __future__ import annotations

import numpy as np
import pytest
from ggml_ref import ggml_quantize

from llmquant.formats import get_format

LEGACY = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]
KQUANTS = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
FFN_DOWN = "model.layers.0.mlp.down_proj.weight"


def _rows() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    heavy = (rng.standard_t(3, (24, 512)) * 0.02).astype(np.float32)
    with_zero = heavy.copy()
    with_zero[2] = 0.0  # a whole row of zeros: sigma2 = 0
    with_zero[5, 32:64] = 0.0  # one all-zero block
    with_zero[7, 64:96] = 0.25  # a constant block
    return {
        "heavy_tailed": heavy,
        "with_zero_and_constant_blocks": with_zero,
        "integers": rng.integers(-8, 8, (8, 256)).astype(np.float32),  # ties everywhere
        "positive_only": np.abs(rng.standard_normal((8, 768))).astype(np.float32),
        "wide_rows": (rng.standard_normal((4, 4096)) * 0.01).astype(np.float32),
    }


ROWS = _rows()


def _importance(n: int, seed: int = 5, zeros: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    im = rng.lognormal(0.0, 1.5, n).astype(np.float32)
    if zeros:
        im[rng.random(n) < 0.25] = 0.0
    return im


def _assert_bytes_equal(name: str, x: np.ndarray, im: np.ndarray | None) -> np.ndarray:
    fmt = get_format(name)
    packed = fmt.pack(fmt.rtn_rows(x, im))
    ref = ggml_quantize(x, fmt.qtype, im)
    assert packed.shape == ref.shape
    bad = np.flatnonzero((packed != ref).any(axis=1))
    assert bad.size == 0, f"{name}: {bad.size} of {len(ref)} blocks differ from llama.cpp's, first {bad[0]}"
    return packed


@pytest.mark.parametrize("zeros", [False, True], ids=["positive", "with_zero_columns"])
@pytest.mark.parametrize("data", list(ROWS))
@pytest.mark.parametrize("name", LEGACY + KQUANTS)
def test_rtn_rows_with_imatrix_matches_llama_cpp(name: str, data: str, zeros: bool):
    x = ROWS[data]
    packed = _assert_bytes_equal(name, x, _importance(x.shape[1], zeros=zeros))
    reference = ggml_quantize(x, get_format(name).qtype)
    if name == "q8_0":  # llama.cpp's q8_0 ignores the imatrix
        assert np.array_equal(packed, reference)
    elif data == "heavy_tailed":  # another quantizer, not a silent fallback to the reference rule
        assert not np.array_equal(packed, reference)


@pytest.mark.parametrize("name", LEGACY + KQUANTS)
def test_rtn_rows_without_imatrix_is_rtn(name: str):
    x = ROWS["heavy_tailed"]
    fmt = get_format(name)
    assert np.array_equal(fmt.pack(fmt.rtn_rows(x)), fmt.pack(fmt.rtn(x.reshape(-1, fmt.block_size))))
    _assert_bytes_equal(name, x, None)
    with pytest.raises(ValueError):
        fmt.rtn_rows(x, np.ones(x.shape[1] // 2, np.float32))


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q6_k"])
def test_rtn_rows_with_imatrix_on_real_weights(name: str, smollm2_dir):
    from safetensors import safe_open

    with safe_open(str(smollm2_dir / "model.safetensors"), framework="np") as f:
        w = f.get_tensor(FFN_DOWN).astype(np.float32)
    im = (np.square(w).mean(axis=0) * 1e3 + 1e-3).astype(np.float32)  # shaped like a mean squared activation
    _assert_bytes_equal(name, w, im)
