"""The legacy types' searches with an importance matrix (``quantize_row_q{4,5}_{0,1}_impl``).

Without an imatrix llama.cpp rounds each 32-wide block from its extreme (``rtn``
of each format). With one it runs another quantizer: every element gets the weight
``qw[j] · sqrt(sigma2 + x[j]²)``, where ``qw`` is the column's importance and
``sigma2`` the mean square of the element's *whole row*, and the block's scale
is searched for the least weighted squared error — ``make_qx_quants`` for the
symmetric q4_0/q5_0, ``make_qkx3_quants`` (36 candidate steps from -0.9 by 0.05)
for q4_1/q5_1, which have a min. q8_0 ignores the matrix. The sums run in C's
float32 order (``kquant.sequential_sum``) because the searches' comparisons
depend on their last bits.
"""

from __future__ import annotations

import numpy as np

from .base import QuantBlocks, f16_exact
from .kquant import sequential_sum
from .qkx_search import make_qkx_quants
from .qx_search import make_qx_quants

F32 = np.float32
BLOCK = 32


def element_weights(rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """rows float32 [r, c], importance float32 [c] -> float32 [r·c/32, 32], the search's weights."""
    sigma2 = sequential_sum(rows * rows) / F32(rows.shape[1])
    weights = importance[None, :] * np.sqrt(sigma2[:, None] + rows * rows)
    return weights.reshape(-1, BLOCK)


def symmetric(rows: np.ndarray, importance: np.ndarray, nmax: int) -> QuantBlocks:
    """q4_0 (nmax 8) and q5_0 (nmax 16): codes in [-nmax, nmax - 1], scale searched, stored fp16."""
    codes, d = make_qx_quants(rows.reshape(-1, BLOCK), nmax, element_weights(rows, importance))
    return QuantBlocks(codes=codes.astype(np.int16), scales=f16_exact(d))


def with_min(rows: np.ndarray, importance: np.ndarray, nmax: int) -> QuantBlocks:
    """q4_1 (nmax 15) and q5_1 (nmax 31): levels in [0, nmax], ``w = d·level + m`` with m = −the_min."""
    levels, d, the_min = make_qkx_quants(rows.reshape(-1, BLOCK), element_weights(rows, importance), nmax,
                                         -0.9, 0.05, 36, False)
    return QuantBlocks(codes=levels.astype(np.int16), scales=f16_exact(d), mins=f16_exact(-the_min))
