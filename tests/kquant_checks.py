"""Checks shared by the k-quant format tests: two QuantBlocks equal to the bit, dequantization equal to gguf-py's."""

from __future__ import annotations

import gguf.quants as gq
import numpy as np

from llmquant.formats import QuantBlocks
from llmquant.formats.kquant import KQuantFormat


def assert_same_blocks(fmt: type[KQuantFormat], a: QuantBlocks, b: QuantBlocks) -> None:
    """Codes, flat view and grid of a and b equal bit for bit; mins/dmin/m present exactly for types with a min."""
    assert a.codes.dtype == b.codes.dtype == np.int16
    assert np.array_equal(a.codes, b.codes)
    for u, v in ((a.scales, b.scales), (a.mins, b.mins), (a.grid.d, b.grid.d), (a.grid.dmin, b.grid.dmin)):
        if u is None or v is None:
            assert u is None and v is None and not fmt.has_min
        else:
            assert u.dtype == v.dtype == np.float32 and np.array_equal(u.view(np.uint32), v.view(np.uint32))
    assert np.array_equal(a.grid.sc, b.grid.sc)
    if fmt.has_min:
        assert np.array_equal(a.grid.m, b.grid.m)
    else:
        assert a.mins is None and a.grid.dmin is None and a.grid.m is None and b.grid.m is None


def assert_dequant_matches(fmt: type[KQuantFormat], q: QuantBlocks) -> None:
    """Our flat-view dequantization of q equals gguf-py's of the packed bytes, bit for bit."""
    ours = fmt.dequantize(q).reshape(-1, fmt.block_size)
    theirs = gq.dequantize(fmt.pack(q), fmt.qtype).reshape(ours.shape)
    assert ours.dtype == theirs.dtype == np.float32
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))
